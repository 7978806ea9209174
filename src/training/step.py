"""One optimizer step: the compiled functions, and the gradients of a global batch.

One optimizer step = `grad_accum` micro-batches, each through one compiled
gradient function (its backward pass started on its own with mx.async_eval,
so that only one pass's activations are held), then one host sync (loss and
gradient norm are needed to decide whether to update at all), then one
compiled update, started with mx.async_eval so that it runs while the host
prepares the next batch.

With several processes the step's gradients are averaged across ranks inside
a compiled function and its figures (loss sums, tokens, stop signals) summed
with them, so every rank sees the same numbers and takes the same decisions.

`compute_step` stops short of the update: the caller judges the figures
(early stopping) and calls `apply_step` only for a step it keeps, so a
non-finite or exploding step is never applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from corpus.batching import DataPosition
from corpus.index import CorpusIndex
from monitoring.evaluation import compile_row_losses
from run_safety.stop_signals import EXIT_CODES, StopRequests
from training.chunked_loss import LossPlan
from training.distrust import DistrustObjective
from training.optimization import gradient_function, step_seed
from training.process_group import PeerLost, ProcessGroup


@dataclass
class CompiledFunctions:
    gradients: object  # (inputs, targets, mask, weights) -> weighted ce sum, ce sum, grads
    global_norm: object  # (grads, tokens) -> gradient norm of the per-token mean
    update: object  # (grads, tokens, norm) -> applies the clipped update
    row_losses: object  # (inputs, targets, mask) -> ce sum per row, eval mode
    reduce: object  # (grads, figures) -> grads averaged over the ranks, figures summed (several processes)


@dataclass
class StepFigures:
    loss: float
    ce: float
    distrust: float
    grad_norm: float
    tokens: int  # the learned ones: the targets the loss counts
    learning_rate: float
    seconds: float
    signal: int | None = None  # a stop signal any rank received (several processes)
    processed: int = 0  # the tokens the step ran through the model, learned or context (padding not counted)


@dataclass
class ComputedStep:
    """A step's figures and what its update needs, not yet applied."""
    figures: StepFigures
    position: DataPosition  # where the data stands once this step is applied
    grads: dict
    denominator: mx.array  # tokens per rank, the per-token mean's divisor
    norm: mx.array
    started: float  # perf_counter at its start: the step's seconds are counted up to its update


def compile_functions(model: nn.Module, optimizer, plan: LossPlan, max_grad_norm: float, grad_checkpoint: bool,
                      group: ProcessGroup) -> CompiledFunctions:
    """Build after any restore: mx.compile holds the state objects it was given, so a later
    `optimizer.state = ...` would be missed."""
    # With --grad-checkpoint the gradient pass runs uncompiled: compiled, its graph
    # held more at once (measured on 8 blocks x 1024 tokens: 265 MB peak against
    # 243 MB, at the same step time), and memory is what the option is for.
    gradients = gradient_function(model, plan, compiled=not grad_checkpoint)

    @mx.compile
    def global_norm(grads, tokens):
        squares = [mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)]
        return mx.sqrt(sum(squares)) / tokens

    @partial(mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
    def update(grads, tokens, norm):
        # Mean over the step's tokens, clipped to max_norm with the norm
        # already computed for the checks (no second pass over the grads).
        scale = mx.minimum(1.0, max_grad_norm / (norm + 1e-6)) / tokens
        optimizer.update(model, tree_map(lambda g: g * scale, grads))

    @mx.compile
    def reduce(grads, figures):
        # One process's gradients are sums over its tokens: their mean over the ranks,
        # divided by the mean tokens per rank, is the global per-token mean.
        return group.average(grads), group.sum(figures)

    # Validation runs the model in eval mode (no dropout), compiled like the step.
    return CompiledFunctions(gradients, global_norm, update, compile_row_losses(model, plan), reduce)


def compute_step(compiled: CompiledFunctions, batches, micro_batches: int, seed: int, step: int,
                 objective: DistrustObjective, train_index: CorpusIndex, group: ProcessGroup, learning_rate: mx.array,
                 stops: StopRequests | None = None) -> ComputedStep:
    """The gradients and figures of step `step` (0-based) over `micro_batches` batches drawn from
    `batches` ((position, Batch) pairs), at `learning_rate` (the schedule's, for the figures).
    With several processes, `stops` (this rank's signals) is summed with the step's figures."""
    started = time.perf_counter()
    weighted_sum = ce_sum = grads = None
    tokens = processed = 0
    auth, entropy = [], []
    position = None
    for micro in range(micro_batches):
        position, batch = next(batches)
        mx.random.seed(step_seed(seed, step, micro))
        weights = objective.weights(batch.auth_weight, batch.prov_entropy) * batch.real_rows
        w_sum, c_sum, g = compiled.gradients(mx.array(batch.inputs), mx.array(batch.targets),
                                             mx.array(batch.mask), mx.array(weights))
        if grads is None:
            weighted_sum, ce_sum, grads = w_sum, c_sum, g
        else:
            weighted_sum, ce_sum = weighted_sum + w_sum, ce_sum + c_sum
            grads = tree_map(mx.add, grads, g)
        # Each micro-batch's backward pass on its own: evaluated with the norm below,
        # or with the next micro-batch, MLX schedules them together and holds more at
        # once (measured with --grad-checkpoint, 8 blocks x 1024 tokens: 328 MB peak
        # against 265 MB).
        mx.async_eval(weighted_sum, ce_sum, grads)
        tokens += batch.tokens
        processed += batch.processed
        # The whole global batch's samples (one process: its own real rows).
        auth.append(train_index.auth_weight[batch.batch_indices])
        entropy.append(train_index.prov_entropy[batch.batch_indices])

    signal_received = None
    if group.distributed:
        # Sums over the ranks: loss sums, tokens, and which stop signals arrived anywhere.
        received = [float(stops is not None and stops.signal == sig) for sig in EXIT_CODES]
        totals = mx.concatenate([mx.stack([weighted_sum, ce_sum]),
                                 mx.array([float(tokens), float(processed), *received])])
        grads, totals = compiled.reduce(grads, totals)
        weighted_sum, ce_sum = totals[0], totals[1]
        denominator = mx.maximum(totals[2], 1.0) / group.size  # mean tokens per rank
    else:
        denominator = mx.array(float(max(tokens, 1)))  # a step of fill rows only has no tokens
    norm = compiled.global_norm(grads, denominator)
    try:
        mx.eval(weighted_sum, ce_sum, norm, learning_rate)  # the one sync of the step
    except RuntimeError as exc:
        if group.distributed:
            raise PeerLost(str(exc)) from None
        raise
    if group.distributed:
        counts = np.asarray(totals)
        tokens, processed = int(counts[2]), int(counts[3])
        signal_received = next((sig for sig, count in zip(EXIT_CODES, counts[4:]) if count > 0), None)
    tokens_or_one = max(tokens, 1)
    weighted_ce = weighted_sum.item() / tokens_or_one
    plain_ce = ce_sum.item() / tokens_or_one
    loss = objective.objective(weighted_ce, plain_ce, np.concatenate(auth), np.concatenate(entropy))
    figures = StepFigures(
        loss=loss, ce=plain_ce, distrust=loss - plain_ce, grad_norm=norm.item(), tokens=tokens,
        learning_rate=learning_rate.item(), seconds=0.0, signal=signal_received, processed=processed,
    )
    return ComputedStep(figures, position, grads, denominator, norm, started)


def apply_step(compiled: CompiledFunctions, computed: ComputedStep, model: nn.Module, optimizer) -> None:
    """The step's clipped update, started now and waited for by the next step's single sync, so that it
    runs while the host reads and pads the next batch."""
    compiled.update(computed.grads, computed.denominator, computed.norm)
    mx.async_eval(model.trainable_parameters(), optimizer.state)
