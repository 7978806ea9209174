"""The progress line: one tqdm bar with the figures worth watching in a long run.

After each optimizer step it reads, for example:

     61%|######1   | step 183/300 [00:50 elapsed, train ce 5.508 (mean of last 50 steps, compare val_ce) |
     objective 4.659 | 2,827 tok/s | ETA 29s | last checkpoint 83 steps ago | memory 39.9 MB (+0.0 MB since step 101)]

    train ce        the plain cross-entropy per token, averaged over the last
                    `window` steps (NaN steps left out): the same measure as
                    the validation's val_ce, so the two compare
    objective       the loss being minimized (cross-entropy weighted by the
                    distrust scores), averaged over the same steps; it equals
                    train ce at --lambda-weight 0
    tok/s           tokens per second over the window; with several processes
                    (mlx.launch) the whole group's, "(2 processes)" after it
    ETA             remaining steps x mean seconds per step over the window
    last checkpoint steps since the last committed checkpoint
    memory          MLX peak memory so far, in MB or GB (10**6, 10**9 bytes),
                    and how much it grew since a baseline taken at step
                    `memory_baseline_step` (the trainer takes the step after
                    the first validation, when everything a step needs has
                    been allocated once); "growing" is added when it grew
                    by more than half and by at least 64 MB: a leak, or
                    batches much longer than before

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

from monitoring.floats import decode_float, encode_float, mean_finite
from run_safety.sizes import size_text

DEFAULT_BASELINE_STEP = 5  # the step whose memory reading becomes the baseline, unless told otherwise
GROWTH_WARNING_FRACTION = 0.5  # "growing" past +50% of the baseline ...
GROWTH_WARNING_BYTES = 64 * 10**6  # ... and past +64 MB (a few MB more on a tiny model is no alarm)
WORK_BAR_DELAY_S = 3.0  # work between steps (a validation, the probes) shows a bar once it has taken this long
TTY_MININTERVAL_S = 0.5
PIPE_MININTERVAL_S = 30.0
BAR_FORMAT = "{percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed} elapsed{postfix}]"


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def format_duration(seconds: float) -> str:
    """Hours and minutes: '2h 05m', '21m', '45s'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    if seconds < 60:
        return f"{seconds}s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def work_bar(items, what: str, file=None, quiet: bool = False, below: bool = False):
    """`items` (batches) with a bar for work that may take a while (a validation, the probes):
    drawn only once it has run WORK_BAR_DELAY_S (a quick validation shows nothing), gone when
    done. On a terminal, `below` puts it on the line under the progress line; elsewhere each
    redraw is a line, at most every 30 seconds, as the progress line's."""
    file = file if file is not None else sys.stderr
    terminal = _is_terminal(file)
    return tqdm(items, desc=what, unit="batch", delay=WORK_BAR_DELAY_S, leave=False, disable=quiet,
                # Not on a terminal: position 0, as the progress line's, or tqdm moves the cursor with escapes.
                position=1 if below and terminal else 0, file=file if terminal else _LinePerRedraw(file),
                mininterval=TTY_MININTERVAL_S if terminal else PIPE_MININTERVAL_S, dynamic_ncols=terminal,
                ascii=None if terminal else True)


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
        memory_baseline_step: int = DEFAULT_BASELINE_STEP,
        quiet: bool = False,
        processes: int = 1,
    ):
        self.total_steps = total_steps
        self.window = window
        self.memory_baseline_step = memory_baseline_step
        self.objectives: deque[float] = deque(maxlen=window)
        self.ces: deque[float] = deque(maxlen=window)
        self.tokens: deque[int] = deque(maxlen=window)
        self.seconds: deque[float] = deque(maxlen=window)
        self.updates_seen = 0
        self.memory_baseline_bytes: int | None = None
        self.memory_baseline_at: int | None = None  # the step of the baseline reading
        self.text = ""  # the figures as last drawn
        self.quiet = quiet  # draws and writes nothing (the ranks of a distributed run other than 0)
        self.processes = processes  # tok/s is the whole group's

        file = file if file is not None else sys.stderr  # looked up now: the command line may have wrapped it
        self._file = file
        self._terminal = _is_terminal(file)
        self._bar = tqdm(
            total=total_steps,
            initial=initial_step,
            unit="step",
            bar_format=BAR_FORMAT,
            # One bar, always on the first line: without this tqdm places a
            # bar below any other still open, moving the cursor with escapes.
            position=0,
            disable=disable or quiet,
            file=file if self._terminal else _LinePerRedraw(file),
            mininterval=TTY_MININTERVAL_S if self._terminal else PIPE_MININTERVAL_S,
            dynamic_ncols=self._terminal,
            ascii=None if self._terminal else True,
        )

    # -- figures over the window ------------------------------------------

    @property
    def smoothed_ce(self) -> float:
        """Mean plain cross-entropy over the window, NaN/inf steps left out; NaN if none is finite."""
        return mean_finite(self.ces)

    @property
    def smoothed_objective(self) -> float:
        """Mean objective (the weighted loss) over the window, NaN/inf steps left out."""
        return mean_finite(self.objectives)

    @property
    def tokens_per_second(self) -> float:
        seconds = sum(self.seconds)
        return sum(self.tokens) / seconds if seconds > 0 else math.nan

    def eta_seconds(self, step: int) -> float:
        if not self.seconds:
            return math.nan
        seconds_per_step = sum(self.seconds) / len(self.seconds)
        return max(self.total_steps - step, 0) * seconds_per_step

    def memory_growth_bytes(self, memory_bytes: int) -> int | None:
        if self.memory_baseline_bytes is None:
            return None
        return int(memory_bytes) - self.memory_baseline_bytes

    # -- drawing -------------------------------------------------------------

    def update(
        self,
        step: int,
        objective: float,
        ce: float,
        tokens: int,
        seconds: float,
        memory_bytes: int,
        steps_since_checkpoint: int,
    ) -> None:
        """Record the step just finished (`step` counts finished steps) and redraw.
        `memory_bytes` is the peak memory so far."""
        self.objectives.append(float(objective))
        self.ces.append(float(ce))
        self.tokens.append(int(tokens))
        self.seconds.append(float(seconds))
        self.updates_seen += 1
        if self.memory_baseline_bytes is None and step >= self.memory_baseline_step and memory_bytes > 0:
            self.memory_baseline_bytes, self.memory_baseline_at = int(memory_bytes), step
        self.text = self.describe(step, memory_bytes, steps_since_checkpoint)
        # refresh=False: let update() redraw, so mininterval is respected.
        self._bar.set_postfix_str(self.text, refresh=False)
        self._bar.update(step - self._bar.n)

    def describe(self, step: int, memory_bytes: int, steps_since_checkpoint: int) -> str:
        """The figures of the line, each with its label and unit."""
        n = len(self.ces)
        parts = [
            f"train ce {self.smoothed_ce:.3f} (mean of last {n} step{'s' if n != 1 else ''}, compare val_ce)",
            f"objective {self.smoothed_objective:.3f}",
            (f"{self.tokens_per_second:,.0f} tok/s" if math.isfinite(self.tokens_per_second) else "? tok/s")
            + (f" ({self.processes} processes)" if self.processes > 1 else ""),
            f"ETA {format_duration(self.eta_seconds(step))}",
            f"last checkpoint {steps_since_checkpoint} step{'s' if steps_since_checkpoint != 1 else ''} ago",
        ]
        memory = f"memory {size_text(memory_bytes, smallest='MB')}"
        growth = self.memory_growth_bytes(memory_bytes)
        if growth is not None:
            memory += f" ({'+' if growth >= 0 else ''}{size_text(growth, smallest='MB')} since step {self.memory_baseline_at}"
            if growth > GROWTH_WARNING_FRACTION * self.memory_baseline_bytes and growth >= GROWTH_WARNING_BYTES:
                memory += ": growing"
            memory += ")"
        parts.append(memory)
        return " | ".join(parts)

    def write(self, msg: str) -> None:
        """Print a message above the bar (validation results, checkpoints...)."""
        if self.quiet:
            return
        if self._terminal and not self._bar.disable:
            self._bar.write(msg, file=self._file)
        else:
            # No bar to clear and redraw: writing directly avoids a redraw
            # line after every message in a log file.
            print(msg, file=self._file, flush=True)

    def work(self, items, what: str):
        """`items` with a bar under this line for work between steps (work_bar)."""
        return work_bar(items, what, self._file, quiet=self.quiet, below=not self._bar.disable)

    def close(self) -> None:
        self._bar.close()

    # -- resume -------------------------------------------------------------

    def state_dict(self) -> dict:
        """The windows, JSON-able (a step whose figure was not a number: null). The memory baseline is not
        kept: memory is a process's own, so a resumed process takes its own baseline."""
        return {
            "losses": [encode_float(x) for x in self.objectives],
            "ces": [encode_float(x) for x in self.ces],
            "tokens": list(self.tokens),
            "seconds": list(self.seconds),
            "updates_seen": self.updates_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        objectives, ces, tokens, seconds, updates_seen = self._decode(state)
        # deque(maxlen=...) keeps the newest entries if the window shrank.
        self.objectives = deque(objectives, maxlen=self.window)
        self.ces = deque(ces, maxlen=self.window)
        self.tokens = deque(tokens, maxlen=self.window)
        self.seconds = deque(seconds, maxlen=self.window)
        self.updates_seen = updates_seen

    @classmethod
    def check_state_dict(cls, state: dict) -> None:
        """Raises (KeyError, TypeError, ValueError) unless load_state_dict can take `state`."""
        cls._decode(state)

    @staticmethod
    def _decode(state: dict) -> tuple:
        """A checkpoint written before `ces` was kept has none: that window starts empty
        (its `memory_baseline_bytes` is not used)."""
        ces = state.get("ces", [])
        if not isinstance(ces, list):
            raise TypeError(f"progress ces must be a list, got {type(ces).__name__}")
        return ([decode_float(x, null_means=math.nan) for x in state["losses"]],
                [decode_float(x, null_means=math.nan) for x in ces],
                [int(x) for x in state["tokens"]], [float(x) for x in state["seconds"]],
                int(state["updates_seen"]))
