"""The per-token cross-entropy, computed over chunks of tokens so that the whole
batch's logits never exist at once.

A language model's loss holds, for every token of the batch, the logits of the
whole vocabulary, their softmax and its gradient: batch x length x vocabulary
floats, several times over (4.2 GB a copy for 4 x 2,048 tokens of Llama 3's
128,256 words in float32). Here the model's body gives the hidden states, and
its own output layer (`lm_head`, or the tied embedding's `as_linear`, quantized
or not) and the cross-entropy run over chunks of `chunk` tokens.

In training the gradient is computed chunk by chunk in the forward pass
(`weighted_sum_in_chunks`): each chunk's logits give its tokens' losses and,
at once, the gradient of the objective's weighted sum with respect to their
hidden states (the cross-entropy's and the output layer's own vjp, with each
token's weight times its mask as the cotangent: the operations autograd runs
on the whole batch), which is all the backward pass needs; the chunk's logits
are then dropped. The backward pass (an `mx.custom_function` vjp) only
multiplies those gradients by the sum's cotangent (1 in a step): the output
layer runs once forward and once backward per token, as without chunks, and
no chunk's logits are recomputed.
Each chunk's input waits for the previous chunk's results (`mx.depends`), so
the chunks are computed one after another. That alone does not bound the memory:
MLX allocates an operation's output when it encodes it, and encodes up to about
a hundred operations ahead of the one its stream computes (mlx/transforms.cpp:
10 tasks of 10 dispatches), so three chunks' buffers, 15 chunk-sized ones, were
allocated at once (measured on the CPU, 128,256 words). Between two chunks a gate
of GATE_OPERATIONS no-op operations (`mx.depends` on the previous chunk, which
allocate nothing) fills that window: the next chunk's first product is encoded
only once the previous chunk's have been computed, and about one chunk's buffers
(5 chunk-sized ones) are allocated at a time, whatever the number of chunks: the
loss's memory does not grow with the batch. Validation and `evaluate.py` run the
same chunks forward only (`token_losses`).

The values are those of the unchunked loss: each token's loss and gradient
are the same operations on the same numbers, a chunk's rows instead of the
batch's; equal to the bit where the matrix products give each row the same
result whatever the number of rows (measured so on this CPU), else within
float rounding. A model whose output
is not its output layer applied to `model.model(inputs)` (Gemma 2's logit
soft-capping, a logit scale) is found by a probe and gets the unchunked loss,
with a note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

AUTO = -1  # --loss-chunk-size -1: chunks chosen by the batch's size (LossPlan.chunk_for)
WHOLE = 0  # --loss-chunk-size 0: the whole batch's logits at once
# Automatic chunks: a batch of at most AUTO_LOGITS logits (16 MB in float32) is computed
# whole; a larger one in chunks of at most AUTO_LOGITS logits (32 tokens of a 128,256-word
# vocabulary) and at least AUTO_MIN_CHUNKS of them: about 5 chunk-sized buffers are allocated
# at a time (the logits, their softmax, the gradient's terms) where the whole batch's loss
# allocates 4 batch-sized ones, so 4 chunks or more stay well below it. From 4 x 32 tokens on
# (128,256 words) the chunks have the one size, and the loss's memory is the same for every batch.
AUTO_LOGITS = 2**22
AUTO_MIN_CHUNKS = 4
# No-op operations between two chunks: MLX's CPU backend encodes up to MAX_ACTIVE_TASKS (10)
# tasks of DISPATCHES_PER_TASK (10) dispatches ahead of its stream, one dispatch a no-op
# (mlx 0.32: mlx/transforms.cpp, mlx/backend/cpu/encoder.h). Measured (128,256 words, 32-token
# chunks): 0 gave 15 chunk-sized buffers at once, 50 gave 9, 100 and 200 gave 5.
GATE_OPERATIONS = 128
PROBE_TOKENS = 4


@dataclass(frozen=True)
class LossPlan:
    """How the per-token cross-entropy of a model is computed."""
    setting: int = WHOLE  # --loss-chunk-size: AUTO, WHOLE or tokens per chunk
    head: Callable | None = None  # hidden states -> logits: the model's own output layer
    vocabulary: int | None = None
    note: str | None = None  # why the loss is computed whole although chunks were asked for

    def chunk_for(self, tokens: int) -> int | None:
        """Tokens per chunk for a batch of `tokens` tokens; None: the whole batch at once
        (also where one chunk would hold them all: it would only add work)."""
        if self.head is None:
            return None
        if self.setting == AUTO:
            if tokens * self.vocabulary <= AUTO_LOGITS:
                return None
            return max(1, min(AUTO_LOGITS // self.vocabulary, -(-tokens // AUTO_MIN_CHUNKS)))
        return self.setting if tokens > self.setting else None


WHOLE_PLAN = LossPlan()


def loss_plan(model: nn.Module, setting: int) -> LossPlan:
    """The plan for `--loss-chunk-size setting` (-1 automatic, 0 off, N tokens) on this model."""
    if setting == WHOLE:
        return WHOLE_PLAN
    head, vocabulary, why = output_head(model)
    if head is None:
        return LossPlan(note=f"the loss is computed over the whole batch's logits at once, not in chunks: {why}")
    return LossPlan(setting=setting, head=head, vocabulary=vocabulary)


def output_head(model: nn.Module) -> tuple[Callable | None, int | None, str | None]:
    """(head, vocabulary, None) where `model(x)` is `head(model.model(x))`, checked on a
    short probe in eval mode; (None, None, why) where it is not or cannot be told."""
    body = model.get("model") if isinstance(model, dict) else None
    if not isinstance(body, nn.Module):
        return None, None, "the model has no `model` body to give its hidden states"
    if isinstance(model.get("lm_head"), nn.Module):
        layer, head = model["lm_head"], model["lm_head"]
    elif isinstance(body.get("embed_tokens"), nn.Module) and hasattr(body["embed_tokens"], "as_linear"):
        layer = body["embed_tokens"]
        head = layer.as_linear
    else:
        return None, None, "the model has neither an lm_head nor a tied embed_tokens"
    if tree_flatten(layer.trainable_parameters()):
        return None, None, "its output layer is trained"
    probe = mx.arange(PROBE_TOKENS, dtype=mx.int32)[None]
    was_training = model.training
    model.eval()
    try:
        whole = model(probe)
        split = head(body(probe))
        mx.eval(whole, split)
    except Exception as exc:  # a family whose body takes other arguments
        return None, None, f"its body cannot be run on its own ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    # The same operations on the same numbers: equal to the bit where the output is the plain layer.
    if whole.shape != split.shape or not mx.array_equal(whole, split).item():
        return None, None, ("its output is not its output layer applied to its hidden states "
                            "(a logit soft-cap or scale, as in Gemma 2)")
    return head, int(whole.shape[-1]), None


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy in float32: the one definition, chunked or not."""
    return nn.losses.cross_entropy(logits, targets).astype(mx.float32)


def token_losses(model: nn.Module, inputs: mx.array, targets: mx.array, plan: LossPlan = WHOLE_PLAN) -> mx.array:
    """Per-token cross-entropy [B, L] in float32; forward only (validation, evaluate.py)."""
    chunk = plan.chunk_for(inputs.size)
    if chunk is None:
        return cross_entropy(model(inputs), targets)
    hidden = model.model(inputs)
    batch, length, width = hidden.shape
    flat, flat_targets = hidden.reshape(-1, width), targets.reshape(-1)
    losses = []
    for start, end in _chunks(flat.shape[0], chunk):
        x = flat[start:end]
        if losses:
            x = after(x, losses[-1])
        losses.append(cross_entropy(plan.head(x), flat_targets[start:end]))
    return mx.concatenate(losses).reshape(batch, length)


def loss_sums(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array, weights: mx.array,
              plan: LossPlan = WHOLE_PLAN) -> tuple[mx.array, mx.array]:
    """(sum of weights[row] * ce over the tokens where mask is 1, plain ce sum), in chunks
    where the plan says. Only the first is differentiated in a step; in chunks the second
    is a figure only (no gradient flows from it).

    Sums, not means: micro-batches are then weighted by their tokens simply by
    adding, and the step divides once by the real target tokens of the step.
    Padding never counts: `mask` is 0 there (and on fill rows and prompts)."""
    chunk = plan.chunk_for(inputs.size)
    if chunk is None:
        ce = cross_entropy(model(inputs), targets) * mask
        return (ce * weights[:, None]).sum(), ce.sum()
    weighted, ce = weighted_sum_in_chunks(plan.head, model.model(inputs), targets, mask, weights, chunk)
    return weighted, (ce * mask).sum()


def weighted_sum_in_chunks(head: Callable, hidden: mx.array, targets: mx.array, mask: mx.array, weights: mx.array,
                           chunk: int) -> tuple[mx.array, mx.array]:
    """(the weighted sum of `loss_sums`, the per-token cross-entropy [B, L] as a figure) of
    `head(hidden)`, over chunks of `chunk` tokens; the weighted sum's gradient with respect to
    `hidden` is computed chunk by chunk in the forward pass, by the very operations autograd
    runs on the whole batch (each chunk's share of them)."""
    batch, length, width = hidden.shape
    tokens = batch * length

    def weighted_sum(ce):
        return ((ce * mask) * weights[:, None]).sum()

    @mx.custom_function
    def sum_and_gradient(hidden):
        flat, flat_targets = hidden.reshape(tokens, width), targets.reshape(tokens)
        # d(weighted sum)/d(each token's loss), as autograd computes it: it does not depend on the losses.
        _, (per_token,) = mx.vjp(weighted_sum, [mx.zeros((batch, length), dtype=mx.float32)], [mx.array(1.0)])
        per_token = per_token.reshape(tokens)
        packed = []  # per chunk [tokens, width + 1]: d(weighted sum)/d(hidden) of each token, then its loss
        for start, end in _chunks(tokens, chunk):
            x, t = flat[start:end], flat_targets[start:end]
            if packed:
                x = after(x, packed[-1])
            (loss,), (d_x,) = mx.vjp(lambda x: [cross_entropy(head(x), t)], [x], [per_token[start:end]])
            packed.append(mx.concatenate([d_x.astype(mx.float32), loss[:, None]], axis=1))
        packed = mx.concatenate(packed)
        ce = packed[:, width].reshape(batch, length)
        return weighted_sum(ce), ce, packed[:, :width].reshape(batch, length, width)

    @sum_and_gradient.vjp
    def scaled_gradient(primals, cotangents, outputs):
        # The weighted sum is the output differentiated; the losses leave through stop_gradient.
        return (cotangents[0] * outputs[2]).astype(primals[0].dtype)

    weighted, ce, _ = sum_and_gradient(hidden)
    return weighted, mx.stop_gradient(ce)


def after(x: mx.array, previous: mx.array) -> mx.array:
    """`x`, computed only once `previous` is, and encoded by MLX only once `previous`'s
    own operations have been computed (the gate of GATE_OPERATIONS no-ops): the next
    chunk's buffers are not allocated while the previous chunk's are still in use."""
    gate = previous
    for _ in range(GATE_OPERATIONS):
        gate = mx.depends(gate, previous)
    return mx.depends(x, gate)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]
