"""mlx-lm's LoRA (and DoRA) layers on a base, the adapters' files and the adapter_config.json
that lets mlx_lm.load(base, adapter_path=RUN) load them."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from run_safety.durable import sha256_of_file
from run_safety.errors import UserError
from base_model.builds import BaseModel, first_line
from base_model.weights import block_linear_layers, names_mismatch, shapes_mismatch


def full_key_names(unknown: list, known: list) -> str:
    """'; did you mean self_attn.q_proj?' for the short names PEFT's target_modules use (q_proj),
    each matched to the one layer of the block whose name ends with it; nothing when none is."""
    meant = []
    for key in unknown:
        ends = [name for name in known if name.endswith("." + key.split(".")[-1])]
        if len(ends) == 1:
            meant.append(ends[0])
    return f" (did you mean {' '.join(meant)}?)" if meant else ""


def attach_lora(model: nn.Module, rank: int, alpha: float, layers: int, dropout: float, seed: int, *,
                fine_tune_type: str = "lora", keys: list | None = None,
                keys_named: str = "--lora-keys") -> tuple[int, str | None]:
    """Freeze the base and put mlx-lm LoRA layers (DoRA layers with `fine_tune_type`
    "dora") on the last `layers` blocks: on the linear layers of each block named in
    `keys` (as mlx-lm names them, "self_attn.q_proj"), or on every one of them.

    Returns the number of blocks that got them and a note when the request was
    more than the model has (what follows the setting's name: "16 is more than ..."). The LoRA A matrices are drawn from `seed`. A key that
    is not a linear layer of the model's blocks is a UserError (`keys_named`: what
    the user called the setting) listing the ones there are.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if keys:
        known = block_linear_layers(model)
        unknown = [key for key in keys if key not in known]
        if unknown:
            what = "is not a linear layer" if len(unknown) == 1 else "are not linear layers"
            raise UserError(f"{keys_named}: {', '.join(map(repr, unknown))} {what} of this model's blocks; "
                            f"they are: {' '.join(known)}{full_key_names(unknown, known)}")
    total = len(model.layers)
    note = None
    if layers == -1:
        num_layers = total
    elif layers > total:
        num_layers = total
        note = f"{layers} is more than the model's {total} layers; using all {total}"
    else:
        num_layers = layers
    model.freeze()
    mx.random.seed(seed)
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters(rank, alpha, dropout, keys),
                              use_dora=fine_tune_type == "dora")
    except ValueError as exc:  # e.g. a layer kind mlx-lm has no DoRA for
        raise UserError(f"--fine-tune-type {fine_tune_type}: {first_line(exc)}") from None
    return num_layers, note


def adapters_file(path: str | Path) -> Path:
    """The adapters file of `path`: the file itself, or a run or mlx-lm adapter
    folder's adapters.safetensors. UserError when there is none."""
    path = Path(path).expanduser()
    candidate = path / "adapters.safetensors" if path.is_dir() else path
    if not candidate.is_file():
        where = f"{path} holds no adapters.safetensors" if path.is_dir() else f"{path}: no such adapters file"
        raise UserError(f"--init-adapters: {where} (give a run folder, an mlx-lm adapter folder or a .safetensors "
                        f"file)")
    return candidate


def adapters_signature(path: str | Path) -> dict:
    """What identifies the adapters a run started from, by content: a resume compares it."""
    candidate = adapters_file(path)
    try:
        resolved = candidate.resolve()  # the user's own link is followed on purpose
        return {"size": resolved.stat().st_size, "sha256": sha256_of_file(resolved)}
    except OSError as exc:
        raise UserError(f"--init-adapters: {candidate}: cannot read ({exc.strerror})") from None


def load_init_adapters(model: nn.Module, path: str | Path) -> str:
    """Put the adapters of `path` into the model's LoRA (or DoRA) layers, after checking
    that they are exactly this model's adapters: the same names and shapes (the same
    blocks, rank, kind). Returns what was loaded, for the start line."""
    candidate = adapters_file(path)
    try:
        loaded = mx.load(str(candidate))
    except Exception as exc:  # not a safetensors file, or a damaged one
        raise UserError(f"--init-adapters: {candidate}: cannot read adapters ({first_line(exc)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--init-adapters: {candidate}: not a safetensors file of arrays")
    expected = adapter_weights(model)
    names = names_mismatch(loaded, expected)
    if names:
        raise UserError(f"--init-adapters: {candidate} does not fit this run's adapters ({names}): use the same "
                        f"--lora-layers, --lora-keys, --fine-tune-type and model as the run that made them")
    shapes = shapes_mismatch(loaded, expected, "this run's", dtypes=False)  # cast to the layers' dtype below
    if shapes:
        raise UserError(f"--init-adapters: {candidate}: {shapes} (use the same --lora-rank and model as the run "
                        f"that made them)")
    model.load_weights([(name, value.astype(expected[name].dtype)) for name, value in loaded.items()], strict=False)
    mx.eval(model.trainable_parameters())
    return f"{candidate} ({len(loaded)} arrays)"


def lora_parameters(rank: int, alpha: float, dropout: float, keys: list | None = None) -> dict:
    # mlx-lm's LoRA multiplies by `scale`; the usual alpha / rank convention. `keys` only when
    # chosen: mlx-lm then converts exactly those layers (loading and fusing alike).
    return {"rank": rank, "scale": alpha / rank, "dropout": dropout, **({"keys": list(keys)} if keys else {})}


def adapter_config(model_path: str, num_layers: int, rank: int, alpha: float, dropout: float,
                   base: BaseModel | None = None, fine_tune_type: str = "lora", keys: list | None = None) -> dict:
    """What mlx_lm needs to rebuild the LoRA layers, plus the base model.

    With `base`, "model" names what was loaded (the quantized copy, when the
    base was quantized on load), so that `mlx_lm.load(config["model"],
    adapter_path=...)` and `mlx_lm generate --model ... --adapter-path ...` run
    the model that was trained; "base_model" records where it came from, for
    run_base_model.
    """
    config = {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(rank, alpha, dropout, keys),
        "model": base.path if base is not None else model_path,
    }
    if base is not None:
        config["base_model"] = {"source": base.source, "quantized_on_load": base.quantization}
    return config


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))
