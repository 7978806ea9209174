"""The per-token cross-entropy, computed over chunks of tokens so that the whole
batch's logits never exist at once.

A language model's loss holds, for every token of the batch, the logits of the
whole vocabulary, their softmax and its gradient: batch x length x vocabulary
floats, several times over (4.2 GB a copy for 4 x 2,048 tokens of Llama 3's
128,256 words in float32). Here the model's body gives the hidden states, and
its own output layer (`lm_head`, or the tied embedding's `as_linear`, quantized
or not) and the cross-entropy run over chunks of `chunk` tokens.

In training the gradient is computed chunk by chunk in the forward pass
(`with_gradient`): each chunk's logits give its losses and, at once, the
gradient of each token's loss with respect to its hidden state (softmax minus
the target's one-hot, through the output layer's own vjp), which is all the
backward pass needs; the chunk's logits are then dropped. The backward pass
(an `mx.custom_function` vjp) only scales those per-token gradients by the
cotangent of each token's loss: the output layer runs once forward and once
backward per token, as without chunks, and no chunk's logits are recomputed.
Each chunk's input waits for the previous chunk's results (`mx.depends`), so
the chunks are computed one after another; MLX still encodes a few operations
ahead of the one it computes, so about a dozen chunk-sized buffers can be
allocated at once (measured on the CPU), hence the automatic size's floor of
AUTO_MIN_CHUNKS chunks. Validation and `evaluate.py` run the same chunks
forward only (`token_losses`).

The values are those of the unchunked loss up to float rounding: each token's
loss is the same operation on the same logits, and each token's gradient the
same sum scaled after the output layer instead of before. A model whose output
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
# vocabulary) and at least AUTO_MIN_CHUNKS of them: MLX encodes a few operations ahead of
# the one it computes, so about a dozen chunks' worth of logits can be allocated at once
# (measured on the CPU); with 16 chunks or more that stays below the whole batch's.
AUTO_LOGITS = 2**22
AUTO_MIN_CHUNKS = 16
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
            x = mx.depends(x, losses[-1])
        losses.append(cross_entropy(plan.head(x), flat_targets[start:end]))
    return mx.concatenate(losses).reshape(batch, length)


def training_token_losses(model: nn.Module, inputs: mx.array, targets: mx.array,
                          plan: LossPlan = WHOLE_PLAN) -> mx.array:
    """Per-token cross-entropy [B, L] in float32, differentiable; in chunks where the plan says."""
    chunk = plan.chunk_for(inputs.size)
    if chunk is None:
        return cross_entropy(model(inputs), targets)
    return with_gradient(plan.head, model.model(inputs), targets, chunk)


def with_gradient(head: Callable, hidden: mx.array, targets: mx.array, chunk: int) -> mx.array:
    """Per-token cross-entropy of `head(hidden)` [B, L] in float32, over chunks of `chunk`
    tokens, its gradient with respect to `hidden` computed chunk by chunk in the forward pass."""
    batch, length, width = hidden.shape
    tokens = batch * length

    @mx.custom_function
    def losses_and_gradients(hidden):
        flat, flat_targets = hidden.reshape(tokens, width), targets.reshape(tokens)
        packed = []  # per chunk: [tokens, width + 1]: d(loss)/d(hidden) of each token, then its loss
        for start, end in _chunks(tokens, chunk):
            x, t = flat[start:end], flat_targets[start:end]
            if packed:
                x = mx.depends(x, packed[-1])
            logits = head(x)
            loss = cross_entropy(logits, t)
            # d(loss)/d(logits) = softmax - one-hot of the target, then back through the output layer
            probabilities = mx.softmax(logits, axis=-1, precise=True)
            at_target = mx.take_along_axis(probabilities, t[:, None], axis=-1)
            d_logits = mx.put_along_axis(probabilities, t[:, None], at_target - 1, axis=-1)
            _, (d_x,) = mx.vjp(head, [x], [d_logits])
            packed.append(mx.concatenate([d_x.astype(mx.float32), loss[:, None]], axis=1))
        packed = mx.concatenate(packed)
        return packed[:, width].reshape(batch, length), packed[:, :width].reshape(batch, length, width)

    @losses_and_gradients.vjp
    def scale_gradients(primals, cotangents, outputs):
        # Only the losses are an output to differentiate; the gradients are this function's own.
        return (cotangents[0][..., None] * outputs[1]).astype(primals[0].dtype)

    return losses_and_gradients(hidden)[0]


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]
