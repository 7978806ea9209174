"""Float compute for a quantized base on MLX's CPU backend (--float-base auto|on|off).

On the CPU, MLX's 4-bit `quantized_matmul` uses no BLAS: measured 30-44x slower than the
same product in float32 through OpenBLAS, at every shape tried. So where the backend is the
CPU and the copy fits, the frozen quantized layers of the base (QuantizedLinear, the one
inside mlx-lm's LoRALinear/DoRALinear as `.linear` included; QuantizedEmbedding, which is
also the tied output layer through as_linear; QuantizedSwitchLinear) are replaced by float32
layers holding their dequantized weights (mx.dequantize): the same function up to rounding,
the one QLoRA's adapters are trained against. The replacement layers are frozen like the
ones they replace; the adapters are the only trainable parameters, and the files a run
writes are the same: adapters of the quantized base, which `mlx_lm.load(base,
adapter_path=...)` loads on the 4-bit base (adapter_config.json still names it).

auto: on where MLX's default device is the CPU and the copy fits (the process's MLX memory
now plus the float32 weights within half the memory limit of the pre-flight,
memory_check.memory_limit, so that half stays for the batch); off on Metal and CUDA, where
4-bit kernels are fast. on: always (where the base has quantized layers). off: never.

Not part of the settings a resume must match (Config.fingerprint_fields): like
--grad-checkpoint it changes how the same function is computed, not what is learned. The
checkpoint records which way its run computed (trainer.DistrustTrainer.arithmetic), and a
resume that computes the other way says that it continues up to float rounding, not bit
for bit.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

FIT_SHARE = 0.5  # auto: the MLX memory with the float copy stays within this share of the memory limit


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every quantized layer the float copy replaces."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]


def copy_sizes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the float32 copies, bytes of the quantized weights they replace)."""
    float_bytes = quantized_bytes = 0
    for _, layer in quantized_layers(model):
        *outer, packed = layer.weight.shape
        elements = packed * 32 // layer.bits
        for size in outer:
            elements *= size
        float_bytes += 4 * elements
        quantized_bytes += sum(getattr(layer, name).nbytes for name in ("weight", "scales", "biases")
                               if getattr(layer, name, None) is not None)
    return float_bytes, quantized_bytes


def choose(setting: str, model: nn.Module) -> tuple[bool, str]:
    """(whether the base computes with float32 copies, why) for --float-base `setting`."""
    if setting == "off":
        return False, "--float-base off"
    if not quantized_layers(model):
        return False, "the base has no quantized layers"
    if setting == "on":
        return True, "--float-base on"
    if mx.default_device() != mx.cpu:
        return False, "not on the CPU (4-bit kernels are fast on the GPU)"
    import os

    from run_safety.errors import UserError
    from run_safety.sizes import size_text
    from training.memory_check import memory_limit

    float_bytes, _ = copy_sizes(model)
    try:
        limit, source = memory_limit()
    except UserError:  # a DISTRUST_QLORA_MEMORY_LIMIT that is no size, under --no-memory-check (refused with it)
        limit, source = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    needed = mx.get_active_memory() + float_bytes
    if needed > FIT_SHARE * limit:
        return False, (f"the float32 copy ({size_text(float_bytes)}) would leave less than half of the "
                       f"{size_text(limit)} of {source} for the batch")
    return True, "--float-base auto: the CPU backend, and the copy fits"


def apply(setting: str, model: nn.Module) -> tuple[bool, str]:
    """choose(setting, model), and the float32 copies put in place when it says so: what training
    and evaluate.py (computing as the run trained) both do."""
    on, why = choose(setting, model)
    if on:
        use_float_base(model)
    return on, why


def use_float_base(model: nn.Module) -> int:
    """Replace the quantized layers of `model` by frozen float32 layers holding their
    dequantized weights (their biases kept as they are); returns how many were replaced."""
    from mlx_lm.models.switch_layers import SwitchLinear

    replaced = []
    for name, layer in quantized_layers(model):
        weight = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits,
                               mode=getattr(layer, "mode", "affine"), dtype=mx.float32)
        has_bias = "bias" in layer
        if isinstance(layer, nn.QuantizedEmbedding):
            copy = nn.Embedding(*weight.shape)
        elif isinstance(layer, nn.QuantizedLinear):
            copy = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        else:  # QuantizedSwitchLinear: (experts, out, in)
            copy = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias=has_bias)
        copy.weight = weight
        if has_bias:
            copy.bias = layer.bias
        copy.freeze()
        mx.eval(copy.parameters())  # one layer at a time: the quantized one can go before the next is made
        replaced.append((name, copy))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def float_base_line(on: bool, why: str, sizes: tuple[int, int], bits: str) -> str:
    """The start line: which way the base computes, and the memory the copy costs."""
    from run_safety.sizes import size_text

    if not on:
        return f"base: computes in its quantized form ({bits}): {why}"
    float_bytes, quantized_bytes = sizes
    return (f"base: computes with float32 copies of its quantized layers ({why}): {size_text(float_bytes)} in place "
            f"of {size_text(quantized_bytes)} ({size_text(float_bytes - quantized_bytes)} more); the adapters "
            f"stay adapters of the {bits} base (--float-base off: compute in the quantized form)")
