"""The loop's own position, as a checkpoint keeps it, and the checks a resume makes.

A checkpoint (checkpoints/) holds the adapters, the optimizer state and a plain
dict written by the trainer: where the loop stands (`LoopState`), the early
stopping and progress windows, the host's random state, the last losses, and
how the run computed. `loop_dict` writes the loop's part; `checked_loop_state`
reads it back and checks every value against this run (types, ranges, the data
position against the corpus), raising ValueError (or KeyError, TypeError) on
the first problem, so that a tampered file whose checksum matches is refused
like a damaged one, before anything is changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from base_model.weights import names_mismatch, shapes_mismatch
from corpus.batching import DataPosition, epoch_order

MAX_STEP = 10**12  # more optimizer steps than any run makes: a larger one is a tampered checkpoint


@dataclass
class LoopState:
    """What the loop itself must carry across a resume (beside model and optimizer)."""
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0  # learned
    tokens_processed: int = 0  # learned or context (0 before a resume from a checkpoint that did not count them)
    best_val_loss: float = math.inf
    best_val_step: int | None = None
    last_val_loss: float | None = None
    last_val_step: int | None = None  # the step of last_val_loss: a checkpoint names it only at that step
    last_loss: float | None = None
    train_seconds: float = 0.0


def loop_dict(state: LoopState) -> dict:
    """The checkpoint's "loop" entry."""
    return {
        "position": state.position.to_dict(),
        "tokens_seen": state.tokens_seen,
        "tokens_processed": state.tokens_processed,
        "best_val_loss": state.best_val_loss if state.best_val_step is not None else None,  # null: none yet
        "best_val_step": state.best_val_step,
        "train_seconds": state.train_seconds,
    }


def last_losses(state: LoopState) -> dict:
    """The checkpoint's "loss" and "val_loss": the validation loss only at the step it was measured (a
    checkpoint between validations has none, nor one whose loss was not a number: null, as in
    metrics.jsonl)."""
    measured_now = state.last_val_step == state.step and math.isfinite(state.last_val_loss)
    return {"loss": state.last_loss, "val_loss": state.last_val_loss if measured_now else None}


def checked_loop_state(step: int, trainer: dict, train_lengths, batch_size: int, seed: int,
                       grad_accum: int) -> LoopState:
    """The LoopState a checkpoint at `step` with trainer dict `trainer` puts back, for a corpus of
    `train_lengths` read in batches of `batch_size` (seed, grad_accum: this run's)."""
    step = bounded_int(step, "step", 0, MAX_STEP)
    loop = trainer["loop"]
    position = DataPosition.from_dict(loop["position"])
    batches_per_epoch = len(epoch_order(train_lengths, batch_size, seed, 0))
    # The data position is a function of the step: step * grad_accum micro-batches in.
    if not 0 <= position.batch < batches_per_epoch or \
            position.epoch * batches_per_epoch + position.batch != step * grad_accum:
        raise ValueError(f"data position (epoch {position.epoch}, batch {position.batch}) is not where step "
                         f"{step} leaves a corpus of {batches_per_epoch} batches per epoch")
    best_val_step = loop["best_val_step"]
    best_val_loss = loop["best_val_loss"]  # null: no validation yet (Infinity in older checkpoints)
    bounded_int(trainer.get("processes", 1), "processes", 1, 2**20)
    return LoopState(
        step=step,
        position=position,
        tokens_seen=bounded_int(loop["tokens_seen"], "tokens_seen", 0, 2**62),
        tokens_processed=bounded_int(loop.get("tokens_processed", 0), "tokens_processed", 0, 2**62),
        best_val_loss=math.inf if best_val_loss is None else float_or_inf(best_val_loss, "best_val_loss"),
        best_val_step=None if best_val_step is None else bounded_int(best_val_step, "best_val_step", 0, step),
        last_val_loss=None if trainer["val_loss"] is None else float_or_inf(trainer["val_loss"], "val_loss"),
        last_val_step=None if trainer["val_loss"] is None else step,
        last_loss=None if trainer["loss"] is None else float_or_inf(trainer["loss"], "loss"),
        train_seconds=float_or_inf(loop["train_seconds"], "train_seconds"),
    )


def computed_otherwise(saved: dict, now: dict) -> list[str]:
    """How the run that wrote a checkpoint computed otherwise than this one ("blas X -> Y"), from the
    checkpoints' "arithmetic" (none before it was kept): such a resume is not bit for bit."""
    saved = saved if isinstance(saved, dict) else {}
    return [f"{key} {saved[key]} -> {now.get(key)}" for key in sorted(saved)
            if key in now and saved[key] != now[key]]


def same_arrays(what: str, saved: dict, expected: dict) -> None:
    """Raises ValueError when the arrays `saved` are not named and shaped as `expected`."""
    problem = names_mismatch(saved, expected)
    if problem:
        raise ValueError(f"its {what} do not fit this model ({problem})")
    problem = shapes_mismatch(saved, expected, "this model's")
    if problem:
        raise ValueError(f"its {what}: {problem}")


def bounded_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    return value


def float_or_inf(value, name: str) -> float:
    """A loss or a duration: a number, never NaN or a string (infinity allowed: the best_val_loss
    of a checkpoint written before null meant no validation yet)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)
