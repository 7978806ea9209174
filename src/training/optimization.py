"""What one training step optimizes, and with what: the loss over a batch, the
learning-rate schedule, the optimizer named by the config, mlx-lm's gradient
checkpointing, and the seed of each micro-batch's random stream. Plain
functions; the trainer composes them into its compiled step.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from training.chunked_loss import LossPlan, loss_sums


def gradient_function(model: nn.Module, plan: LossPlan, compiled: bool):
    """(inputs, targets, mask, weights) -> (weighted ce sum, ce sum, gradients of the first).

    Compiled, it holds `model.state` and the MLX generator as inputs and outputs
    (nn.value_and_grad puts the traced parameters into the model while it
    differentiates), so it must be built after anything replaces them.
    """
    loss_and_grad = nn.value_and_grad(model, partial(loss_sums, plan=plan))

    def gradients(inputs, targets, mask, weights):
        (weighted_sum, ce_sum), grads = loss_and_grad(model, inputs, targets, mask, weights)
        return weighted_sum, ce_sum, grads

    if not compiled:
        return gradients
    state = [model.state, mx.random.state]
    return partial(mx.compile, inputs=state, outputs=state)(gradients)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int):
    """Linear warmup from 0, then cosine decay to 0 at `total_steps`."""
    decay = optim.cosine_decay(peak, max(total_steps - warmup_steps, 1), 0.0)
    if warmup_steps == 0:
        return decay
    warmup = optim.linear_schedule(0.0, peak, warmup_steps)
    return optim.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(t, schedule) -> optim.Optimizer:
    """The optimizer named by the config (mlx.optimizers), its step size from `schedule`.

    adamw with weight decay 0 is the default (the same numbers as adam). adafactor
    takes the schedule's rate as its step size (relative_step and scale_parameter
    off), so --learning-rate and --warmup-steps mean the same for every optimizer.
    """
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, betas=[t.adam_beta1, t.adam_beta2], eps=t.adam_eps,
                           weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return optim.Adam(learning_rate=schedule, betas=[t.adam_beta1, t.adam_beta2], eps=t.adam_eps)
    if t.optimizer == "sgd":
        return optim.SGD(learning_rate=schedule, momentum=t.sgd_momentum, weight_decay=t.weight_decay,
                         nesterov=t.sgd_nesterov)
    if t.optimizer == "adafactor":
        return optim.Adafactor(learning_rate=schedule, weight_decay=t.weight_decay, relative_step=False,
                               scale_parameter=False)
    raise ValueError(f"unknown optimizer {t.optimizer!r}")


def use_grad_checkpoint(model: nn.Module) -> None:
    """mlx-lm's gradient checkpointing: each transformer block's activations are
    recomputed in the backward pass instead of kept. mlx-lm patches the block's
    class (every block of the model, as in `mlx_lm lora --grad-checkpoint`); done once."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    block_type = type(model.layers[0])
    if not getattr(block_type, "_distrust_grad_checkpoint", False):
        grad_checkpoint(model.layers[0])
        block_type._distrust_grad_checkpoint = True


def step_seed(seed: int, step: int, micro: int) -> int:
    # The MLX generator is reseeded before every micro-batch, so the random
    # stream (dropout) is a function of (seed, step) and a resume needs no RNG state.
    return (seed * 1_000_003 + step * 1_009 + micro) % (2**63)
