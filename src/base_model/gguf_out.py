"""A GGUF file for llama.cpp, LM Studio and Ollama, written from an mlx-lm model
with the `gguf` package's writer: what llama.cpp's own converter writes for the
same model, for the families people fine-tune.

    plan = plan_gguf(config, tokenizer_dir, tokenizer, "q8_0")   # UserError if it cannot be written
    write_gguf(plan, model, path, name)                         # model: unquantized (fused) mlx-lm model
    export_model_dir(model_dir, path, "f16")                    # both, for any mlx-lm model folder

Architectures (mlx-lm `model_type` -> llama.cpp): llama, mistral and mixtral ->
`llama` (Q and K rows permuted to llama.cpp's RoPE layout, experts stacked),
qwen2, qwen3, gemma2, gemma3 / gemma3_text (norm weights + 1, as llama.cpp's
Gemma reads them; soft-capping, sliding windows), phi3 (fused qkv and gate_up).
Tensor names come from the `gguf` package's tables (gguf.get_tensor_name_map),
metadata keys from its writer (gguf.Keys).

Vocabularies: byte-level BPE (`gpt2`, with the pre-tokenizer llama.cpp names
for its split: gpt-2, smollm, llama-bpe, qwen2, gpt-4o) and SentencePiece-like
BPE with byte fallback (`llama`; scores from the merge ranks, so that
llama.cpp's SentencePiece tokenizer merges in the order the BPE model does).
Special tokens, BOS/EOS/UNK/PAD, whether BOS is added (as the tokenizer does
it), the chat template. A vocabulary shorter than the embedding is padded with
unused tokens, as llama.cpp's converter does.

Types: f16 (every matrix float16), q8_0, q4_0 (matrices whose rows are a
multiple of 32 quantized by gguf.quants; for q4_0 the output matrix, or the
tied embedding, in q8_0, as llama.cpp's quantizer keeps it higher). Norms,
biases, the MoE router and RoPE factors stay float32 in every type.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from run_safety.errors import UserError

GGUF_TYPES = ("f16", "q8_0", "q4_0")  # what export.py --gguf-type offers
REFERENCE_TYPE = "f32"  # every tensor float32: the parity bench's reference, not offered to users

# mlx-lm model_type -> llama.cpp architecture name (gguf.MODEL_ARCH_NAMES)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3"}

# The split of a byte-level BPE vocabulary -> llama.cpp's name for it (tokenizer.ggml.pre). A split is
# ("bytelevel",) for GPT-2's own, ("digits", "bytelevel") for SmolLM's, or the Split regex before a
# ByteLevel without its own regex (Llama 3, Qwen2, GPT-4o as Phi-4 has it).
PRE_TOKENIZERS = {
    ("bytelevel",): "gpt-2",
    ("digits", "bytelevel"): "smollm",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
     r"|\s+(?!\S)|\s+",): "llama-bpe",
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
     r"|\s+(?!\S)|\s+",): "qwen2",
    (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
     r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
     r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "gpt-4o",
}

# mlx-lm's names for what the gguf tables know under the Hugging Face names.
MLX_LM_NAMES = [
    (re.compile(r"^language_model\."), ""),  # gemma3: the text model inside the multimodal wrapper
    (re.compile(r"block_sparse_moe\.switch_mlp\.gate_proj"), "block_sparse_moe.experts.w1"),  # mixtral: stacked
    (re.compile(r"block_sparse_moe\.switch_mlp\.down_proj"), "block_sparse_moe.experts.w2"),
    (re.compile(r"block_sparse_moe\.switch_mlp\.up_proj"), "block_sparse_moe.experts.w3"),
]
QUANT_BLOCK = 32  # Q8_0 and Q4_0 quantize rows in blocks of 32
FALLBACK = "export without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py"


@dataclass
class Vocabulary:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-like)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]  # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None
    strips_after_specials: bool  # special tokens that swallow the white space after them (Phi-3's)


@dataclass
class GGUFPlan:
    """What will be written, decided before anything is: the architecture, the
    model's hyper-parameters as mlx-lm reads them, the vocabulary, the type."""

    arch: str
    model_type: str
    args: object  # the mlx-lm ModelArgs of the (text) model
    config: dict
    vocabulary: Vocabulary
    gguf_type: str


# ---------------------------------------------------------------------------
# the plan: every refusal happens here, before a file is opened


def plan_gguf(config: dict, tokenizer_dir: Path, tokenizer, gguf_type: str = "f16") -> GGUFPlan:
    """The plan for writing this model, or UserError naming why it cannot be written."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"--gguf: writes llama, mistral, mixtral, qwen2, qwen3, gemma2, gemma3 and phi3 models, "
                        f"and this base is {model_type!r}; {FALLBACK}")
    if gguf_type not in GGUF_TYPES + (REFERENCE_TYPE,):
        raise UserError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    args, text_config = model_args(config)
    rope = rope_scaling(args)
    kind = rope.get("rope_type") or rope.get("type") if rope else None
    supported = {"llama": (None, "default", "linear", "llama3"), "qwen2": (None, "default", "linear"),
                 "qwen3": (None, "default", "linear"), "gemma2": (None, "default"),
                 "gemma3": (None, "default", "linear"), "phi3": (None, "default", "longrope", "su")}
    if kind not in supported[ARCHITECTURES[model_type]]:
        raise UserError(f"--gguf: the base's RoPE scaling {kind!r} is not written for {model_type} models; {FALLBACK}")
    vocabulary = read_vocabulary(Path(tokenizer_dir), tokenizer, int(args.vocab_size))
    return GGUFPlan(ARCHITECTURES[model_type], model_type, args, text_config, vocabulary, gguf_type)


def model_args(config: dict):
    """(mlx-lm's ModelArgs of the text model, its config): the values the MLX model computes with,
    defaults included."""
    model_type = config["model_type"]
    module = importlib.import_module(f"mlx_lm.models.{'llama' if model_type == 'mistral' else model_type}")
    args = module.ModelArgs.from_dict(config)
    if model_type == "gemma3":  # the multimodal wrapper: its text model's arguments
        text = importlib.import_module("mlx_lm.models.gemma3_text")
        return text.ModelArgs.from_dict(args.text_config), dict(args.text_config)
    return args, config


def rope_scaling(args) -> dict | None:
    scaling = getattr(args, "rope_scaling", None)
    return scaling if isinstance(scaling, dict) else None


# ---------------------------------------------------------------------------
# the vocabulary


def read_vocabulary(tokenizer_dir: Path, tokenizer, rows: int) -> Vocabulary:
    """The vocabulary in llama.cpp's terms, from tokenizer.json and the tokenizer's behaviour."""
    import gguf

    try:
        spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"--gguf: the base {tokenizer_dir} has no readable tokenizer.json; {FALLBACK}") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"--gguf: the base's vocabulary is a {model.get('type')} model; GGUF export writes BPE "
                        f"vocabularies (byte-level or with byte fallback); {FALLBACK}")
    byte_level = any(piece.get("type") == "ByteLevel" for piece in _pieces(spec.get("pre_tokenizer")))
    if byte_level:
        kind, pre = "gpt2", _pre_tokenizer_name(spec)
        if pre is None:
            raise UserError(f"--gguf: the base's byte-level vocabulary splits text in a way llama.cpp has no name "
                            f"for here (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); {FALLBACK}")
        space_prefix = None
    elif model.get("byte_fallback"):
        kind, pre = "llama", None
        space_prefix = _space_prefix(spec)
        if space_prefix is None:
            raise UserError(f"--gguf: the base's SentencePiece-like vocabulary marks words in a way llama.cpp "
                            f"cannot reproduce; {FALLBACK}")
    else:
        raise UserError(f"--gguf: the base's BPE vocabulary is neither byte-level nor with byte fallback; {FALLBACK}")

    vocab = dict(model.get("vocab") or {})
    added = {entry["id"]: entry for entry in spec.get("added_tokens") or []}
    for entry in added.values():
        vocab[entry["content"]] = entry["id"]
    size = max(rows, max(vocab.values()) + 1)
    if size > rows:
        raise UserError(f"--gguf: the tokenizer has {size} tokens and the model's embedding {rows} rows")
    tokens = [f"[PAD{index}]" for index in range(rows)]
    types = [gguf.TokenType.UNUSED] * rows
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.NORMAL
    unk = model.get("unk_token")
    for text, index in vocab.items():
        if index in added:
            types[index] = gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[index] = gguf.TokenType.BYTE
        elif unk is not None and text == unk:
            types[index] = gguf.TokenType.UNKNOWN

    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model.get("merges") or []]
    if any(len(merge.split(" ")) != 2 for merge in merges):
        raise UserError(f"--gguf: the base's merges hold a space inside a token; {FALLBACK}")
    scores = None
    if kind == "llama":
        # llama.cpp's SentencePiece tokenizer merges the best-scored pair first; BPE merges by rank.
        scores = [-float(len(merges) + 1)] * rows
        for rank, merge in enumerate(merges):
            index = vocab.get(merge.replace(" ", ""))
            if index is not None and scores[index] < -rank:
                scores[index] = -float(rank)
        merges = None

    plain, special = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(value, int) and 0 <= value < rows:
            ids[role] = value
    template = getattr(tokenizer, "chat_template", None)
    return Vocabulary(
        model=kind, pre=pre, tokens=tokens, types=[int(value) for value in types], scores=scores, merges=merges,
        special_ids=ids,
        add_bos="bos" in ids and special[:1] == [ids["bos"]] != plain[:1],
        add_eos="eos" in ids and special[-1:] == [ids["eos"]] != plain[-1:],
        add_space_prefix=space_prefix,
        chat_template=template if isinstance(template, str) and template else None,
        strips_after_specials=any(entry.get("rstrip") for entry in added.values() if entry.get("special")),
    )


def _pieces(node) -> list[dict]:
    """A tokenizer.json component, or the members of a Sequence, flattened."""
    if not isinstance(node, dict):
        return []
    members = node.get("pretokenizers") or node.get("normalizers") or []
    if node.get("type") == "Sequence":
        return [piece for member in members for piece in _pieces(member)]
    return [node]


def _pre_tokenizer_name(spec: dict) -> str | None:
    normalizers = [piece.get("type") for piece in _pieces(spec.get("normalizer"))]
    if any(kind != "NFC" for kind in normalizers):
        return None  # llama.cpp's BPE tokenizer normalizes nothing (NFC text is unchanged by it)
    key = []
    for piece in _pieces(spec.get("pre_tokenizer")):
        kind = piece.get("type")
        if kind == "ByteLevel":
            if piece.get("add_prefix_space"):
                return None
            if piece.get("use_regex", True):
                key.append("bytelevel")
        elif kind == "Digits" and piece.get("individual_digits"):
            key.append("digits")
        elif kind == "Split" and piece.get("behavior") == "Isolated" and not piece.get("invert"):
            key.append((piece.get("pattern") or {}).get("Regex"))
        else:
            return None
    return PRE_TOKENIZERS.get(tuple(key))


def _space_prefix(spec: dict) -> bool | None:
    """Whether a SentencePiece-like vocabulary puts U+2581 before the first word (True: Llama 2,
    Mistral, Phi-3; False: Gemma); None when words are marked some other way."""
    normalizers = _pieces(spec.get("normalizer"))
    pre = _pieces(spec.get("pre_tokenizer"))
    replaces = [piece for piece in normalizers if piece.get("type") == "Replace"
                and (piece.get("pattern") or {}).get("String") == " " and piece.get("content") == "\u2581"]
    prepends = [piece for piece in normalizers if piece.get("type") == "Prepend" and piece.get("prepend") == "\u2581"]
    if replaces and not pre and len(normalizers) == len(replaces) + len(prepends):
        return bool(prepends)
    metaspace = [piece for piece in pre if piece.get("type") == "Metaspace"]
    if len(metaspace) == 1 == len(pre) and not normalizers and metaspace[0].get("replacement") == "\u2581":
        scheme = metaspace[0].get("prepend_scheme", "always" if metaspace[0].get("add_prefix_space", True) else "never")
        return scheme in ("first", "always")
    return None


# ---------------------------------------------------------------------------
# tensors


@dataclass
class TensorPlan:
    name: str  # in the GGUF
    source: str | None  # the mlx-lm parameter, or None for a tensor computed here (RoPE factors)
    shape: tuple
    qtype: object  # gguf.GGMLQuantizationType


def gguf_name(name_map, arch: str, name: str) -> str:
    for pattern, replacement in MLX_LM_NAMES:
        name = pattern.sub(replacement, name)
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UserError(f"--gguf: the {arch} model has a tensor {name!r} that llama.cpp does not know")
    return mapped


def tensor_type(plan: GGUFPlan, name: str, shape: tuple, tied: bool):
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")) or name.startswith("rope_"):
        return T.F32
    if plan.gguf_type == REFERENCE_TYPE:
        return T.F32
    if plan.gguf_type == "f16" or shape[-1] % QUANT_BLOCK:
        return T.F16
    if plan.gguf_type == "q8_0":
        return T.Q8_0
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    return T.Q8_0 if output else T.Q4_0


def plan_tensors(plan: GGUFPlan, shapes: dict[str, tuple]) -> list[TensorPlan]:
    import gguf

    arch = gguf.MODEL_ARCH[plan.arch.upper()]
    name_map = gguf.get_tensor_name_map(arch, int(plan.args.num_hidden_layers))
    names = {source: gguf_name(name_map, plan.arch, source) for source in shapes}
    tied = "output.weight" not in names.values()
    tensors = [TensorPlan(names[source], source, shape, tensor_type(plan, names[source], shape, tied))
               for source, shape in shapes.items()]
    for name, values in extra_tensors(plan).items():
        tensors.append(TensorPlan(name, None, values.shape, tensor_type(plan, name, values.shape, tied)))

    def order(tensor: TensorPlan):
        block = re.match(r"blk\.(\d+)\.", tensor.name)
        return (0 if tensor.name.startswith(("token_embd", "rope_")) else 1 if block else 2,
                int(block[1]) if block else 0, tensor.name)

    return sorted(tensors, key=order)


def extra_tensors(plan: GGUFPlan) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that are no parameter: RoPE frequency factors."""
    args, rope = plan.args, rope_scaling(plan.args) or {}
    kind = rope.get("rope_type") or rope.get("type")
    if plan.arch == "llama" and kind == "llama3":
        dims = head_dim(args)
        periods = float(args.rope_theta) ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
        factor = float(rope["factor"])
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        context = float(rope.get("original_max_position_embeddings", 8192))
        wavelengths = 2 * math.pi * periods
        smooth = (context / wavelengths - low) / (high - low)
        factors = np.where(wavelengths > context / low, factor, 1.0)
        medium = (wavelengths > context / high) & (wavelengths < context / low)
        factors = np.where(medium, 1.0 / ((1 - smooth) / factor + smooth), factors)
        return {"rope_freqs.weight": factors.astype(np.float32)}
    if plan.arch == "phi3" and kind in ("longrope", "su"):
        return {"rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32)}
    return {}


def head_dim(args) -> int:
    return int(getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads)


def permute_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows from the rotate-half RoPE layout (Hugging Face, mlx-lm) to llama.cpp's interleaved one,
    per head: rows (x0..x_{d/2-1}, y0..y_{d/2-1}) become (x0, y0, x1, y1, ...)."""
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama_cpp_query_scale(plan: GGUFPlan) -> float:
    """The factor to put into Gemma's queries so that llama.cpp's fixed attention scale gives the
    model's own (1/sqrt(query_pre_attn_scalar)); 1.0 for the released models."""
    args = plan.args
    biggest = {"gemma2": 46, "gemma3": 62}[plan.arch]  # llama.cpp's 27B: scale by hidden / heads
    if int(args.num_hidden_layers) == biggest:
        denominator = args.hidden_size // args.num_attention_heads
    else:
        denominator = head_dim(args)
    return math.sqrt(denominator / float(args.query_pre_attn_scalar))


def convert(plan: GGUFPlan, tensor: TensorPlan, value: np.ndarray) -> np.ndarray:
    """A parameter as llama.cpp reads it (float32): Q/K rows permuted (llama), norms + 1 (Gemma)."""
    args = plan.args
    name = tensor.name
    if plan.arch == "llama" and not getattr(args, "rope_traditional", False):
        if re.search(r"\.attn_q\.(weight|bias)$", name):
            value = permute_rows(value, int(args.num_attention_heads))
        elif re.search(r"\.attn_k\.(weight|bias)$", name):
            value = permute_rows(value, int(args.num_key_value_heads or args.num_attention_heads))
    if plan.arch in ("gemma2", "gemma3"):
        if name.endswith("norm.weight"):
            value = value + 1.0
        scale = llama_cpp_query_scale(plan)
        if scale != 1.0 and name.endswith(".attn_q_norm.weight" if plan.arch == "gemma3" else ".attn_q.weight"):
            value = value * np.float32(scale)
    return value


def encode(value: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as T, quants

    if qtype == T.F32:
        return np.ascontiguousarray(value, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(value, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(value, dtype=np.float32), qtype)


def stored_nbytes(shape: tuple, qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


# ---------------------------------------------------------------------------
# writing


def write_gguf(plan: GGUFPlan, model, path: Path, name: str) -> dict:
    """Write `model` (unquantized mlx-lm model: fused, dequantized) to `path` as the plan says.
    Tensors are converted and written one at a time. Returns a summary: bytes, tensors by type."""
    import gguf
    import mlx.core as mx
    from mlx.utils import tree_flatten

    parameters = dict(tree_flatten(model.parameters()))
    if any(key.endswith(".scales") for key in parameters):
        raise ValueError("write_gguf wants an unquantized model (mlx_lm.utils.dequantize_model)")
    tensors = plan_tensors(plan, {key: tuple(value.shape) for key, value in parameters.items()})
    extras = extra_tensors(plan)

    writer = gguf.GGUFWriter(str(path), plan.arch)
    write_metadata(writer, plan, name)
    for tensor in tensors:
        if tensor.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if tensor.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype),
                                   int(np.prod(tensor.shape)) * np.dtype(dtype).itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8),
                                   stored_nbytes(tensor.shape, tensor.qtype), raw_dtype=tensor.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    for tensor in tensors:
        if tensor.source is None:
            value = extras[tensor.name]
        else:
            value = np.array(parameters[tensor.source].astype(mx.float32))
        writer.write_tensor_data(encode(convert(plan, tensor, value), tensor.qtype))
        counts[tensor.qtype.name] = counts.get(tensor.qtype.name, 0) + 1
    writer.close()
    return {"bytes": Path(path).stat().st_size, "tensors": counts}


def write_metadata(writer, plan: GGUFPlan, name: str) -> None:
    import gguf

    args, config, vocabulary = plan.args, plan.config, plan.vocabulary
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_name(llama_cpp_name(plan, name))
    writer.add_file_type(file_types[plan.gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    heads = int(args.num_attention_heads)
    kv_heads = int(getattr(args, "num_key_value_heads", None) or heads)
    dims = head_dim(args)
    context = getattr(args, "max_position_embeddings", None) or config.get("max_position_embeddings") or 4096
    writer.add_vocab_size(len(vocabulary.tokens))
    writer.add_context_length(int(context))
    writer.add_embedding_length(int(args.hidden_size))
    writer.add_block_count(int(args.num_hidden_layers))
    writer.add_feed_forward_length(int(args.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(dims)
    writer.add_value_length(dims)
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    writer.add_rope_freq_base(float(getattr(args, "rope_theta", 10000.0)))
    rotary = float(getattr(args, "partial_rotary_factor", 1.0) or 1.0)
    writer.add_rope_dimension_count(int(dims * rotary))

    rope = rope_scaling(args) or {}
    kind = rope.get("rope_type") or rope.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if plan.arch == "llama" and getattr(args, "num_local_experts", None):
        writer.add_expert_count(int(args.num_local_experts))
        writer.add_expert_used_count(int(args.num_experts_per_tok))
    if plan.arch == "gemma2":
        writer.add_attn_logit_softcapping(float(args.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(args.final_logit_softcapping))
        # mlx-lm's Gemma 2 attends to the whole context; the model was trained with this window
        # on every other layer, which llama.cpp applies (it matters beyond the window only).
        writer.add_sliding_window(int(config.get("sliding_window") or 4096))
    if plan.arch == "gemma3":
        pattern = int(args.sliding_window_pattern)
        writer.add_sliding_window(int(args.sliding_window))
        writer.add_sliding_window_pattern([(layer + 1) % pattern != 0 for layer in range(args.num_hidden_layers)])
        writer.add_rope_freq_base_swa(float(args.rope_local_base_freq))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if plan.arch == "phi3":
        original = int(getattr(args, "original_max_position_embeddings", None) or context)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
        if kind in ("longrope", "su"):
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            scale = int(context) / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original))
                                                 if scale > 1.0 else 1.0)

    writer.add_tokenizer_model(vocabulary.model)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    for role, index in vocabulary.special_ids.items():
        getattr(writer, f"add_{role}_token_id")(index)
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(vocabulary.add_eos)
    for value, add in ((vocabulary.pre, writer.add_tokenizer_pre), (vocabulary.scores, writer.add_token_scores),
                       (vocabulary.merges, writer.add_token_merges),
                       (vocabulary.add_space_prefix, writer.add_add_space_prefix),
                       (vocabulary.chat_template, writer.add_chat_template)):
        if value is not None:  # what this kind of vocabulary has
            add(value)


def llama_cpp_name(plan: GGUFPlan, name: str) -> str:
    """The model's name in the file. llama.cpp has no key for a token that swallows the white space
    after it; it gives Phi-3's chat tokens that behaviour when the model's name says phi3, so a
    Phi-3 vocabulary that has it gets " (phi3)" after a name that does not say so."""
    if plan.arch == "phi3" and plan.vocabulary.strips_after_specials and not re.search(r"phi-?3", name.lower()):
        return f"{name} (phi3)"
    return name


def export_model_dir(model_dir: Path, path: Path, gguf_type: str = "f16", name: str | None = None) -> dict:
    """Any mlx-lm model folder (quantized layers are dequantized first) as a GGUF file at `path`."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model_dir = Path(model_dir)
    model, tokenizer, config = load(str(model_dir), return_config=True)
    plan = plan_gguf(config, model_dir, tokenizer, gguf_type)
    return write_gguf(plan, dequantize_model(model), Path(path), name or model_dir.name)
