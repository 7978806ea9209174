"""Tiny random models of each family the GGUF export writes (llama as Llama 2,
SmolLM and Llama 3 have it, mistral, mixtral, qwen2, qwen3, gemma2, gemma3,
phi3), each with a tokenizer trained here, in the style of that family's own:
SentencePiece-like BPE with byte fallback (Llama 2, Mistral, Phi-3; Gemma
without the space prefix) or GPT-2 byte-level BPE with the family's split
(SmolLM's digits, Llama 3's and Qwen2's regular expressions). Built locally
from the demo corpus, never downloaded: for the tests and the benchmarks.

    build_family_model("qwen2", folder)   # an mlx-lm model folder: mlx_lm.load(folder)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# The split regular expressions of byte-level BPE vocabularies, as their tokenizer.json files hold them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                   "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
INST_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
                 "{{ message['content'] }} [/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
                 "{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
                  "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                  "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PHI3_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# Tokenizer styles: how text is split, the special tokens (their places and roles), the chat template.
STYLES = {
    "spm": {"kind": "spm", "space_prefix": True, "head": ["<unk>", "<s>", "</s>"], "tail": [],
            "bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None, "add_bos": True, "template": INST_TEMPLATE},
    # Phi-3's chat tokens (and </s>) swallow the white space after them (rstrip), as in its tokenizer.
    "phi3": {"kind": "spm", "space_prefix": True, "head": ["<unk>", "<s>", "</s>"],
             "tail": ["<|endoftext|>", "<|assistant|>", "<|user|>", "<|end|>", "<|system|>"],
             "rstrip": ["</s>", "<|assistant|>", "<|user|>", "<|end|>", "<|system|>"],
             "bos": "<s>", "eos": "<|endoftext|>", "unk": "<unk>", "pad": "<|endoftext|>", "add_bos": False,
             "template": PHI3_TEMPLATE},
    "gemma": {"kind": "spm", "space_prefix": False,
              "head": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "tail": [],
              "bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>", "add_bos": True,
              "template": GEMMA_TEMPLATE},
    "gpt2": {"kind": "byte", "split": None, "digits": False, "head": ["<|endoftext|>"], "tail": [],
             "bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": None, "pad": None, "add_bos": False,
             "template": None},
    "smollm": {"kind": "byte", "split": None, "digits": True, "head": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               "tail": [], "bos": "<|im_start|>", "eos": "<|im_end|>", "unk": "<|endoftext|>", "pad": "<|im_end|>",
               "add_bos": False, "template": CHATML},
    "llama3": {"kind": "byte", "split": LLAMA3_SPLIT, "digits": False, "head": [],
               "tail": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"],
               "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "unk": None, "pad": None, "add_bos": True,
               "template": LLAMA3_TEMPLATE, "ignore_merges": True},
    "qwen2": {"kind": "byte", "split": QWEN2_SPLIT, "digits": False, "nfc": True, "head": [],
              "tail": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>",
              "unk": None, "pad": "<|endoftext|>", "add_bos": False, "template": CHATML},
}

_COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0}

# family -> (tokenizer style, config). Each family's particulars are in its config: grouped-query attention
# (llama's Q/K permutation with fewer KV heads), a head size other than hidden/heads (mistral, qwen3),
# experts (mixtral), attention biases and a vocabulary padded beyond the tokenizer (qwen2), q/k norms
# (qwen3, gemma3), soft-capping and a query scale other than the head size (gemma2, gemma3), sliding
# windows shorter than a prompt (gemma3), fused qkv and gate_up (phi3), Llama 3's RoPE scaling.
FAMILIES = {
    "llama": ("spm", {"model_type": "llama", "tie_word_embeddings": False}),
    "smollm": ("smollm", {"model_type": "llama", "tie_word_embeddings": True, "rope_theta": 100000.0}),
    "llama3": ("llama3", {"model_type": "llama", "tie_word_embeddings": False, "rope_theta": 500000.0,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    "mistral": ("spm", {"model_type": "mistral", "head_dim": 32, "tie_word_embeddings": False}),
    "mixtral": ("spm", {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2,
                        "tie_word_embeddings": False}),
    "qwen2": ("qwen2", {"model_type": "qwen2", "tie_word_embeddings": True, "vocab_padding": 8}),
    "qwen3": ("qwen2", {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True}),
    "gemma2": ("gemma", {"model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 24,
                         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
                         "rms_norm_eps": 1e-6}),
    "gemma3": ("gemma", {"model_type": "gemma3_text", "num_hidden_layers": 3, "head_dim": 16,
                         "query_pre_attn_scalar": 24, "sliding_window": 8, "sliding_window_pattern": 2,
                         "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6,
                         "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    "phi3": ("phi3", {"model_type": "phi3", "tie_word_embeddings": False, "original_max_position_embeddings": 2048}),
}

EXTRA_TEXTS = [
    "In 1887 they measured 42.195 km; by 2024 it's 3,400 readings, and we'll say they're 99% sure.\n",
    "Isn't it odd?  Two  spaces, tabs\tand new\nlines\n\nagain. Don't, can't, I'm, you've, she'd.",
    "Café, naïve, Zürich, 東京, данные, 42°C, x² + y² = z², emoji 🙂 and ümlaut.",
    "def f(x):\n    return x * 2  # code with indentation\n",
]


def build_family_model(family: str, target: Path, seed: int = 0) -> Path:
    """Write an mlx-lm model folder for `family` (tokenizer, config.json, random weights) in `target`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model

    style_name, config = FAMILIES[family]
    style = STYLES[style_name]
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(target, style_name)
    config = {**_COMMON, **config}
    config["vocab_size"] = len(tokenizer.get_vocab()) + config.pop("vocab_padding", 0)
    for role in ("bos", "eos", "pad"):
        if style[role] is not None:
            config[f"{role}_token_id"] = tokenizer.convert_tokens_to_ids(style[role])

    module = importlib.import_module(f"mlx_lm.models.{'llama' if config['model_type'] == 'mistral' else config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Norm weights away from their initial ones, so that a norm written with the wrong convention shows.
    noisy = [(name, value + 0.2 * mx.random.normal(value.shape)) for name, value in tree_flatten(model.parameters())
             if name.endswith("norm.weight")]
    model.load_weights(noisy, strict=False)
    mx.eval(model.parameters())
    save_model(target, model)
    save_config(config, target / "config.json")
    return target


def training_texts() -> list[str]:
    from base_model.tiny import _tiny_training_texts

    return _tiny_training_texts() + EXTRA_TEXTS * 4


def write_tokenizer(directory: Path, style_name: str):
    """Train a tokenizer of this style on the demo corpus and save it (tokenizer.json,
    tokenizer_config.json, chat template) in `directory`; returns the transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    style = STYLES[style_name]
    texts = training_texts()
    backend = _spm_tokenizer(texts, style) if style["kind"] == "spm" else _byte_level_tokenizer(texts, style)
    roles = {f"{role}_token": style[role] for role in ("bos", "eos", "unk", "pad") if style[role] is not None}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    if style["template"]:
        wrapped.chat_template = style["template"]
    wrapped.save_pretrained(str(directory))
    if style.get("ignore_merges"):  # Llama 3's: a word that is a token is taken whole (tokenizers cannot train it)
        path = Path(directory) / "tokenizer.json"
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["model"]["ignore_merges"] = True
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        wrapped = PreTrainedTokenizerFast(tokenizer_file=str(path), **roles)
    return wrapped


def _bos_processor(style: dict, token_id):
    from tokenizers import processors

    bos = style["bos"]
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, token_id(bos))])


def _byte_level_tokenizer(texts: list[str], style: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if style["split"]:
        split = pre_tokenizers.Split(Regex(style["split"]), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif style["digits"]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style.get("nfc"):
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=style["head"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(style["tail"])
    if style["add_bos"]:
        tokenizer.post_processor = _bos_processor(style, tokenizer.token_to_id)
    return tokenizer


def _spm_tokenizer(texts: list[str], style: dict):
    """A BPE vocabulary laid out as SentencePiece's (special pieces, the 256 byte pieces, then the
    learned ones), with byte fallback; words begin with U+2581, the first one too when the style
    has the space prefix (Llama 2, Mistral, Phi-3) and not otherwise (Gemma)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE())
    # Words split at spaces while learning, so that no piece spans two words (as SentencePiece's).
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    learner.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=360, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = list(style["head"]) + [f"<0x{byte:02X}>" for byte in range(256)]
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if piece not in pieces:
            pieces.append(piece)
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in learned["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={piece: index for index, piece in enumerate(pieces)}, merges=merges,
                                     unk_token=style["unk"], byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
                            if style["space_prefix"] else replace)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if style["space_prefix"] else steps)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False,
                                             rstrip=token in style.get("rstrip", ()))
                                  for token in list(style["head"]) + list(style["tail"])])
    if style["add_bos"]:
        tokenizer.post_processor = _bos_processor(style, tokenizer.token_to_id)
    return tokenizer
