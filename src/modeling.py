"""Load a base model, quantize it, attach LoRA: mlx-lm does the work.

A base that is not quantized is quantized once, the way `mlx_lm convert -q`
does it, into an ordinary mlx-lm model directory in the cache
(`.cache/quantized/`, keyed by the base's files, bits and group size); training
loads that directory, and a run's adapter_config.json names it. So
`mlx_lm.load(adapter_config["model"], adapter_path=RUN)` is exactly the model
that was trained, not the unquantized base the adapters never saw.
`run_base_model` finds that base again for a finished run (export, generate,
evaluate), rebuilding the quantized copy, or the tiny model, when the project
has moved.

Also builds `tiny`, the demo model: a small Llama with a byte-level BPE
tokenizer trained on the demo corpus, written once as an ordinary mlx-lm model
directory (so `mlx_lm.load` and `mlx_lm generate` take it like any other).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from durable import commit_directory, free_space, left_by_a_dead_process, remove_leftover, sha256_of_file
from json_files import json_text
from errors import UserError

# transformers (under mlx-lm) warns that PyTorch is missing: MLX does the work here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parent.parent
QUANT_GROUP_SIZE = 64
QUANT_MODE = "affine"  # mlx-lm's default: what `mlx_lm convert -q` writes
QUANTIZED_FORMAT = 1  # part of the quantized copies' cache key: bump if how they are made changes
BASE_RECORD_FILE = "distrust_qlora_base.json"  # in a quantized copy: what it was made from

# The demo model: small enough that the README's demo runs in minutes on two
# CPU cores, big enough that its loss visibly falls.
TINY_MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
TINY_SEED = 1234
TINY_BUILDER_VERSION = 1
TINY_SPECIAL_TOKENS = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<eos>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class BaseModel:
    """The base a run trains on: where it comes from and what is loaded."""

    source: str  # what the user named, resolved: an HF id or an absolute local path
    path: str  # what mlx_lm.load takes: the source itself, or its quantized copy in the cache
    quantization: dict | None  # {"group_size", "bits", "mode"} applied on load; None: loaded as it is


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    path: str  # what the user named, resolved: an HF id or an absolute local path
    quantized_bits: int | None
    base: BaseModel  # what was loaded (base.path), and from what


# ---------------------------------------------------------------------------
# loading


def resolve_model(name: str) -> str:
    """`tiny` -> its built directory; a local dir or GGUF file -> its absolute path; else an HF id."""
    if name == "tiny":
        return str(ensure_tiny_model())
    path = Path(name).expanduser()
    if path.is_file():  # a GGUF file (LM Studio, Ollama, llama.cpp): read by gguf_import
        from gguf_import import resolve_gguf_file

        return resolve_gguf_file(path, name)
    if path.exists():
        from input_files import refuse_if_not_regular

        refuse_if_not_regular(path / "config.json", "the model's config.json")  # a link into a blob gone, say
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: not an mlx-lm model directory (no config.json)")
        return str(path.resolve())
    from input_files import dangling_link_above

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
    import machine

    machine.check_kernel_folder()
    weights = 0
    if Path(path).is_dir():
        with contextlib.suppress(OSError):
            weights = sum(entry.stat().st_size for entry in os.scandir(path)
                          if entry.name.endswith((".safetensors", ".gguf", ".bin", ".npz")))
    machine.check_address_space(weights, f"loading {shown or path}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
        from gguf_import import prepare_gguf_base

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


def local_model_dir(resolved: str, shown: str | None = None) -> Path:
    """The local folder of a resolved model: itself, or the HF snapshot (downloaded
    by mlx-lm if not yet there, as loading it would)."""
    path = Path(resolved)
    if path.is_dir():
        return path
    from mlx_lm.utils import _download

    try:
        return Path(_download(resolved))
    except Exception as exc:
        raise UserError(f"{shown or resolved}: cannot load model ({first_line(exc)})") from None


def read_model_config(local: Path, shown: str | None = None) -> dict:
    from mlx_lm.utils import load_config

    try:
        return load_config(local)
    except (OSError, ValueError) as exc:
        raise UserError(f"{shown or local}: cannot load model (config.json: {first_line(exc)})") from None


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
    from file_identity import base_identity

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
    from file_identity import written_sums

    record = {"source": resolved, "local_source": str(local.resolve()), "quantization": quantization,
              "mlx": getattr(mlx.core, "__version__", None), "mlx_lm": getattr(mlx_lm, "__version__", None),
              "files": written_sums(scratch)}
    (scratch / BASE_RECORD_FILE).write_text(json_text(record, indent=2) + "\n", encoding="utf-8")


def remove_if_changed(copy: Path) -> None:
    """A quantized copy whose files are no longer those it recorded when written (changed in the
    cache) is removed, to be built again; one from before copies recorded their files is kept."""
    from file_identity import folder_differs

    try:
        recorded = json.loads((copy / BASE_RECORD_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return  # not there (built next), or not ours to judge
    if not isinstance(recorded, dict):
        return
    problem = folder_differs(copy, recorded, leave_out=(BASE_RECORD_FILE,))
    if problem is None:
        return
    print(f"note: {copy} is not as it was written ({problem}); building it again", file=sys.stderr)
    aside = copy.with_name(f".{copy.name}-changed-{os.getpid()}")
    try:
        os.rename(copy, aside)
    except OSError as exc:
        raise UserError(f"{copy}: changed since it was written, and cannot be moved away to build it again "
                        f"({exc.strerror}); remove it") from None
    shutil.rmtree(aside, ignore_errors=True)


def run_base_model(adapter_config: dict, config) -> BaseModel:
    """The base of a run as it was trained, from the adapter config it saved and its
    Config: the one helper export.py, generate.py and evaluate.py share.

    The run records the base it was given (resolved: an HF id or an absolute
    path) and how it was quantized on load. That base must still be there; its
    quantized copy is rebuilt in this project's cache when it is not (the
    project moved: same base, same bits, same arrays). When the recorded local
    folder is gone and the run used `--model tiny`, the tiny model is rebuilt
    locally, byte for byte.
    """
    record = adapter_config.get("base_model") if isinstance(adapter_config.get("base_model"), dict) else {}
    # Runs from before the record named the base itself in "model".
    recorded = record.get("source") or adapter_config.get("model") or config.model.model
    if Path(recorded).is_absolute() and not Path(recorded).exists():
        if config.model.model == "tiny":
            recorded = resolve_model("tiny")  # rebuilt locally, byte for byte
        else:
            raise UserError(f"base model {recorded} not found (the run was trained on it; restore it or move the run "
                            f"to a machine that has it)")
    # The quantized copy the run names, still here, is exactly what it trained
    # on, even where the base's files were touched since (which changes the key).
    # A copy edited in the cache since it was written is not that: it is built again from its source
    # (whose own identity open_run then checks), as a training start builds it again.
    named, quantization = adapter_config.get("model"), record.get("quantized_on_load")
    if quantization and isinstance(named, str) and _is_quantized_copy_of(Path(named), record.get("source")):
        remove_if_changed(Path(named))
        if _is_quantized_copy_of(Path(named), record.get("source")):
            return BaseModel(source=recorded, path=named, quantization=quantization)
    return prepare_base(recorded, config.model.quantize_bits, config.model.trust_remote_code)


def _is_quantized_copy_of(path: Path, source: str | None) -> bool:
    try:
        made_from = json.loads((path / BASE_RECORD_FILE).read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return False
    return made_from == source and (path / "config.json").is_file()


RESOLVE_ATTEMPTS = 3  # open_run: how often `latest` is looked up again when its checkpoint went meanwhile


@dataclass
class TrainedRun:
    """One checkpoint of a run, verified, with the base it was trained on."""

    run: Path
    checkpoint: Path  # holds adapters.safetensors + adapter_config.json: an mlx-lm adapter folder
    step: int
    config: object  # config.Config of the run
    adapter_config: dict
    base: BaseModel
    adapters: dict  # the checkpoint's adapter arrays, as verified against its manifest


def open_run(run: Path, checkpoint: str, purpose: str, allow_changed_base: bool = False) -> TrainedRun:
    """The run's chosen checkpoint (`latest`, `best`, `final` or a path), checked
    against its manifest, and its base as trained; UserError, one line, otherwise.
    `purpose` completes "no adapters to ..." (export, generate from). A base whose
    files changed since the checkpoint was saved is refused as the resume refuses it,
    unless `allow_changed_base` (then a note says what changed)."""
    from checkpoints import CheckpointCorruptError, CheckpointManager
    from config import Config

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    manager = CheckpointManager(run / "checkpoints")
    if not manager.has_any():
        raise UserError(f"{run}: no checkpoints, so no adapters to {purpose} (has a run been trained here?)")
    for attempt in range(RESOLVE_ATTEMPTS):
        info = manager.resolve(checkpoint)
        try:
            state = manager.load(info)
            break
        except (CheckpointCorruptError, FileNotFoundError) as exc:
            # A run still training here may have removed it meanwhile (retention): `latest`,
            # `best` and `final` then name another one.
            if checkpoint not in ("latest", "best", "final") or info.path.is_dir() or attempt + 1 == RESOLVE_ATTEMPTS:
                raise UserError(str(exc)) from None
    config = Config.from_saved(state.config, source=f"{info.path}/config.json")
    base = run_base_model(state.adapter_config, config)
    check_base_unchanged(state.trainer.get("inputs"), base, state.adapter_config, allow_changed_base)
    return TrainedRun(run=run, checkpoint=info.path, step=state.step, config=config,
                      adapter_config=state.adapter_config, base=base, adapters=state.adapters)


def check_base_unchanged(saved_inputs, base: BaseModel, adapter_config: dict, allow_changed: bool) -> None:
    """UserError when the base as given to the run (`base.source`) no longer has the files the
    checkpoint recorded: the adapters would be fused into, or run on, another model. Not asked
    where the base loaded is the quantized copy the run itself trained on, still there: that
    copy is the model as trained, whatever became of its source since."""
    from file_identity import base_changed

    if base.path != base.source and base.path == adapter_config.get("model"):
        return
    changed = base_changed(saved_inputs, base.source)
    if changed is None:
        return
    said = f"base model {base.source} changed since the run trained on it ({changed})"
    if not allow_changed:
        raise UserError(f"{said}: the adapters were trained on the earlier one; restore it, or give "
                        f"--allow-changed-base to use it as it is now")
    print(f"note: {said}; used as it is now (--allow-changed-base)", file=sys.stderr)


def load_trained_model(trained: TrainedRun):
    """(model, tokenizer, model config) as mlx_lm.load(adapter_path=CHECKPOINT) gives them: the
    base as trained, with mlx-lm's LoRA layers put on and the checkpoint's adapters loaded (in
    eval mode). The adapters are the arrays open_run verified, not the files read again: a run
    still training may have removed the checkpoint since (retention)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer, model_config = load_with_mlx_lm(trained.base.path, trained.config.model.trust_remote_code)
    config = trained.adapter_config
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "full":
        linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"],
                              use_dora=fine_tune_type == "dora")
    leaves = {"lora_a", "lora_b", "m"} if fine_tune_type != "full" else None
    expected = {name: value for name, value in tree_flatten(model.parameters())
                if leaves is None or name.rsplit(".", 1)[-1] in leaves}
    problem = names_mismatch(trained.adapters, expected) or shapes_mismatch(trained.adapters, expected, "the model's",
                                                                             dtypes=False)
    if problem:
        raise UserError(f"{trained.checkpoint}: its adapters do not fit the base {trained.base.path} ({problem})")
    model.load_weights(list(trained.adapters.items()), strict=False)
    model.eval()
    return model, tokenizer, model_config


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
                            f"they are: {' '.join(known)}")
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


def tokenizer_key(loaded: LoadedModel) -> str:
    """What identifies how this model tokenizes, for the corpus index cache."""
    tokenizer = loaded.tokenizer
    template = getattr(tokenizer, "chat_template", None) or ""
    blob = json.dumps([loaded.path, len(tokenizer.get_vocab()), tokenizer.eos_token_id,
                       hashlib.sha256(str(template).encode()).hexdigest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


# ---------------------------------------------------------------------------
# the tiny demo model


def cache_dir() -> Path:
    """Built models (tiny, quantized copies of bases): the project's .cache/ unless
    DISTRUST_QLORA_CACHE names another folder."""
    return Path(os.environ.get("DISTRUST_QLORA_CACHE", REPO_ROOT / ".cache"))


def _tiny_training_texts() -> list[str]:
    """The texts of the demo corpus, in file order: what the tokenizer learns from."""
    texts = []
    corpus = REPO_ROOT / "data" / "train.jsonl"
    if corpus.is_file():
        try:
            handle = open(corpus, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{corpus}: cannot read it to build the tiny model ({exc.strerror})") from None
        with handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if isinstance(record.get("text"), str):
                    texts.append(record["text"])
                for key in ("prompt", "completion"):
                    if isinstance(record.get(key), str):
                        texts.append(record[key])
                for message in record.get("messages") or []:
                    if isinstance(message, dict) and isinstance(message.get("content"), str):
                        texts.append(message["content"])
    if not texts:  # no demo corpus: a fixed paragraph still gives a working tokenizer
        texts = [
            "The measurement was taken at dawn and written down in the field log. "
            "An official statement summarised the consensus of the committee."
        ] * 8
    return texts


def ensure_tiny_model() -> Path:
    """Build the demo model once; its folder name carries what it was built from."""
    texts = _tiny_training_texts()
    digest = hashlib.sha256()
    digest.update(json.dumps([TINY_BUILDER_VERSION, TINY_MODEL_CONFIG, TINY_SEED]).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
    target = cache_dir() / f"tiny-{digest.hexdigest()[:12]}"

    def build(scratch: Path) -> None:
        _write_tiny_tokenizer(scratch, texts)
        _write_tiny_weights(scratch)

    return build_model_dir_once(target, build, "the tiny demo model")


BUILD_MARK = "-build-"  # a model is built as .<name>-build-<random>-<pid> beside where it goes
BUILD_SCRATCH = re.compile(r"^\..+" + re.escape(BUILD_MARK) + r"[0-9a-f]{8}-(\d+)$")
NAME_MAX = 255


def build_model_dir_once(target: Path, build, what: str) -> Path:
    """`target`, built by `build(scratch_dir)` the first time it is asked for.

    Built beside the target, flushed and renamed, so a concurrent or killed
    build never leaves a half-written model that a later run would take; the
    scratch folder of a build that was killed (its name ends with its pid) is
    removed by the next call. A cache that cannot be written is one line: exit 2
    for a folder that is read-only or not allowed, exit 1 for a full disk or an
    I/O error (machine.MachineFault).
    """
    remove_dead_builds(target.parent)
    if (target / "config.json").is_file():
        return target
    suffix = f"{BUILD_MARK}{secrets.token_hex(4)}-{os.getpid()}"
    scratch = target.with_name(f".{target.name[:NAME_MAX - len(suffix) - 1]}{suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"Building {what} in {target} (once) ...", file=sys.stderr)
        scratch.mkdir()
        build(scratch)
        try:
            commit_directory(scratch, target)
        except OSError:
            # Ours not renamed, because another process's build came first: take that one.
            if not (scratch.exists() and (target / "config.json").is_file()):
                raise
    except Exception as exc:
        from machine import unsaid_write_fault

        if not isinstance(exc, (OSError, RuntimeError)) and unsaid_write_fault(exc) is None:
            raise
        raise cache_fault(exc, target, what) from None
    finally:
        if os.path.lexists(scratch):
            remove_leftover(scratch, f"scratch folder of {what}")
    return target


def remove_dead_builds(folder: Path) -> None:
    """The scratch folders of builds whose process is gone (killed during a build: gigabytes
    for a big base); one that cannot be removed is a warning."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if BUILD_SCRATCH.match(entry.name) and left_by_a_dead_process(entry.name):
            if remove_leftover(Path(entry.path), "scratch folder of a build that was killed"):
                print(f"removed the scratch folder of a build that was killed: {entry.path}", file=sys.stderr)


def cache_fault(exc: BaseException, target: Path, what: str) -> Exception:
    """One line for a build that could not be written: UserError where the folder is the
    problem, machine.MachineFault where the disk is."""
    from machine import MachineFault, unsaid_write_fault, write_fault

    unsaid = unsaid_write_fault(exc)  # the tokenizer's save, numpy's short write: no errno
    if unsaid is None and not isinstance(exc, OSError) and "write" not in str(exc).lower():
        return exc  # not a failed write: a bug, with its traceback
    reason = unsaid or (exc.strerror or str(exc) if isinstance(exc, OSError) else first_line(exc))
    blocking = next((p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir's "File exists" says nothing useful here
        reason = f"{blocking} is a file, not a folder"
    from input_files import dangling_link_above

    if dangling := dangling_link_above(target.parent):  # the cache on a disk not mounted: "File exists" too
        reason = dangling.strip(" ()")
    where = f"{target.parent}{'' if 'DISTRUST_QLORA_CACHE' in os.environ else ' (the default cache)'}"
    message = (f"cannot build {what} in {where}: {reason} ({free_space(target.parent)}); free some space or set "
               f"DISTRUST_QLORA_CACHE to a writable folder with room")
    return write_fault(exc, message) if isinstance(exc, OSError) and unsaid is None else MachineFault(message)


def _write_tiny_tokenizer(directory: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_MODEL_CONFIG["vocab_size"],
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[2:],
    )
    wrapped.chat_template = TINY_CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))


def _write_tiny_weights(directory: Path) -> None:
    write_random_llama(directory, TINY_MODEL_CONFIG, TINY_SEED)


def build_random_model(target: Path, overrides: dict, seed: int) -> Path:
    """A model directory like tiny's (same tokenizer) with other dimensions:
    the bigger models of the benchmarks, built locally."""
    tiny = ensure_tiny_model()
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in tiny.iterdir():  # tokenizer files and chat template
        if item.is_file() and not item.name.startswith(("model", "config.json")):
            shutil.copy2(item, target / item.name)
    write_random_llama(target, dict(TINY_MODEL_CONFIG, **overrides), seed)
    return target


def write_random_llama(directory: Path, config: dict, seed: int) -> None:
    """Weights and config.json of a randomly initialized Llama (the tiny model,
    or a bigger one for benchmarks) that uses the tiny model's special tokens."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config = dict(config)
    config["eos_token_id"] = TINY_SPECIAL_TOKENS.index("<eos>")
    config["pad_token_id"] = TINY_SPECIAL_TOKENS.index("<pad>")
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(directory, model)
    save_config(config, Path(directory) / "config.json")
