"""The progress line: one tqdm bar with the figures worth watching in a long run.

Postfix, after each optimizer step:

    loss       this step's loss
    loss_avg   mean loss over the last `window` steps (NaN steps left out)
    tok/s      tokens per second over the window
    eta_h      remaining steps x mean seconds per step over the window, in hours
    ckpt       steps since the last committed checkpoint
    memory_mb  MLX active memory, in MB (10**6 bytes), as passed in
    mem_delta  percent change of that memory against a baseline taken at the
               5th update (after compilation and the first allocations have
               settled); marked "!" past +50%, which usually means a leak

It never touches MLX: the trainer passes Python floats and ints, so drawing the
bar never forces a device sync.

Not on a terminal (a pipe, a log file, nohup), the bar is redrawn at most every
30 seconds and each redraw is its own line instead of a carriage-return
overwrite, so a log file stays readable and small.
"""

from __future__ import annotations

import math
import sys
from collections import deque

from tqdm import tqdm

from monitoring.floats import encode_float

BASELINE_UPDATE = 5  # the update whose memory reading becomes the baseline
MEMORY_WARNING_PERCENT = 50.0
TTY_MININTERVAL_S = 0.5
PIPE_MININTERVAL_S = 30.0


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class _LinePerRedraw:
    """File wrapper for non-terminals: tqdm redraws with '\\r'; write each redraw
    as a line of its own. Blank writes (the '\\r   \\r' clears, the newline
    tqdm adds on close) are dropped: every line written here ends itself."""

    def __init__(self, file):
        self.file = file

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if line:
            self.file.write(line + "\n")

    def flush(self) -> None:
        self.file.flush()


class ProgressLine:
    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        window: int = 50,
        disable: bool = False,
        file=None,
    ):
        self.total_steps = total_steps
        self.window = window
        self.losses: deque[float] = deque(maxlen=window)
        self.tokens: deque[int] = deque(maxlen=window)
        self.seconds: deque[float] = deque(maxlen=window)
        self.updates_seen = 0
        self.memory_baseline_bytes: int | None = None

        file = file if file is not None else sys.stderr  # looked up now: the command line may have wrapped it
        self._file = file
        self._terminal = _is_terminal(file)
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            # One bar, always on the first line: without this tqdm places a
            # bar below any other still open, moving the cursor with escapes.
            position=0,
            disable=disable,
            file=file if self._terminal else _LinePerRedraw(file),
            mininterval=TTY_MININTERVAL_S if self._terminal else PIPE_MININTERVAL_S,
            dynamic_ncols=self._terminal,
            ascii=None if self._terminal else True,
        )

    # -- figures over the window ------------------------------------------

    @property
    def smoothed_loss(self) -> float:
        """Mean loss over the window, NaN/inf steps left out; NaN if none is finite."""
        finite = [x for x in self.losses if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else math.nan

    @property
    def tokens_per_second(self) -> float:
        seconds = sum(self.seconds)
        return sum(self.tokens) / seconds if seconds > 0 else math.nan

    def eta_hours(self, step: int) -> float:
        if not self.seconds:
            return math.nan
        seconds_per_step = sum(self.seconds) / len(self.seconds)
        return max(self.total_steps - step, 0) * seconds_per_step / 3600

    def memory_delta_percent(self, memory_bytes: int) -> float | None:
        if not self.memory_baseline_bytes:  # not taken yet, or no memory reported
            return None
        return 100.0 * (memory_bytes - self.memory_baseline_bytes) / self.memory_baseline_bytes

    # -- drawing -------------------------------------------------------------

    def update(
        self,
        step: int,
        loss: float,
        tokens: int,
        seconds: float,
        memory_bytes: int,
        steps_since_checkpoint: int,
    ) -> None:
        """Record the step just finished (`step` counts finished steps) and redraw."""
        self.losses.append(float(loss))
        self.tokens.append(int(tokens))
        self.seconds.append(float(seconds))
        self.updates_seen += 1
        if self.updates_seen == BASELINE_UPDATE:
            self.memory_baseline_bytes = int(memory_bytes)

        postfix = {
            "loss": f"{loss:.4f}",
            "loss_avg": f"{self.smoothed_loss:.4f}",
            "tok/s": f"{self.tokens_per_second:.0f}",
            "eta_h": f"{self.eta_hours(step):.2f}",
            "ckpt": str(steps_since_checkpoint),
            "memory_mb": f"{memory_bytes / 1e6:.0f}",
        }
        delta = self.memory_delta_percent(memory_bytes)
        if delta is not None:
            mark = "!" if delta > MEMORY_WARNING_PERCENT else ""
            postfix["mem_delta"] = f"{delta:+.0f}%{mark}"

        # refresh=False: let update() redraw, so mininterval is respected.
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, msg: str) -> None:
        """Print a message above the bar (validation results, checkpoints...)."""
        if self._terminal and not self._bar.disable:
            self._bar.write(msg, file=self._file)
        else:
            # No bar to clear and redraw: writing directly avoids a redraw
            # line after every message in a log file.
            print(msg, file=self._file, flush=True)

    def close(self) -> None:
        self._bar.close()

    # -- resume -------------------------------------------------------------

    def state_dict(self) -> dict:
        """The windows and the memory baseline, JSON-able (NaN written as "nan")."""
        return {
            "losses": [encode_float(x) for x in self.losses],
            "tokens": list(self.tokens),
            "seconds": list(self.seconds),
            "updates_seen": self.updates_seen,
            "memory_baseline_bytes": self.memory_baseline_bytes,
        }

    def load_state_dict(self, state: dict) -> None:
        losses, tokens, seconds, updates_seen, baseline = self._decode(state)
        # deque(maxlen=...) keeps the newest entries if the window shrank.
        self.losses = deque(losses, maxlen=self.window)
        self.tokens = deque(tokens, maxlen=self.window)
        self.seconds = deque(seconds, maxlen=self.window)
        self.updates_seen = updates_seen
        self.memory_baseline_bytes = baseline

    @classmethod
    def check_state_dict(cls, state: dict) -> None:
        """Raises (KeyError, TypeError, ValueError) unless load_state_dict can take `state`."""
        cls._decode(state)

    @staticmethod
    def _decode(state: dict) -> tuple:
        baseline = state["memory_baseline_bytes"]
        return ([float(x) for x in state["losses"]], [int(x) for x in state["tokens"]],
                [float(x) for x in state["seconds"]], int(state["updates_seen"]),
                None if baseline is None else int(baseline))
