"""GGUF in: a model file of llama.cpp, LM Studio or Ollama as an ordinary mlx-lm model folder, built once.

`--model FILE.gguf` (an LM Studio file, an Ollama blob: any file that starts
with the GGUF magic) is turned, the first time it is named, into a folder in
the model cache (`.cache/gguf/`) that `mlx_lm.load` takes like any other:

- config.json from the file's metadata (llama.cpp's keys, read with the
  `gguf` package's key names);
- the weights under mlx-lm's names: the `gguf` package's own tensor-name table
  (gguf.get_tensor_name_map) maps each parameter of the mlx-lm model of that
  architecture to the file's tensor, so no name is spelled here. What
  llama.cpp's converter did to a tensor is undone: the rows of the Q and K
  projections of a llama-family model are put back in the order the model
  was trained in (llama.cpp interleaves them for its RoPE), and Gemma's norm
  weights lose the 1 llama.cpp adds to them;
- Q4_0, Q4_1 and Q8_0 tensors are kept exactly as they are: their blocks are
  MLX's affine quantization with group size 32 (4 or 8 bits), so the folder
  holds the file's own numbers, repacked (mx.load repacks them the same way)
  and config.json's quantization section names each layer's bits; nothing is
  quantized twice. The other weights of layers that can be quantized (F32,
  F16, BF16, and any other type: K-quants, Q5_0, IQ..., dequantized by the
  `gguf` package first) are quantized to --quantize-bits (group size 64), as
  a non-quantized base is, with one line that says so (0 keeps them as they
  are); norms and biases stay as the file has them;
- the tokenizer rebuilt from the metadata: transformers' own conversion of a
  GGUF vocabulary (byte-level BPE with merges, SentencePiece/llama, Gemma,
  Phi-3) fed by the `gguf` package's reader (transformers' reader needs
  PyTorch, its conversion does not), with the special tokens, BOS/EOS/pad,
  whether BOS is added, and the chat template written as a Hugging Face
  tokenizer folder.

The folder is keyed by the file's content (its SHA-256, file_identity: the
sum the run's base identity takes, read once and cached) and --quantize-bits,
so a changed file never reuses a stale folder, even one replaced keeping its
size and times (cp -p, rsync -a, touch -r); it records what it was made from
and its own files' sums (base_model.builds.BASE_RECORD_FILE), so a run's base is found
again (base_model.trained_run.run_base_model), rebuilt when the cache was wiped, and rebuilt
when its files were changed in the cache (base_model.builds.remove_if_changed).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from run_safety.errors import UserError
from run_safety.json_files import json_text

GGUF_MAGIC = b"GGUF"
GGUF_BUILD_FORMAT = 3  # part of the built folders' cache key: bump if how they are made changes
KEPT_GROUP_SIZE = 32  # the block of Q4_0, Q4_1 and Q8_0
TOKENIZER_TRANSFORMERS = "5.17"  # the first transformers with transformers.integrations.gguf
SUPPORTED = ("llama (also Mistral, SmolLM, Llama 3)", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def resolve_gguf_file(path: Path, shown: str) -> str:
    """The absolute path of a GGUF file named by --model; UserError when the file is not one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise UserError(f"{shown}: cannot read ({exc.strerror})") from None
    if head != GGUF_MAGIC:
        kind = "not a GGUF file" if path.suffix.lower() == ".gguf" else \
            "neither a GGUF file nor an mlx-lm model directory"
        raise UserError(f"{shown}: {kind} (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r})")
    return str(path.resolve())


# ---------------------------------------------------------------------------
# the cache


def prepare_gguf_base(resolved: str, quantize_bits: int, shown: str | None = None):
    """The BaseModel of a GGUF file: its mlx-lm folder in the cache, built the first time."""
    from base_model.builds import BaseModel, build_model_dir_once, remove_if_changed

    source = Path(resolved)
    target = built_dir(source, quantize_bits)
    remove_if_changed(target)
    build_model_dir_once(target, lambda scratch: build_model_folder(source, scratch, quantize_bits, shown or resolved),
                         f"the mlx-lm model of {shown or resolved}")
    return BaseModel(source=resolved, path=str(target), quantization=_built_quantization(target))


def built_dir(source: Path, quantize_bits: int) -> Path:
    """Where the folder built from `source` lives: named for the file, keyed by its content
    (SHA-256, as the run's base identity: file_identity.file_sha256, cached while the file's
    stat is unchanged) and the bits a tensor that is not kept is quantized to."""
    from run_safety.file_identity import file_sha256, hash_cache
    from base_model.builds import QUANT_GROUP_SIZE
    from run_safety.paths import cache_dir

    identity = [GGUF_BUILD_FORMAT, file_sha256(source, hash_cache())["sha256"], quantize_bits, QUANT_GROUP_SIZE]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
    stem = source.name[:-5] if source.name.lower().endswith(".gguf") else source.name
    return cache_dir() / "gguf" / f"{stem[:48]}-q{quantize_bits}-{key}"


def _built_quantization(target: Path) -> dict | None:
    try:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("quantization") if isinstance(config, dict) else None


# ---------------------------------------------------------------------------
# reading the file


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf") from None
    return gguf


def open_reader(path: Path, shown: str):
    """gguf.GGUFReader over the file; UserError, one line, for a file it cannot read."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError, struct.error) as exc:  # how it fails varies
        raise UserError(f"{shown}: not a readable GGUF file ({_what_went_wrong(exc)})") from None
    if reader.byte_order != "I":
        raise UserError(f"{shown}: a big-endian GGUF file; only little-endian files are read")
    return reader


def _what_went_wrong(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", text)  # "99 is", "np.uint32(99) is"
    if unknown:
        return f"tensor type {unknown.group(1)} is not one the gguf package knows (an unknown quantization type)"
    if text.startswith("cannot reshape array"):  # a tensor's data cut short by the end of the file
        return f"truncated: its tensors run past the end of the file, an incomplete download? ({text})"
    return f"truncated or damaged: {text or type(exc).__name__}"


class Metadata:
    """The file's key-value pairs, read on demand, with the architecture's keys by template."""

    def __init__(self, reader, shown: str):
        self.fields = reader.fields
        self.shown = shown
        self.arch = self.get("general.architecture")
        if not isinstance(self.arch, str):
            raise UserError(f"{shown}: no general.architecture in its metadata (not a model file?)")

    def get(self, key: str, default=None):
        key = key.format(arch=self.arch) if "{arch}" in key else key
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.shown}: metadata {key} cannot be read ({exc})") from None

    def number(self, key: str, kind=int, default=None):
        value = self.get(key, default)
        name = key.format(arch=self.arch)
        if value is None:
            raise UserError(f"{self.shown}: no {name} in its metadata")
        if isinstance(value, list) or isinstance(value, (str, bytes)) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"{self.shown}: metadata {name} is {value!r:.60}, not one number "
                            f"(per-layer values are not supported)")
        return kind(value)


# ---------------------------------------------------------------------------
# config.json, per architecture


def build_config(meta: Metadata, tensors: dict) -> tuple[dict, bool]:
    """(mlx-lm config, whether llama.cpp permuted the Q/K rows of this file)."""
    gguf = _gguf()
    K = gguf.Keys
    arch = meta.arch
    builders = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
                "gemma2": ("gemma2", False), "gemma3": ("gemma3_text", False), "phi3": ("phi3", False)}
    if arch not in builders:
        raise UserError(f"{meta.shown}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED)})")
    model_type, permuted = builders[arch]
    if meta.get(K.LLM.EXPERT_COUNT):
        raise UserError(f"{meta.shown}: a mixture of experts ({meta.get(K.LLM.EXPERT_COUNT)} experts in a {arch} file, "
                        f"as Mixtral's) is not supported")
    hidden = meta.number(K.LLM.EMBEDDING_LENGTH)
    heads = meta.number(K.Attention.HEAD_COUNT)
    blocks = meta.number(K.LLM.BLOCK_COUNT)
    if "token_embd.weight" not in tensors:
        raise UserError(f"{meta.shown}: no token_embd.weight tensor")
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": blocks,
        "intermediate_size": meta.number(K.LLM.FEED_FORWARD_LENGTH),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.number(K.Attention.HEAD_COUNT_KV, default=heads),
        "head_dim": meta.number(K.Attention.KEY_LENGTH, default=hidden // heads),
        "rms_norm_eps": meta.number(K.Attention.LAYERNORM_RMS_EPS, float),
        "rope_theta": meta.number(K.Rope.FREQ_BASE, float, default=10000.0),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    context = meta.get(K.LLM.CONTEXT_LENGTH)
    if context is not None:
        config["max_position_embeddings"] = meta.number(K.LLM.CONTEXT_LENGTH)
    for name, key in (("bos_token_id", K.Tokenizer.BOS_ID), ("eos_token_id", K.Tokenizer.EOS_ID),
                      ("pad_token_id", K.Tokenizer.PAD_ID)):
        if meta.get(key) is not None:
            config[name] = meta.number(key)
    eot = meta.get(K.Tokenizer.EOT_ID)
    if eot is not None and "eos_token_id" in config and int(eot) != config["eos_token_id"]:
        config["eos_token_id"] = [config["eos_token_id"], int(eot)]  # mlx-lm stops at any of them
    rope_dims = meta.number(K.Rope.DIMENSION_COUNT, default=config["head_dim"])
    scaling = _rope_scaling(meta, tensors, config, rope_dims)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
        _require(meta, rope_dims == config["head_dim"], f"rope dimension {rope_dims} is not the head size")
    elif arch == "qwen2":
        _require(meta, config["head_dim"] == hidden // heads, "a head size other than hidden size / heads")
    elif arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(hidden / heads) for the 27B models (46 blocks for
        # Gemma 2, 62 for Gemma 3) and by 1/sqrt(head size) otherwise; the file does not say.
        big = blocks == (46 if arch == "gemma2" else 62)
        config["query_pre_attn_scalar"] = hidden // heads if big else config["head_dim"]
        window = meta.get(K.Attention.SLIDING_WINDOW)
        if window is not None:
            config["sliding_window"] = meta.number(K.Attention.SLIDING_WINDOW)
        if arch == "gemma2":
            config["attn_logit_softcapping"] = meta.number(K.LLM.ATTN_LOGIT_SOFTCAPPING, float, default=50.0)
            config["final_logit_softcapping"] = meta.number(K.LLM.FINAL_LOGIT_SOFTCAPPING, float, default=30.0)
        else:
            config["rope_local_base_freq"] = meta.number(K.Rope.FREQ_BASE_SWA, float, default=10000.0)
            config["sliding_window_pattern"] = _sliding_window_pattern(meta, blocks)
    elif arch == "phi3":
        config["partial_rotary_factor"] = rope_dims / config["head_dim"]
        config["original_max_position_embeddings"] = meta.number(
            K.Rope.SCALING_ORIG_CTX_LEN, default=config.get("max_position_embeddings", 4096))
    return config, permuted


def _sliding_window_pattern(meta: Metadata, blocks: int) -> int:
    """Gemma 3's period of sliding-window layers (every p-th layer is global): the file's number,
    or its per-layer flags (true: sliding) when they repeat so, else llama.cpp's 6."""
    key = _gguf().Keys.Attention.SLIDING_WINDOW_PATTERN
    pattern = meta.get(key)
    if pattern is None:
        return 6
    if not isinstance(pattern, list):
        return meta.number(key)
    period = next((i + 1 for i, sliding in enumerate(pattern) if not sliding), len(pattern) + 1)
    _require(meta, len(pattern) == blocks and all(bool(s) == ((i + 1) % period != 0) for i, s in enumerate(pattern)),
             "sliding-window layers that do not repeat every n-th layer")
    return period


def _require(meta: Metadata, condition: bool, what: str) -> None:
    if not condition:
        raise UserError(f"{meta.shown}: a {meta.arch} model with {what} is not supported")


def _rope_scaling(meta: Metadata, tensors: dict, config: dict, rope_dims: int) -> dict | None:
    K = _gguf().Keys
    if "rope_freqs.weight" in tensors:  # Llama 3.1 and later: per-frequency factors
        return _llama3_scaling(meta, tensors["rope_freqs.weight"], config["rope_theta"], rope_dims)
    if "rope_factors_long.weight" in tensors:  # Phi-3 128k: LongRoPE
        return {"type": "longrope",
                "long_factor": _float_list(tensors["rope_factors_long.weight"]),
                "short_factor": _float_list(tensors.get("rope_factors_short.weight")
                                            or tensors["rope_factors_long.weight"]),
                "original_max_position_embeddings": meta.number(
                    K.Rope.SCALING_ORIG_CTX_LEN, default=config.get("max_position_embeddings", 4096))}
    kind = meta.get(K.Rope.SCALING_TYPE)
    if kind in (None, "none"):
        return None
    factor = meta.number(K.Rope.SCALING_FACTOR, float)
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"type": "yarn", "factor": factor,
                   "original_max_position_embeddings": meta.number(K.Rope.SCALING_ORIG_CTX_LEN)}
        for name, key in (("beta_fast", K.Rope.SCALING_YARN_BETA_FAST), ("beta_slow", K.Rope.SCALING_YARN_BETA_SLOW)):
            if meta.get(key) is not None:
                scaling[name] = meta.number(key, float)
        return scaling
    raise UserError(f"{meta.shown}: rope scaling '{kind}' is not supported (linear, yarn, Llama 3's, LongRoPE are)")


def _float_list(tensor) -> list[float]:
    return [float(x) for x in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]


def _llama3_scaling(meta: Metadata, tensor, base: float, rope_dims: int) -> dict:
    """Llama 3's RoPE scaling as mlx-lm spells it, when the file's per-frequency factors are
    exactly what those parameters give (the ones every Llama 3.1+ model uses); else UserError."""
    factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    factor = float(factors.max())
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    wavelengths = 2 * np.pi * base ** (np.arange(0, rope_dims, 2, dtype=np.float64) / rope_dims)
    old = scaling["original_max_position_embeddings"]
    low_wavelength, high_wavelength = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    smooth = (old / wavelengths - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] -
                                                               scaling["low_freq_factor"])
    expected = np.where(wavelengths < high_wavelength, 1.0,
                        np.where(wavelengths > low_wavelength, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4, atol=1e-6):
        raise UserError(f"{meta.shown}: its rope_freqs are not Llama 3's scaling (factor {factor:g}, low 1, high 4, "
                        f"original context 8192): not supported")
    return scaling


# ---------------------------------------------------------------------------
# tensors


def kept_bits(qtype) -> int | None:
    """The bits of a GGUF type whose blocks are MLX's affine quantization (group size 32)."""
    T = _gguf().GGMLQuantizationType
    return {T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}.get(qtype)


def tensor_shape(tensor) -> tuple[int, ...]:
    """The tensor's shape in numpy / MLX order (GGUF lists the fastest-moving dimension first)."""
    return tuple(int(d) for d in reversed([int(x) for x in tensor.shape]))


def affine_blocks(tensor) -> tuple:
    """A Q4_0, Q4_1 or Q8_0 tensor as MLX's affine quantization, unchanged: (packed uint32
    weight, float16 scales, float16 biases), group size 32. A block holds a float16 scale d
    (and for Q4_1 a float16 minimum m) and 32 integers q: its values are d * (q - 8) (Q4_0),
    d * q + m (Q4_1), d * q with q signed (Q8_0), that is scale d and bias -8d, m, -128d on
    the unsigned q that MLX stores, 8 (4-bit) or 4 (8-bit) to a uint32, lowest bits first."""
    T = _gguf().GGMLQuantizationType
    qtype = tensor.tensor_type
    shape = tensor_shape(tensor)
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    size = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34}[qtype]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // KEPT_GROUP_SIZE, size)
    scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    if qtype == T.Q8_0:
        q = (np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint32)
        biases = scales * np.float16(-128)
        bits = 8
    else:
        packed = blocks[..., 4:] if qtype == T.Q4_1 else blocks[..., 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint32)  # the block's 32 values in order
        biases = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0] if qtype == T.Q4_1 \
            else scales * np.float16(-8)
        bits = 4
    per_word = 32 // bits
    q = q.reshape(rows, cols // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    weight = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    out_shape = shape[:-1]
    return (weight.reshape(*out_shape, -1), scales.reshape(*out_shape, -1), biases.reshape(*out_shape, -1), bits)


def float_tensor(tensor, shown: str):
    """A tensor of any other type as an MLX float array: F32/F16 as they are, BF16 as bfloat16,
    anything else dequantized by the gguf package (to float16, as MLX's own GGUF reader does)."""
    import mlx.core as mx

    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    qtype = tensor.tensor_type
    shape = tensor_shape(tensor)
    data = np.asarray(tensor.data)
    if qtype in (T.F32, T.F16):
        return mx.array(data.reshape(shape))
    if qtype == T.BF16:
        return mx.array(np.ascontiguousarray(data).view(np.uint16).reshape(shape)).view(mx.bfloat16)
    if qtype == T.F64:
        return mx.array(data.reshape(shape).astype(np.float32))
    try:
        values = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
        raise UserError(f"{shown}: tensor {tensor.name} has type {qtype.name}, which cannot be read "
                        f"(no dequantizer for it)") from None
    return mx.array(values.reshape(shape).astype(np.float16))


def unpermute_rows(array, heads: int):
    """Undo llama.cpp's interleaving of a Q or K projection's rows (per head: the first
    and second halves of the rotary pairs, interleaved) on any array with those rows."""
    rows = array.shape[0]
    rest = tuple(array.shape[1:])
    return array.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# ---------------------------------------------------------------------------
# the build


def build_model_folder(path: Path, scratch: Path, quantize_bits: int, shown: str) -> None:
    """Write into `scratch` the mlx-lm model folder of the GGUF file `path`."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, save_config, save_model

    from run_safety.file_identity import written_sums
    from base_model.builds import BASE_RECORD_FILE, QUANT_GROUP_SIZE, QUANT_MODE
    from base_model.weights import names_mismatch, shapes_mismatch

    gguf = _gguf()
    reader = open_reader(path, shown)
    meta = Metadata(reader, shown)
    if meta.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1) not in (None, 1):
        raise UserError(f"{shown}: one part of a split GGUF ({meta.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)} parts): "
                        f"merge them first (llama-gguf-split --merge)")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config, permuted = build_config(meta, tensors)

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    names = gguf_names(model, meta, config)  # GGUF name -> mlx-lm name

    weights, plan, types = {}, {}, {}  # mlx-lm name -> array; module -> its quantization; -> its GGUF type
    for name, tensor in tensors.items():
        if name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            continue  # in config.json's rope_scaling
        target = names.get(name)
        if target is None:
            raise UserError(f"{shown}: tensor {name} has no place in mlx-lm's {config['model_type']} model")
        module, _, suffix = target.rpartition(".")
        types[target] = tensor.tensor_type.name
        if kept_bits(tensor.tensor_type) is not None:
            weight, scales, biases, bits = affine_blocks(tensor)
            arrays = {"weight": mx.array(weight), "scales": mx.array(scales), "biases": mx.array(biases)}
            plan[module] = {"group_size": KEPT_GROUP_SIZE, "bits": bits, "mode": "affine"}
        else:
            arrays = {suffix: float_tensor(tensor, shown)}
            if target.endswith("norm.weight") and config["model_type"].startswith("gemma"):
                arrays[suffix] = arrays[suffix] - 1  # llama.cpp stores Gemma's norm weights plus 1
        heads = _permuted_heads(target, config) if permuted else None
        for key, array in arrays.items():
            weights[f"{module}.{key}"] = unpermute_rows(array, heads) if heads else array
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)

    # Float weights of layers that can be quantized: to --quantize-bits, as a non-quantized base is.
    quantizable = {path for path, module in model.named_modules() if hasattr(module, "to_quantized")}
    requantized = Counter()
    for key in [k for k in weights if k.endswith(".weight")]:
        module = key[:-len(".weight")]
        if module in plan or module not in quantizable or quantize_bits <= 0:
            continue
        if weights[key].shape[-1] % QUANT_GROUP_SIZE:
            continue
        w, s, b = mx.quantize(weights[key], group_size=QUANT_GROUP_SIZE, bits=quantize_bits, mode=QUANT_MODE)
        weights[key], weights[f"{module}.scales"], weights[f"{module}.biases"] = w, s, b
        plan[module] = {"group_size": QUANT_GROUP_SIZE, "bits": quantize_bits, "mode": QUANT_MODE}
        requantized[types[key]] += 1
    if plan:
        nn.quantize(model, class_predicate=lambda p, m: plan.get(p, False))
    expected = dict(tree_flatten(model.parameters()))
    mismatch = names_mismatch(weights, expected) or shapes_mismatch(weights, expected, "mlx-lm's", dtypes=False)
    if mismatch:
        raise UserError(f"{shown}: its tensors do not fit mlx-lm's {config['model_type']} model ({mismatch})")
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())

    if plan:
        config["quantization"] = quantization_section(plan)
    write_tokenizer(reader, meta, scratch)
    save_model(scratch, model, donate_model=True)
    save_config(config, scratch / "config.json")
    kinds = Counter(types.values())
    record = {"source": str(path), "gguf": {"architecture": meta.arch, "tensor_types": dict(kinds)},
              "quantization": config.get("quantization"), "quantize_bits": quantize_bits,
              "files": written_sums(scratch)}  # base_model.builds.remove_if_changed checks them
    (scratch / BASE_RECORD_FILE).write_text(json_text(record, indent=2) + "\n", encoding="utf-8")
    say_what_was_read(shown, config, kinds, requantized, quantize_bits)


def say_what_was_read(shown: str, config: dict, kinds: Counter, requantized: Counter, quantize_bits: int) -> None:
    """One line: the architecture and the tensors' types, which were kept as they are; one
    more when some were dequantized and quantized again."""
    counts = ", ".join(f"{count} {name}" for name, count in sorted(kinds.items()))
    print(f"gguf: {shown}: {config['model_type']}, {config['num_hidden_layers']} blocks; tensors {counts}; "
          f"Q4_0, Q4_1 and Q8_0 kept as they are (group size 32)", file=sys.stderr)
    if requantized:
        what = ", ".join(f"{count} {name}" for name, count in sorted(requantized.items()))
        print(f"note: {what} tensors of {shown} were dequantized and quantized to {quantize_bits} bits "
              f"(group size 64, --quantize-bits): the file's own numbers are not kept for them", file=sys.stderr)


def quantization_section(plan: dict) -> dict:
    """config.json's quantization: the most common bits and group size, and the layers
    quantized otherwise by name (mlx-lm reads a layer's entry before the defaults)."""
    common = Counter((p["group_size"], p["bits"]) for p in plan.values()).most_common(1)[0][0]
    section = {"group_size": common[0], "bits": common[1], "mode": "affine"}
    for module in sorted(plan):
        if (plan[module]["group_size"], plan[module]["bits"]) != common:
            section[module] = dict(plan[module])
    return section


def _permuted_heads(target: str, config: dict) -> int | None:
    if target.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return config["num_attention_heads"]
    if target.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return config["num_key_value_heads"]
    return None


def gguf_names(model, meta: Metadata, config: dict) -> dict:
    """{GGUF tensor name: mlx-lm parameter name} for every parameter of `model`, from the gguf
    package's table of the architecture's tensor names."""
    from mlx.utils import tree_flatten

    gguf = _gguf()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == meta.arch)
    table = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    names = {}
    for name, _ in tree_flatten(model.parameters()):
        base, _, suffix = name.rpartition(".")
        mapped = table.get_name(base)
        if mapped is None:
            raise UserError(f"{meta.shown}: mlx-lm's {config['model_type']} parameter {name} has no GGUF name "
                            f"in the gguf package's table")
        names[f"{mapped}.{suffix}"] = name
    return names


# ---------------------------------------------------------------------------
# the tokenizer


def write_tokenizer(reader, meta: Metadata, directory: Path) -> None:
    """The file's tokenizer as a Hugging Face tokenizer folder (tokenizer.json and its config)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    K = _gguf().Keys.Tokenizer
    tokens = meta.get(K.LIST)
    if not tokens:
        raise UserError(f"{meta.shown}: no tokenizer in its metadata ({K.LIST})")
    hf_json = meta.get(K.HF_JSON)
    if hf_json:
        backend = Tokenizer.from_str(hf_json)
    else:
        backend = _converted_tokenizer(meta, tokens)

    def token(key):
        index = meta.get(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos, unk, pad = token(K.BOS_ID), token(K.EOS_ID), token(K.UNK_ID), token(K.PAD_ID)
    model_kind = meta.get(K.MODEL)
    add_bos = meta.get(K.ADD_BOS)
    add_bos = bool(add_bos) if add_bos is not None else model_kind == "llama"  # llama.cpp's default
    add_eos = bool(meta.get(K.ADD_EOS) or False)
    if not hf_json:
        first = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        pair = first + [piece.replace("$A", "$B").replace(":0", ":1") for piece in first]
        specials = [(t, tokens.index(t)) for t in dict.fromkeys(x for x in (bos if add_bos else None,
                                                                            eos if add_eos else None) if x)]
        backend.post_processor = processors.TemplateProcessing(single=" ".join(first), pair=" ".join(pair),
                                                               special_tokens=specials)
    pre = meta.get(K.PRE)
    if pre == "smollm" and not hf_json:  # SmolLM's own: every digit on its own, then GPT-2's byte-level split
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
                                      pad_token=pad, add_bos_token=add_bos, add_eos_token=add_eos)
    template = meta.get(K.CHAT_TEMPLATE)
    if isinstance(template, str) and template:
        wrapped.chat_template = template
    wrapped.save_pretrained(str(directory))


def _converted_tokenizer(meta: Metadata, tokens: list):
    K = _gguf().Keys.Tokenizer
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        import transformers

        raise UserError(f"reading the tokenizer of a GGUF file needs transformers {TOKENIZER_TRANSFORMERS} or "
                        f"newer (this is {transformers.__version__}): pip install -U "
                        f"'transformers>={TOKENIZER_TRANSFORMERS}'") from None
    spec = {"tokenizer_type": meta.get(K.MODEL), "pre_tokenizer_type": meta.get(K.PRE), "tokens": tokens}
    for name, key in (("scores", K.SCORES), ("token_type", K.TOKEN_TYPE), ("merges", K.MERGES),
                      ("bos_token_id", K.BOS_ID), ("eos_token_id", K.EOS_ID), ("unk_token_id", K.UNK_ID),
                      ("pad_token_id", K.PAD_ID), ("add_prefix_space", K.ADD_PREFIX)):
        value = meta.get(key)
        if value is not None:
            spec[name] = value
    try:
        backend, _ = convert_gguf_tokenizer(meta.arch, spec)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{meta.shown}: its tokenizer ({spec['tokenizer_type']!r}) cannot be rebuilt "
                        f"({' '.join(str(exc).split())})") from None
    if spec["tokenizer_type"] == "llama" and not meta.arch.startswith("gemma"):
        _spaces_as_llama_cpp(backend, spec.get("add_prefix_space", True))
    return _only_the_files_tokens(backend, len(tokens))


def _only_the_files_tokens(backend, count: int):
    """The tokenizer without the tokens transformers' conversion adds beyond the file's `count`:
    its GPT-2 tokenizer adds `<|endoftext|>` (its default unk, bos and eos) to a byte-level
    vocabulary that has none, as Llama 3's, an id past the embedding's rows (export --gguf refuses
    it; a text holding it would read past the embedding)."""
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    added = spec.get("added_tokens") or []
    if all(entry["id"] < count for entry in added):
        return backend
    spec["added_tokens"] = [entry for entry in added if entry["id"] < count]
    return Tokenizer.from_str(json.dumps(spec))


def _spaces_as_llama_cpp(backend, prefix_space: bool) -> None:
    """A SentencePiece vocabulary's spaces as llama.cpp (and Llama's and Mistral's own
    tokenizer.json) make them: every space a U+2581, and one more before each stretch of text
    that starts the input or follows a special token, when the file says to add it (its
    add_space_prefix, true unless it says otherwise). transformers' Metaspace adds none before a
    text that already starts with a space: "  two" would lose one."""
    from tokenizers import normalizers

    steps = [normalizers.Prepend("\u2581")] if prefix_space else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
