"""Early stopping: decide, from numbers the trainer hands in, when a run should stop.

Three rules, each with its own reason string (shown to the user and written
as the `reason` of the last metrics line):

- non-finite loss or gradient norm: stop at once, before the update, so the
  adapters of the last checkpoint and in memory are never poisoned by NaN.
  Always on, even with plateau detection disabled.
- gradient spike: the gradient norm (before clipping) above a threshold for
  several consecutive optimizer steps. One large norm is common and clipping
  handles it; a run of them means training has diverged.
- plateau: the smoothed training loss has not improved by `min_delta` for
  `patience` checks (the trainer checks once per eval interval). The loss is
  smoothed here, over the last `window` steps (`record_loss` each step): the
  per-step objective is noisy from batch to batch, so a check is made only
  once the window is full (`check_plateau_now`).

Nothing here knows about MLX or the trainer: it receives Python floats and
ints. `state_dict()` holds the counters and the window so that a resumed run
stops at the same step as an uninterrupted one. The settings themselves (patience,
thresholds) are not part of the state: they come from the config, and a
resumed run may change them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from monitoring.floats import decode_float, encode_float, mean_finite


@dataclass
class EarlyStopping:
    patience: int = 5
    min_delta: float = 0.01
    warmup_steps: int = 50
    grad_spike_threshold: float = 1000.0
    grad_spike_patience: int = 3
    plateau_enabled: bool = True
    window: int = 50  # steps the plateau check averages the loss over

    # Running state (what state_dict() saves).
    losses: deque = field(default=None, init=False)  # the last `window` step losses
    consecutive_spikes: int = field(default=0, init=False)
    best_loss: float = field(default=math.inf, init=False)
    best_step: int | None = field(default=None, init=False)
    checks_without_improvement: int = field(default=0, init=False)

    def __post_init__(self):
        self.losses = deque(maxlen=self.window)

    def record_loss(self, loss: float) -> None:
        """The loss of each step that was applied (the plateau window)."""
        self.losses.append(float(loss))

    @property
    def smoothed_loss(self) -> float:
        """Mean over the window, non-finite steps left out; NaN when none is finite."""
        return mean_finite(self.losses)

    def check_plateau_now(self, step: int) -> str | None:
        """check_plateau with the smoothed loss of the window, once the window is full
        (before, no check is made and nothing is counted)."""
        if len(self.losses) < self.window:
            return None
        return self.check_plateau(step, self.smoothed_loss)

    def check_step(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Call every optimizer step, before the update, with the loss and the
        gradient norm before clipping. Returns why to stop, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss}) at step {step}: stopped before the update"
        if not math.isfinite(grad_norm):
            return (
                f"non-finite gradient norm ({grad_norm}) at step {step}: "
                "stopped before the update"
            )

        # During warmup the learning rate is near zero while the LoRA matrices
        # are still at their initial values, and the first steps' gradients are
        # legitimately large (often far above the steady-state norm). Counting
        # them would abort healthy runs, so spikes only count once warmup ends.
        if step <= self.warmup_steps or grad_norm <= self.grad_spike_threshold:
            self.consecutive_spikes = 0
            return None

        self.consecutive_spikes += 1
        if self.consecutive_spikes >= self.grad_spike_patience:
            return (
                f"gradient norm above {self.grad_spike_threshold:g} for "
                f"{self.consecutive_spikes} consecutive steps "
                f"(last {grad_norm:.1f} at step {step})"
            )
        return None

    def check_plateau(self, step: int, smoothed_loss: float) -> str | None:
        """Call at each check (every eval interval) with the smoothed training
        loss. Returns why to stop, or None."""
        if not self.plateau_enabled or step <= self.warmup_steps:
            return None

        # A NaN loss compares False with everything, so it is never an
        # improvement and never becomes the best: it counts as a check
        # without improvement.
        if self.best_loss - smoothed_loss > self.min_delta:
            self.best_loss = smoothed_loss
            self.best_step = step
            self.checks_without_improvement = 0
            return None

        self.checks_without_improvement += 1
        if self.checks_without_improvement >= self.patience:
            if self.best_step is None:  # every check so far was NaN
                best = "no finite loss yet"
            else:
                best = f"best {self.best_loss:.3f} at step {self.best_step}"
            return (
                f"plateau: smoothed training loss has not improved by {self.min_delta:g} "
                f"for {self.checks_without_improvement} checks ({best})"
            )
        return None

    def state_dict(self) -> dict:
        """JSON-able running state: `best_loss` is null while there is no best yet, a window
        entry is null where the loss was not a number (json_files' rule)."""
        return {
            "consecutive_spikes": self.consecutive_spikes,
            "best_loss": encode_float(self.best_loss),
            "best_step": self.best_step,
            "checks_without_improvement": self.checks_without_improvement,
            "losses": [encode_float(x) for x in self.losses],
        }

    def load_state_dict(self, state: dict) -> None:
        """`losses` may be absent (a checkpoint written before the window was kept here):
        the window then starts empty, and the caller may fill it with `record_loss`. The
        "inf" / "nan" strings of earlier checkpoints read back as those floats."""
        raw = state.get("losses", [])
        if not isinstance(raw, list):
            raise TypeError(f"early stopping losses must be a list of numbers, got {raw!r}")
        losses = [decode_float(x, null_means=math.nan) for x in raw]
        # deque(maxlen=...) keeps the newest if the window shrank.
        self.losses = deque(losses, maxlen=self.window)
        self.consecutive_spikes = int(state["consecutive_spikes"])
        self.best_loss = decode_float(state["best_loss"], null_means=math.inf)
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.checks_without_improvement = int(state["checks_without_improvement"])
