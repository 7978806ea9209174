"""Load a base model with mlx-lm: a hub id, a local folder or a GGUF file; a base that is not
quantized is quantized once into the cache (see prepare_base)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from run_safety.json_files import json_text
from run_safety.errors import UserError
from base_model.builds import BASE_RECORD_FILE, BaseModel, QUANTIZED_FORMAT, QUANT_GROUP_SIZE, QUANT_MODE, build_model_dir_once, first_line, local_model_dir, read_model_config, remove_if_changed
from base_model.tiny import ensure_tiny_model
from run_safety.paths import cache_dir


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    path: str  # what the user named, resolved: an HF id or an absolute local path
    quantized_bits: int | None
    base: BaseModel  # what was loaded (base.path), and from what


def resolve_model(name: str) -> str:
    """`tiny` -> its built directory; a local dir or GGUF file -> its absolute path; else an HF id."""
    if name == "tiny":
        return str(ensure_tiny_model())
    path = Path(name).expanduser()
    if path.is_file():  # a GGUF file (LM Studio, Ollama, llama.cpp): read by base_model/gguf_in.py
        from base_model.gguf_in import resolve_gguf_file

        return resolve_gguf_file(path, name)
    if path.exists():
        from run_safety.input_files import refuse_if_not_regular

        refuse_if_not_regular(path / "config.json", "the model's config.json")  # a link into a blob gone, say
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: not an mlx-lm model directory (no config.json)")
        return str(path.resolve())
    from run_safety.input_files import dangling_link_above

    # ORG/NAME is an HF id, unless ORG is a link here whose target is gone (a disk of models not mounted).
    dangling = dangling_link_above(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1 or dangling
    if looks_like_path:
        raise UserError(f"{name}: model not found (neither a local directory nor an HF id like 'mlx-community/NAME')"
                        f"{dangling}")
    return name


def load_model(name: str, quantize_bits: int, trust_remote_code: bool = False) -> LoadedModel:
    """Load with mlx-lm; a non-quantized base is quantized (group size 64) unless bits is 0.

    The quantization is written once to the cache (see prepare_base) and the
    model is loaded from there: what trains is exactly what the run's
    adapter_config.json names.
    """
    resolved = resolve_model(name)
    base = prepare_base(resolved, quantize_bits, trust_remote_code, shown=name)
    model, tokenizer, model_config = load_with_mlx_lm(base.path, trust_remote_code, shown=name)
    quantization = model_config.get("quantization")
    bits = quantization.get("bits") if quantization else None
    return LoadedModel(model=model, tokenizer=tokenizer, path=resolved, quantized_bits=bits, base=base)


def load_with_mlx_lm(path: str, trust_remote_code: bool, *, shown: str | None = None, adapter_path: str | None = None):
    """mlx_lm.load, its many kinds of failure turned into one UserError line; first, the
    machine's limits that would make MLX fail without a message (machine.py)."""
    from mlx_lm.utils import load

    check_machine_for(path, shown)
    try:
        return load(
            path,
            tokenizer_config={"trust_remote_code": trust_remote_code},
            adapter_path=adapter_path,
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # mlx-lm / huggingface_hub raise many kinds
        raise UserError(f"{shown or path}: cannot load model ({first_line(exc)})") from None


def check_machine_for(path: str, shown: str | None = None) -> None:
    """Before a model is loaded: MLX can compile its kernels, and the address space can hold it."""
    from run_safety import machine

    machine.check_kernel_folder()
    weights = 0
    if Path(path).is_dir():
        with contextlib.suppress(OSError):
            weights = sum(entry.stat().st_size for entry in os.scandir(path)
                          if entry.name.endswith((".safetensors", ".gguf", ".bin", ".npz")))
    machine.check_address_space(weights, f"loading {shown or path}")


def prepare_base(resolved: str, quantize_bits: int, trust_remote_code: bool = False, *,
                 shown: str | None = None) -> BaseModel:
    """What to load for a base resolved by `resolve_model`: the base itself when it is
    already quantized or `quantize_bits` is 0, else its quantized copy, written once.

    The copy is what `mlx_lm convert -q --q-group-size 64` would write (mlx-lm's
    quantize_model and save), so a model loaded from it has exactly the arrays
    of the base quantized in memory; it lives in the cache under a name keyed by
    the content of the base's files, the bits and the group size. It records the
    SHA-256 of its own files: a copy changed in the cache since it was written is
    rebuilt, not trained on. Cost: one quantized copy per base and bit width
    (about 0.28 of the float16 base at 4 bits), shared by every run on it.
    """
    if Path(resolved).is_file():  # a GGUF file: its mlx-lm folder, built once in the cache
        from base_model.gguf_in import prepare_gguf_base

        return prepare_gguf_base(resolved, quantize_bits, shown)
    if quantize_bits <= 0:
        return BaseModel(source=resolved, path=resolved, quantization=None)
    local = local_model_dir(resolved, shown)
    model_config = read_model_config(local, shown)
    if declares_quantization(model_config):
        return BaseModel(source=resolved, path=resolved, quantization=None)
    quantization = {"group_size": QUANT_GROUP_SIZE, "bits": quantize_bits, "mode": QUANT_MODE}
    target = quantized_copy_dir(local, quantization)

    def build(scratch: Path) -> None:
        _write_quantized_copy(local, resolved, scratch, quantization, trust_remote_code, shown)

    remove_if_changed(target)
    build_model_dir_once(target, build, f"the {quantize_bits}-bit copy of {shown or resolved}")
    return BaseModel(source=resolved, path=str(target), quantization=quantization)


def declares_quantization(model_config: dict) -> bool:
    """Whether mlx-lm loads this model already quantized (its own format, or a
    `quantization_config` it converts): such a base is trained as it is."""
    text_config = model_config.get("text_config") or {}
    return any(key in model_config or key in text_config for key in ("quantization", "quantization_config"))


def quantized_copy_dir(local: Path, quantization: dict) -> Path:
    """Where the quantized copy of the base in `local` lives: named for the base,
    keyed by the content of its files (file_identity.base_identity: SHA-256, read
    once and cached), so a changed base never reuses a stale copy, even one edited
    keeping its sizes and times, while the base moved or copied finds it again."""
    from run_safety.file_identity import base_identity

    # By bytes, as before JSON files also recorded their parsed content: a copy already built keeps its name.
    files = {name: {"size": sums["size"], "sha256": sums["sha256"]}
             for name, sums in base_identity(str(local))["files"].items()}
    blob = json.dumps([QUANTIZED_FORMAT, files, quantization], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    # The base's name, cut so that the copy's name and its scratch folder's stay within NAME_MAX.
    name = f"{local.resolve().name[:120]}-{quantization['bits']}bit-g{quantization['group_size']}-{key}"
    return cache_dir() / "quantized" / name


def _write_quantized_copy(local: Path, resolved: str, scratch: Path, quantization: dict, trust_remote_code: bool,
                          shown: str | None) -> None:
    import mlx
    import mlx_lm
    from mlx_lm.utils import quantize_model, save

    model, tokenizer, model_config = load_with_mlx_lm(str(local), trust_remote_code, shown=shown)
    # mlx-lm prints "[INFO] Quantized model with ..." to stdout: everything we say goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        model, model_config = quantize_model(model, model_config, group_size=quantization["group_size"],
                                             bits=quantization["bits"], mode=quantization["mode"])
        # From the local folder, never the HF id: save() would fetch the model card.
        save(scratch, str(local), model, tokenizer, model_config, donate_model=True)
    from run_safety.file_identity import written_sums

    record = {"source": resolved, "local_source": str(local.resolve()), "quantization": quantization,
              "mlx": getattr(mlx.core, "__version__", None), "mlx_lm": getattr(mlx_lm, "__version__", None),
              "files": written_sums(scratch)}
    (scratch / BASE_RECORD_FILE).write_text(json_text(record, indent=2) + "\n", encoding="utf-8")


def tokenizer_key(loaded: LoadedModel) -> str:
    """What identifies how this model tokenizes, for the corpus index cache."""
    tokenizer = loaded.tokenizer
    template = getattr(tokenizer, "chat_template", None) or ""
    blob = json.dumps([loaded.path, len(tokenizer.get_vocab()), tokenizer.eos_token_id,
                       hashlib.sha256(str(template).encode()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
