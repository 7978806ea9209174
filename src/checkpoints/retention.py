"""Which checkpoints to delete: a value and a pure function, so it can be tested alone.

The manager applies it only after a new checkpoint is committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Protocol, Sequence


class RetainedCheckpoint(Protocol):
    """What retention looks at (CheckpointInfo has it)."""

    path: Path
    step: int
    valid: bool
    is_best: bool
    is_final: bool


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest `keep_last` valid rolling checkpoints.

    Rolling means neither best, final, nor protected (the one a run resumed
    from): those are kept on top of `keep_last`. The one just written
    (`just_saved`) is never deleted and takes a place like any other. An
    invalid checkpoint inside the kept window stays (so --list-checkpoints
    shows the damage) without taking a place; beyond it, it goes too. Nothing
    is ever deleted unless a newer valid checkpoint exists.
    """

    keep_last: int = 3

    def __post_init__(self):
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {self.keep_last!r}")

    def to_delete(
        self,
        checkpoints: Sequence[RetainedCheckpoint],
        protected: Collection[str] = (),
        just_saved: str | None = None,
    ) -> list[RetainedCheckpoint]:
        """The checkpoints to delete, oldest first. `protected` and `just_saved` are directory names."""
        newest_first = sorted(checkpoints, key=lambda info: info.step, reverse=True)
        valid_steps = [info.step for info in newest_first if info.valid]
        if not valid_steps:
            return []
        newest_valid_step = valid_steps[0]
        kept_rolling = 0
        doomed = []
        for info in newest_first:
            if info.is_best or info.is_final or info.path.name in protected:
                continue
            if kept_rolling < self.keep_last or info.path.name == just_saved:
                kept_rolling += info.valid
                continue
            if info.step < newest_valid_step:  # a newer valid one exists
                doomed.append(info)
        return doomed[::-1]
