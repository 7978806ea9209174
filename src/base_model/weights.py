"""Questions about a model's arrays: names and shapes against another set, bits per layer, sizes."""

from __future__ import annotations


import mlx.nn as nn
from mlx.utils import tree_flatten



def names_mismatch(given: dict, expected: dict) -> str | None:
    """Which array names `given` lacks or has beyond `expected`; None when they are the same."""
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if not missing and not extra:
        return None
    return "; ".join(part for part in (f"missing {len(missing)}, e.g. {missing[0]}" if missing else "",
                                       f"unexpected {len(extra)}, e.g. {extra[0]}" if extra else "") if part)


def shapes_mismatch(given: dict, expected: dict, whose: str, dtypes: bool = True) -> str | None:
    """The first array of `given` whose shape (and dtype) differs from `expected`'s; None if none does."""
    def described(array) -> str:
        return f"{array.dtype if dtypes else ''}{list(array.shape)}"

    for name, array in expected.items():
        if given[name].shape != array.shape or dtypes and given[name].dtype != array.dtype:
            return f"{name} is {described(given[name])}, {whose} is {described(array)}"
    return None


def block_linear_layers(model: nn.Module) -> list[str]:
    """The names, within a block, of the layers mlx-lm can put LoRA on ("self_attn.q_proj",
    "mlp.down_proj", ...), over all blocks, sorted."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    return sorted({name for block in model.layers for name, module in block.named_modules()
                   if isinstance(module, kinds) or hasattr(module, "to_lora")})


def layer_bits(model: nn.Module) -> dict[str, int | None]:
    """{path: bits} of each layer that holds a weight matrix (linear, embedding, experts): its
    quantization's bits, None where it is not quantized. A base need not have one width: a
    GGUF's Q8_0 and Q4_0 tensors are kept as 8- and 4-bit layers (SmolLM2's Q4_1 file has an
    8-bit embedding), and config.json's `bits` is only the most common one."""
    return {path: getattr(module, "bits", None) for path, module in model.named_modules()
            if hasattr(module, "bits") or hasattr(module, "to_quantized")}


def bits_text(bits) -> str:
    """What layers of these bits are, in words: '4-bit' (all alike), 'not quantized', or each width
    with its count, most first ('10 layers 8-bit, 6 4-bit, 2 unquantized')."""
    from collections import Counter

    counts = Counter(bits)
    if not counts:
        return "no layers"
    if len(counts) == 1:
        (width,) = counts
        return f"{width}-bit" if width else "not quantized"
    parts = [f"{count} {f'{width}-bit' if width else 'unquantized'}"
             for width, count in sorted(counts.items(), key=lambda item: (-item[1], -(item[0] or 0)))]
    first, _, width = parts[0].partition(" ")
    return ", ".join([f"{first} layers {width}", *parts[1:]])


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; quantized weights counted as the weights they stand for."""
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model)
