"""The pre-flight: before step 1, whether the run's longest batch fits in memory.

The corpus index knows every sample's length, so the widest batch the run will
ever build is known before it starts (`longest_batch`: the micro-batch's rows
per process, padded to the ladder rung of the longest sample). One forward and
backward pass on a batch of that shape, through a gradient function built
exactly as the training step's, gives its MLX peak memory (mx.get_peak_memory
after mx.reset_peak_memory): one line says it, and a run whose longest batch
does not fit stops with exit 2 before anything is trained, naming the settings
that were measured, on the same shape, to fit (`--grad-checkpoint`, the chunked
loss, a smaller `--batch-size` with more `--grad-accum`, a shorter
`--max-seq-length`, in that order).

The limit: Metal's recommended working set on a Mac (mx.device_info()), the
device's memory where MLX reports one, else the machine's physical memory; the
environment variable DISTRUST_QLORA_MEMORY_LIMIT (bytes, or a number with kB,
MB, GB, KiB, MiB, GiB) replaces it, to try the check or to keep a run below
what other programs leave free.

It leaves no trace in what the run learns: its gradient function is its own
(the step compiled later captures nothing of it), its outputs are dropped, the
model's parameters are not changed, no optimizer or loop state is touched, and
the one thing it moves, the MLX generator (dropout), is reseeded before every
micro-batch of every step. The peak figure is reset afterwards, so the run's
own memory figures are its steps'. With several processes each measures its
own share; the decisions (fits, which setting fits) are summed over the ranks,
so every rank takes the same one.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from training.chunked_loss import AUTO, LossPlan, loss_plan
from corpus.batching import padded_length
from corpus.index import CorpusIndex
from run_safety.errors import UserError
from training.optimization import gradient_function
from training.process_group import ProcessGroup
from run_safety.sizes import size_text

LIMIT_VARIABLE = "DISTRUST_QLORA_MEMORY_LIMIT"
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MIN_SEQ_LENGTH = 16  # the shortest --max-seq-length a refusal proposes
MAX_TRIES = 16  # passes measured at most to find a setting that fits


@dataclass(frozen=True)
class Setting:
    """One way to run a step: per-process rows x width, and the memory savers on."""
    rows: int
    width: int
    grad_checkpoint: bool
    plan: LossPlan


def longest_batch(index: CorpusIndex, batch_size: int, processes: int = 1) -> tuple[int, int]:
    """(rows per process, padded width) of the widest micro-batch a run on `index` builds
    (corpus/batching.py collates every batch to the rung of its longest sample)."""
    return batch_size // processes, padded_length(int(index.lengths.max()) - 1, index.max_tokens - 1)


def memory_limit() -> tuple[int, str]:
    """(bytes, what they are): the environment's limit, Metal's working set, the device's, or RAM."""
    given = os.environ.get(LIMIT_VARIABLE)
    if given is not None:
        return parse_size(given), LIMIT_VARIABLE
    try:
        info = mx.device_info()
    except Exception:  # an MLX without it
        info = {}
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    if info.get("memory_size") and mx.default_device() == mx.gpu:
        return int(info["memory_size"]), "the GPU's memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{LIMIT_VARIABLE}={text!r}: give a size such as 16GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def check_longest_batch(model: nn.Module, plan: LossPlan, training, index: CorpusIndex, pad_id: int,
                        group: ProcessGroup, log) -> None:
    """Measure the longest batch; say its peak, or raise UserError with settings measured to fit.
    `training` is the run's TrainingConfig; call on every rank."""
    rows, width = longest_batch(index, training.batch_size, group.size)
    limit, source = memory_limit()
    run = Setting(rows, width, training.grad_checkpoint, plan)
    was_training = model.training
    model.train()  # dropout, as in a step
    try:
        peak, fits = _measure(model, run, pad_id, limit, group)
        shape = _shape_text(rows, width, group.size)
        if fits:
            log(f"memory: the longest batch ({shape}) peaks at {size_text(peak)} of {size_text(limit)} ({source})")
            return
        tried = _find_a_fit(model, run, training, pad_id, limit, group)
    finally:
        model.train(was_training)
        mx.reset_peak_memory()  # the run's own figures are its steps'
    found = [text for text, _, fit in tried if fit]
    measured = "; ".join(f"{text}: {size_text(p)}{', fits' if fit else ''}" for text, p, fit in tried)
    advice = (f"run with {found[0]}" if found else
              "no setting tried fits: a smaller model or a machine with more memory is needed")
    group.on_writer(lambda: _refuse(
        f"memory: the longest batch ({shape}) peaks at {size_text(peak)}, more than the {size_text(limit)} of "
        f"{source}; measured, one forward and backward pass each: {measured}; {advice} "
        f"(or --no-memory-check to try anyway)"))


def _refuse(message: str) -> None:
    raise UserError(message)


def _shape_text(rows: int, width: int, processes: int) -> str:
    each = f" in each of {processes} processes" if processes > 1 else ""
    return f"{rows:,} x {width:,} tokens{each}"


def _candidates(model: nn.Module, run: Setting, training):
    """(flags, setting) to measure, in order: the savers that keep the result, then fewer
    rows per micro-batch (more accumulation), then shorter sequences."""
    savers = {}
    if not run.grad_checkpoint:
        savers["--grad-checkpoint"] = {"grad_checkpoint": True}
    if run.plan.head is None and run.plan.note is None:  # --loss-chunk-size 0
        chunked = loss_plan(model, AUTO)
        if chunked.chunk_for(run.rows * run.width) is not None:
            savers[f"--loss-chunk-size {AUTO}"] = {"plan": chunked}
    all_savers = {key: value for change in savers.values() for key, value in change.items()}
    for flag, change in savers.items():
        yield flag, replace(run, **change)
    if len(savers) > 1:
        yield " ".join(savers), replace(run, **all_savers)
    strongest = replace(run, **all_savers)
    processes = training.batch_size // run.rows
    for rows in (divisor for divisor in range(run.rows - 1, 0, -1) if run.rows % divisor == 0):
        flags = f"--batch-size {rows * processes} --grad-accum {training.grad_accum * run.rows // rows}"
        yield flags, replace(run, rows=rows)
        if savers:
            yield f"{flags} {' '.join(savers)}", replace(strongest, rows=rows)
    width = run.width
    while width // 2 >= MIN_SEQ_LENGTH:
        width //= 2
        flags = f"--batch-size {processes} --grad-accum {training.grad_accum * run.rows}" if run.rows > 1 else ""
        yield " ".join(filter(None, [flags, f"--max-seq-length {width}", *savers])), replace(strongest, rows=1,
                                                                                            width=width)


def _find_a_fit(model: nn.Module, run: Setting, training, pad_id: int, limit: int,
                group: ProcessGroup) -> list[tuple[str, float, bool]]:
    """Measure the candidates until one fits (on every rank): [(flags, peak, fits)]."""
    tried = []
    for flags, setting in _candidates(model, run, training):
        peak, fits = _measure(model, setting, pad_id, limit, group)
        tried.append((flags, peak, fits))
        if fits or len(tried) >= MAX_TRIES:
            break
    return tried


def _measure(model: nn.Module, setting: Setting, pad_id: int, limit: int, group: ProcessGroup) -> tuple[float, bool]:
    """(the largest peak of any rank, whether it fits on every rank) of one forward and backward pass."""
    with _checkpointed_blocks(model, setting.grad_checkpoint):
        gradients = gradient_function(model, setting.plan, compiled=not setting.grad_checkpoint)
        tokens = mx.full((setting.rows, setting.width), pad_id, dtype=mx.int32)
        ones = mx.ones((setting.rows, setting.width), dtype=mx.float32)
        mx.eval(tokens, ones)
        mx.synchronize()
        mx.reset_peak_memory()
        outputs = gradients(tokens, tokens, ones, mx.ones((setting.rows,), dtype=mx.float32))
        mx.eval(outputs)
        peak = mx.get_peak_memory()
        del outputs, gradients
    # Every rank's (peak, over the limit), by position: the same figures and decision on each.
    everyone = group.gather_rows(np.array([peak, float(peak > limit)], dtype=np.float32),
                                 np.arange(2 * group.rank, 2 * group.rank + 2), 2 * group.size)
    return float(everyone[0::2].max()), not everyone[1::2].any()


@contextmanager
def _checkpointed_blocks(model: nn.Module, wanted: bool):
    """mlx-lm's gradient checkpointing of every block while inside, as --grad-checkpoint
    sets it for a run (optimization.use_grad_checkpoint), undone afterwards."""
    block_type = type(model.layers[0])
    if not wanted or getattr(block_type, "_distrust_grad_checkpoint", False):
        yield
        return
    from mlx_lm.tuner.trainer import grad_checkpoint

    own = block_type.__dict__.get("__call__")
    grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        if own is None:
            del block_type.__call__
        else:
            block_type.__call__ = own
