"""What a GGUF export must hold, checked from the file (gguf.GGUFReader) against
the fused MLX model it was written from. The expectations are written out here,
independently of the writer: llama.cpp's tensor names for mlx-lm's, the Q/K
row order llama.cpp's RoPE wants (checked by undoing it), Gemma's norm + 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# llama.cpp's per-block tensor -> mlx-lm's parameter, per architecture.
LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
MOE_BLOCK = {**{k: v for k, v in LLAMA_BLOCK.items() if not k.startswith(("ffn_gate", "ffn_up", "ffn_down"))},
             "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate_exps": "block_sparse_moe.switch_mlp.gate_proj",
             "ffn_up_exps": "block_sparse_moe.switch_mlp.up_proj",
             "ffn_down_exps": "block_sparse_moe.switch_mlp.down_proj"}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA_BLOCK = {**LLAMA_BLOCK, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
PHI3_BLOCK = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
              "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
BLOCKS = {"llama": LLAMA_BLOCK, "qwen2": LLAMA_BLOCK, "qwen3": {**LLAMA_BLOCK, **QK_NORMS}, "gemma2": GEMMA_BLOCK,
          "gemma3": {**GEMMA_BLOCK, **QK_NORMS}, "phi3": PHI3_BLOCK}
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def dequantized(tensor) -> np.ndarray:
    from gguf import quants

    return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def expected_sources(config: dict, parameters: dict) -> dict[str, str]:
    """GGUF tensor name -> the fused model's parameter it must come from."""
    arch = ARCHITECTURES[config["model_type"]]
    block = MOE_BLOCK if config.get("num_local_experts") else BLOCKS[arch]
    sources = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if "lm_head.weight" in parameters:
        sources["output.weight"] = "lm_head.weight"
    for layer in range(config["num_hidden_layers"]):
        for name, source in block.items():
            for suffix in ("weight", "bias"):
                if f"model.layers.{layer}.{source}.{suffix}" in parameters:
                    sources[f"blk.{layer}.{name}.{suffix}"] = f"model.layers.{layer}.{source}.{suffix}"
    return sources


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved Q/K rows back to mlx-lm's (rotate-half) order, per head."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def as_in_model(name: str, data: np.ndarray, config: dict) -> np.ndarray:
    """A tensor read from the GGUF turned back into the MLX model's parameter."""
    arch = ARCHITECTURES[config["model_type"]]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if arch == "llama" and ".attn_q." in name:
        return unpermute(data, heads)
    if arch == "llama" and ".attn_k." in name:
        return unpermute(data, kv_heads)
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(head size); the model by 1/sqrt(query_pre_attn_scalar).
        scale = math.sqrt(config["head_dim"] / config["query_pre_attn_scalar"])
        if name.endswith(".attn_q.weight") and arch == "gemma2" or name.endswith(".attn_q_norm.weight"):
            data = data / scale
        if name.endswith("norm.weight"):
            data = data - 1.0
    return data


def expected_type(name: str, shape: tuple, gguf_type: str, tied: bool) -> str:
    if len(shape) == 1 or "ffn_gate_inp" in name or name.startswith("rope_"):
        return "F32"
    if gguf_type == "q4_0" and (name == "output.weight" or tied and name == "token_embd.weight"):
        return "Q8_0"
    return gguf_type.upper()


def check_tensors(reader, parameters: dict, config: dict, gguf_type: str) -> None:
    """Names, shapes, types, and values within the type's rounding."""
    sources = expected_sources(config, parameters)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    extra = {"rope_freqs.weight"} if (config.get("rope_scaling") or {}).get("rope_type") == "llama3" else set()
    assert tensors.keys() == sources.keys() | extra, sorted(tensors.keys() ^ (sources.keys() | extra))
    tied = "output.weight" not in tensors
    for name, source in sources.items():
        tensor, want = tensors[name], parameters[source]
        data = as_in_model(name, dequantized(tensor), config)
        assert data.shape == want.shape, (name, data.shape, want.shape)
        assert tensor.tensor_type.name == expected_type(name, want.shape, gguf_type, tied), (name, tensor.tensor_type)
        error = np.abs(data - want).max()
        if tensor.tensor_type.name == "F32":
            assert error <= 1e-6 * max(1.0, np.abs(want).max()), (name, error)
        elif tensor.tensor_type.name == "F16":
            np.testing.assert_allclose(data, want, rtol=2 ** -10, atol=6e-8, err_msg=name)
        else:
            # Blocks of 32 with one float16 scale d = (largest magnitude) / steps: half a step off for
            # Q8_0 (127 steps), up to one step for Q4_0 (8), plus the scale's own rounding (2^-11 each step).
            steps = 127 if tensor.tensor_type.name == "Q8_0" else 8
            bound = np.abs(want).max() / steps * ((0.5 if steps == 127 else 1.0) + steps * 2 ** -11) * 1.001
            assert 0 < error <= bound, (name, error, bound)


def check_vocabulary(meta: dict, model_dir: Path, tokenizer, rows: int, kind: str, pre: str | None) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert meta["tokenizer.ggml.model"] == kind and meta.get("tokenizer.ggml.pre") == pre
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == rows == meta[f"{meta['general.architecture']}.vocab_size"]
    assert tokens[:len(vocabulary)] == [token for token, _ in vocabulary]
    assert tokens[len(vocabulary):] == [f"[PAD{index}]" for index in range(len(vocabulary), rows)]
    types = meta["tokenizer.ggml.token_type"]
    for entry in spec["added_tokens"]:
        assert types[entry["id"]] == (3 if entry["special"] else 4), entry  # CONTROL, USER_DEFINED
    assert all(kind == 5 for kind in types[len(vocabulary):])  # UNUSED
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in spec["model"]["merges"]]
    if kind == "gpt2":
        assert meta["tokenizer.ggml.merges"] == merges
        assert "tokenizer.ggml.scores" not in meta
    else:
        assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == 6  # BYTE
        # A merge's result scores -rank (its first merge), so that llama.cpp's SentencePiece tokenizer,
        # which merges the best-scored pair first, merges in the BPE model's order.
        scores, seen = meta["tokenizer.ggml.scores"], set()
        for rank, merge in enumerate(merges):
            token = merge.replace(" ", "")
            if token not in seen:
                seen.add(token)
                assert scores[tokenizer.convert_tokens_to_ids(token)] == -rank, (merge, rank)
    for role in ("bos", "eos"):
        if getattr(tokenizer, f"{role}_token_id") is not None:
            assert meta[f"tokenizer.ggml.{role}_token_id"] == getattr(tokenizer, f"{role}_token_id")
    adds_bos = tokenizer.encode("a")[:1] != tokenizer.encode("a", add_special_tokens=False)[:1]
    assert meta["tokenizer.ggml.add_bos_token"] is adds_bos
    assert meta.get("tokenizer.chat_template") == tokenizer.chat_template
