"""GGUF in: a GGUF file (llama.cpp, LM Studio, Ollama) as the base of a run.

Each family is a tiny random model of that architecture (mlx-lm's own model
classes), written to a GGUF file here the way llama.cpp's converter writes one
(its tensor names from the gguf package's table, the Q/K rows of llama-family
models interleaved, Gemma's norms stored plus 1, llama.cpp's metadata keys), with
a tokenizer trained here (`tokenizers` byte-level BPE, or `sentencepiece`).
Read back through base_model/gguf_in.py it must be the same model: float files give the
original logits (exactly, or within 1e-5 for Gemma, whose norm offset is
rounded in float32); Q4_0 and Q8_0 tensors are kept bit for bit; the tokenizer
gives the original's ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import FAST, REPO, adapters_equal, assert_one_line_error, load_adapters, run_in_process, write_corpus

gguf = pytest.importorskip("gguf")

T = gguf.GGMLQuantizationType
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SAMPLES = ["The measurement was taken at dawn.", "  two  spaces and 12345 digits\n\nnew lines",
           "Ünïcödé: café, naïve, 東京 🙂", "<|user|>hello</s><|assistant|>"]
VOCAB = 384
BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "rope_theta": 10000.0,
        "max_position_embeddings": 256}
# (mlx-lm config, GGUF architecture, tokenizer kind)
FAMILIES = {
    "llama": (dict(BASE, model_type="llama", tie_word_embeddings=False), "llama", "gpt2"),
    "llama3": (dict(BASE, model_type="llama", tie_word_embeddings=True, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), "llama", "gpt2"),
    "mistral": (dict(BASE, model_type="mistral", tie_word_embeddings=False), "llama", "sentencepiece"),
    "qwen2": (dict(BASE, model_type="qwen2", tie_word_embeddings=True), "qwen2", "qwen2"),
    "qwen3": (dict(BASE, model_type="qwen3", head_dim=32, tie_word_embeddings=True, rope_theta=1e6), "qwen3", "qwen2"),
    "gemma2": (dict(BASE, model_type="gemma2", query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0), "gemma2", "sentencepiece"),
    "gemma3": (dict(BASE, model_type="gemma3_text", query_pre_attn_scalar=16, sliding_window=8,
                    sliding_window_pattern=2, rope_theta=1e6), "gemma3", "sentencepiece"),
    "phi3": (dict(BASE, model_type="phi3", num_key_value_heads=4, tie_word_embeddings=False), "phi3", "sentencepiece"),
}
PERMUTED = {"llama"}  # llama.cpp interleaves the Q/K rows of these for its RoPE
NORM_PLUS_ONE = {"gemma2", "gemma3"}  # llama.cpp stores these norms' weights plus 1


# ----------------------------------------------------------------- helpers


def demo_texts() -> list[str]:
    with open(REPO / "data" / "train.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if '"text"' in line][:400] + SAMPLES


def bpe_tokenizer(kind: str):
    """A byte-level BPE tokenizer trained here: GPT-2's split (`gpt2`) or Qwen2's (`qwen2`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    if kind == "qwen2":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                    use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(demo_texts(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", additional_special_tokens=SPECIAL[3:])
    wrapped.chat_template = CHAT_TEMPLATE
    state = json.loads(tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    metadata = {"model": "gpt2", "pre": "qwen2" if kind == "qwen2" else "default", "tokens": tokens,
                "token_type": [3 if t in SPECIAL else 1 for t in tokens], "merges": merges,
                "bos": 1, "eos": 2, "unk": 0, "add_bos": False}
    return wrapped, metadata


def sentencepiece_tokenizer(prefix_space: bool = True):
    """A SentencePiece BPE model trained here (byte fallback), and its GGUF vocabulary as
    llama.cpp writes one: pieces, scores, token types."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(demo_texts()), model_writer=model, model_type="bpe",
                                   vocab_size=VOCAB, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, user_defined_symbols=SPECIAL[3:],
                                   add_dummy_prefix=prefix_space, minloglevel=2,
                                   # as Llama's and Mistral's: text as it is, spaces kept
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]

    def token_type(i: int) -> int:  # llama.cpp's: normal 1, unknown 2, control 3, user-defined 4, byte 6
        return 2 if processor.is_unknown(i) else 3 if processor.is_control(i) else 6 if processor.is_byte(i) else \
            4 if tokens[i] in SPECIAL else 1

    metadata = {"model": "llama", "pre": "default", "tokens": tokens,
                "scores": [processor.get_score(i) for i in range(len(tokens))],
                "token_type": [token_type(i) for i in range(len(tokens))], "bos": 1, "eos": 2, "unk": 0,
                "add_bos": True, "add_space_prefix": prefix_space}
    return processor, metadata


def random_model(config: dict, seed: int = 0):
    """mlx-lm's model of `config`, every weight random (norms around 1), in float32."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if config["model_type"] == "gemma3_text":
        model.sanitize({})  # tied, as llama.cpp's Gemma 3 files are
    mx.random.seed(seed)
    values = [(name, (1 + 0.1 * mx.random.normal(v.shape)) if name.endswith("norm.weight") else
               0.05 * mx.random.normal(v.shape)) for name, v in tree_flatten(model.parameters())]
    model.load_weights(values)
    mx.eval(model.parameters())
    return model


def write_gguf(path: Path, model, config: dict, arch: str, vocab: dict, types=None) -> Path:
    """The model as llama.cpp's converter writes it: its metadata keys, the gguf package's tensor
    names, Q/K rows interleaved (llama), Gemma's norms plus 1, 1-D tensors F32 and 2-D ones of
    `types(name)` (F32 by default; Q8_0, Q4_0, F16 are written with the gguf package's quantizer).

    An independent oracle, kept apart from src/gguf_out.py on purpose: written from llama.cpp's
    convert_hf_to_gguf.py conventions, so the import is checked against llama.cpp's layout and
    not against our own export (a convention both got wrong would pass a round trip: that one is
    test_gguf_export's). It also writes what the export never does and real files hold: a type per
    tensor (a Q8_0 embedding beside Q4_0 MLPs, F16 beside Q8_0) and SentencePiece's own scores.
    Likewise FAMILIES and the tokenizers here (real `sentencepiece` models) are not
    src/base_model/tiny_families.py's, whose folders are what the export starts from."""
    from mlx.utils import tree_flatten

    K = gguf.Keys
    writer = gguf.GGUFWriter(str(path), arch)
    numbers = {K.LLM.CONTEXT_LENGTH: config["max_position_embeddings"], K.LLM.EMBEDDING_LENGTH: config["hidden_size"],
               K.LLM.BLOCK_COUNT: config["num_hidden_layers"], K.LLM.FEED_FORWARD_LENGTH: config["intermediate_size"],
               K.Attention.HEAD_COUNT: config["num_attention_heads"],
               K.Attention.HEAD_COUNT_KV: config["num_key_value_heads"], K.Attention.KEY_LENGTH: config["head_dim"],
               K.Attention.VALUE_LENGTH: config["head_dim"], K.Rope.DIMENSION_COUNT: config["head_dim"]}
    for key, value in numbers.items():
        writer.add_uint32(key.format(arch=arch), value)
    floats = {K.Attention.LAYERNORM_RMS_EPS: config["rms_norm_eps"], K.Rope.FREQ_BASE: config["rope_theta"]}
    if arch == "gemma2":
        floats.update({K.LLM.ATTN_LOGIT_SOFTCAPPING: config["attn_logit_softcapping"],
                       K.LLM.FINAL_LOGIT_SOFTCAPPING: config["final_logit_softcapping"]})
    for key, value in floats.items():
        writer.add_float32(key.format(arch=arch), value)
    if config.get("rope_scaling"):  # Llama 3.1+: llama.cpp writes the factor of each rotary frequency
        scaling, dims = config["rope_scaling"], config["head_dim"]
        old = scaling["original_max_position_embeddings"]
        low, high, factor = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"], scaling["factor"]
        wavelengths = 2 * np.pi * config["rope_theta"] ** (np.arange(0, dims, 2) / dims)
        smooth = (old / wavelengths - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] -
                                                                     scaling["low_freq_factor"])
        factors = [1.0 if w < high else factor if w > low else 1 / ((1 - s) / factor + s)
                   for w, s in zip(wavelengths, smooth)]
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    if "sliding_window" in config:
        writer.add_uint32(K.Attention.SLIDING_WINDOW.format(arch=arch), config["sliding_window"])
        layers = range(config["num_hidden_layers"])  # llama.cpp's per-layer flags, true: sliding
        writer.add_array(K.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch),
                         [(i + 1) % config["sliding_window_pattern"] != 0 for i in layers])
    T_ = K.Tokenizer
    writer.add_string(T_.MODEL, vocab["model"])
    writer.add_string(T_.PRE, vocab["pre"])
    writer.add_array(T_.LIST, vocab["tokens"])
    writer.add_array(T_.TOKEN_TYPE, vocab["token_type"])
    for key, name in ((T_.SCORES, "scores"), (T_.MERGES, "merges")):
        if name in vocab:
            writer.add_array(key, vocab[name])
    for key, name in ((T_.BOS_ID, "bos"), (T_.EOS_ID, "eos"), (T_.UNK_ID, "unk")):
        writer.add_uint32(key, vocab[name])
    writer.add_bool(T_.ADD_BOS, vocab["add_bos"])
    if "add_space_prefix" in vocab:
        writer.add_bool(T_.ADD_PREFIX, vocab["add_space_prefix"])
    writer.add_string(T_.CHAT_TEMPLATE, CHAT_TEMPLATE)

    table = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config["num_hidden_layers"])
    for name, value in tree_flatten(model.parameters()):
        base, _, suffix = name.rpartition(".")
        array = np.array(value.astype(mx.float32))
        if arch in PERMUTED and base.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"] if base.endswith("q_proj") else config["num_key_value_heads"]
            array = array.reshape(heads, 2, -1, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            array = array + 1
        kind = T.F32 if array.ndim == 1 or types is None else types(name)
        data = array if kind == T.F32 else gguf.quants.quantize(array, kind)
        writer.add_tensor(f"{table.get_name(base)}.{suffix}", data, raw_dtype=kind if kind != T.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def family_gguf(tmp_path: Path, family: str, types=None, seed: int = 0):
    """(original model, its config, the GGUF file, the original tokenizer) of one family."""
    config, arch, kind = FAMILIES[family]
    tokenizer, vocab = sentencepiece_tokenizer(prefix_space=not family.startswith("gemma")) \
        if kind == "sentencepiece" else bpe_tokenizer(kind)
    config = dict(config, vocab_size=len(vocab["tokens"]))
    model = random_model(config, seed)
    return model, config, write_gguf(tmp_path / f"{family}.gguf", model, config, arch, vocab, types), tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Built folders go to this test's own cache, not the project's."""
    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))


def build(path: Path, bits: int = 4):
    from base_model import loading

    return loading.prepare_base(loading.resolve_model(str(path)), bits, shown=path.name)


def logits(model, ids) -> mx.array:
    return model(mx.array([ids]))[0].astype(mx.float32)


IDS = [1, 17, 200, 5, 42, 99, 3, 250, 8, 60, 61, 62, 70, 71, 300, 301, 9, 10, 11, 12]  # past gemma3's window of 8


# ------------------------------------------------------------- the families


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_read_back_from_a_float_gguf_is_the_same_model(family, tmp_path):
    from mlx_lm import load

    model, config, path, _ = family_gguf(tmp_path, family)
    base = build(path, bits=0)  # nothing quantized: the file's float32 numbers as they are
    built, tokenizer = load(base.path)
    difference = mx.abs(logits(built, IDS) - logits(model, IDS)).max().item()
    if family in NORM_PLUS_ONE:
        assert difference <= 1e-5, difference  # the norms' +1 and -1 rounded in float32
    else:
        assert difference == 0.0
    made = json.loads((Path(base.path) / "config.json").read_text())
    assert made["model_type"] == {"gemma3": "gemma3_text", "mistral": "llama", "llama3": "llama"}.get(family, family)
    assert made.get("rope_scaling") == config.get("rope_scaling")
    assert "quantization" not in made
    assert tokenizer.chat_template == CHAT_TEMPLATE


# ------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_byte_level_bpe_vocabulary_tokenizes_as_the_original(family, tmp_path):
    from mlx_lm.utils import load_tokenizer

    _, _, path, original = family_gguf(tmp_path, family)
    rebuilt = load_tokenizer(Path(build(path, bits=0).path))
    # The file's tokens and no more (transformers' GPT-2 tokenizer would add its <|endoftext|> default
    # where the vocabulary has none, as Llama 3's: an id past the embedding, refused by export --gguf).
    assert sorted(rebuilt.get_vocab().values()) == list(range(len(original.get_vocab())))
    for text in SAMPLES:
        assert rebuilt.encode(text) == original.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.encode("<|user|>hi</s>")[0] == original.convert_tokens_to_ids("<|user|>")  # kept whole
    assert (rebuilt.bos_token, rebuilt.eos_token, rebuilt.eos_token_id) == ("<s>", "</s>", 2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rebuilt.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert text == "<|user|>What is the capital of France?</s><|assistant|>"


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_sentencepiece_vocabulary_tokenizes_as_sentencepiece_with_bos(family, tmp_path):
    from mlx_lm.utils import load_tokenizer

    _, _, path, processor = family_gguf(tmp_path, family)
    rebuilt = load_tokenizer(Path(build(path, bits=0).path))
    for text in SAMPLES[:3]:
        assert rebuilt.encode(text) == [1, *processor.encode(text)], text  # BOS: the file's add_bos_token
        assert rebuilt.decode(rebuilt.encode(text), skip_special_tokens=True) == text
    # Special tokens whole; the text after one is tokenized as the start of a text (llama.cpp's rule).
    user, assistant = processor.piece_to_id("<|user|>"), processor.piece_to_id("<|assistant|>")
    assert rebuilt.encode("<|user|>hello world<|assistant|>") == [1, user, *processor.encode("hello world"), assistant]
    assert (rebuilt.bos_token, rebuilt.eos_token, rebuilt.unk_token) == ("<s>", "</s>", "<unk>")


# ------------------------------------------------------------- quantized tensors


def q8_and_q4(name: str):
    """Q8_0 for the embedding and the attention, Q4_0 for the MLP: a mixed file like llama.cpp's."""
    return T.Q4_0 if ".mlp." in name else T.Q8_0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q8_0_and_q4_0_tensors_are_kept_bit_for_bit_and_nothing_is_quantized_twice(family, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from base_model import gguf_in

    model, config, path, _ = family_gguf(tmp_path, family, types=q8_and_q4)
    base = build(path, bits=4)
    built, _ = load(base.path)
    made = json.loads((Path(base.path) / "config.json").read_text())
    assert made["quantization"]["group_size"] == 32 and made["quantization"]["bits"] in (4, 8)
    kept = dict(tree_flatten(built.parameters()))
    # Against MLX's own GGUF reader: the same packed integers, scales and biases (Q/K rows put back).
    read_by_mlx = mx.load(str(path))
    table = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == FAMILIES[family][1]),
                                     config["num_hidden_layers"])
    compared = 0
    for name, value in tree_flatten(model.parameters()):
        if value.ndim != 2:
            continue
        module = name.rpartition(".")[0]
        bits = 4 if ".mlp." in name else 8
        assert made["quantization"].get(module, made["quantization"])["bits"] == bits, module
        for part in ("weight", "scales", "biases"):
            theirs = read_by_mlx[f"{table.get_name(module)}.{part}"]
            if family in PERMUTED and module.endswith(("q_proj", "k_proj")):
                heads = config["num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"]
                theirs = gguf_in.unpermute_rows(theirs, heads)
            assert mx.array_equal(kept[f"{module}.{part}"], theirs).item(), (module, part)
            compared += 1
    assert compared == 3 * sum(1 for _, v in tree_flatten(model.parameters()) if v.ndim == 2)
    # The model computes with exactly the file's values: the original with each weight replaced by
    # the file's dequantized blocks gives the same logits, up to float16 rounding (the file's scales
    # are float16, so the quantized embedding hands float16 activations to the blocks).
    reference = [(name, mx.dequantize(kept[f"{name[:-7]}.weight"], kept[f"{name[:-7]}.scales"],
                                      kept[f"{name[:-7]}.biases"], group_size=32,
                                      bits=4 if ".mlp." in name else 8).astype(mx.float32))
                 for name, value in tree_flatten(model.parameters()) if value.ndim == 2]
    model.load_weights(reference, strict=False)
    ours, theirs = logits(built, IDS), logits(model, IDS)
    assert mx.abs(ours - theirs).max().item() <= 5e-3 * mx.abs(theirs).max().item()


def test_other_tensor_types_are_dequantized_and_quantized_to_quantize_bits_with_one_line(tmp_path):
    from base_model import builds

    _, _, path, _ = family_gguf(tmp_path, "llama", types=lambda name: T.Q8_0 if "embed" in name else T.F16)
    base = build(path, bits=4)
    quantization = json.loads((Path(base.path) / "config.json").read_text())["quantization"]
    assert (quantization["group_size"], quantization["bits"]) == (builds.QUANT_GROUP_SIZE, 4)
    assert quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}  # Q8_0: kept
    assert base.quantization == quantization
    # --quantize-bits 0 keeps them as the file has them; another folder (the bits are in its key).
    unquantized = build(path, bits=0)
    assert unquantized.path != base.path
    made = json.loads((Path(unquantized.path) / "config.json").read_text())["quantization"]
    assert made == {"group_size": 32, "bits": 8, "mode": "affine"}  # only the Q8_0 embedding
    weights = mx.load(str(Path(unquantized.path) / "model.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.float16


def test_the_line_about_requantized_tensors(tmp_path):
    _, _, path, _ = family_gguf(tmp_path, "llama", types=lambda name: T.Q8_0 if "embed" in name else T.F16)
    data = write_corpus(tmp_path / "data", train=8, val=0)
    result = run_in_process(*FAST, "--model", path, "--data-dir", data, "--output-dir", tmp_path / "run",
                            "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert f"gguf: {path}: llama, 2 blocks; tensors 15 F16, 5 F32, 1 Q8_0; Q4_0, Q4_1 and Q8_0 kept as they " \
        "are (group size 32)" in result.stderr
    assert f"note: 15 F16 tensors of {path} were dequantized and quantized to 4 bits (group size 64" \
        in result.stderr
    # The kept Q8_0 embedding is counted apart: config.json's bits (4) are only the most common width.
    assert f"model: {path} (15 layers 4-bit, 1 8-bit; its mlx-lm folder {tmp_path / 'cache' / 'gguf'}" in result.stderr


# ------------------------------------------------------------- training on a GGUF


def test_a_run_on_a_gguf_trains_the_built_folder_and_resumes_bit_for_bit_after_the_cache_is_wiped(tmp_path):
    from mlx_lm import load

    from base_model import trained_run
    from test_modeling import final_state, validation_loss

    _, _, path, _ = family_gguf(tmp_path, "llama", types=q8_and_q4)
    corpus = write_corpus(tmp_path / "data", train=24, val=8)
    # The quantized form, as mlx_lm.load computes: the figure below is compared to 1e-6.
    args = [*FAST, "--model", path, "--data-dir", corpus, "--max-steps", "6", "--eval-steps", "6",
            "--checkpoint-interval", "1", "--keep-checkpoints", "10", "--float-base", "off"]
    reference = tmp_path / "reference"
    result = run_in_process(*args, "--output-dir", reference)
    assert result.returncode == 0, result.stderr

    adapter_config = json.loads((reference / "adapter_config.json").read_text())
    built = Path(adapter_config["model"])
    assert built.parent == tmp_path / "cache" / "gguf" and (built / "config.json").is_file()
    assert adapter_config["base_model"]["source"] == str(path)  # the run's base is the file itself
    model, tokenizer = load(str(built), adapter_path=str(reference))  # the trained model, as mlx-lm loads it
    last = [line for line in json.loads("[" + ",".join((reference / "metrics.jsonl").read_text().split("\n")[:-1])
                                        + "]") if "val_ce" in line][-1]
    assert validation_loss(model, tokenizer, corpus / "val.jsonl") == pytest.approx(last["val_ce"], rel=1e-6)

    # Killed after step 3's checkpoint; the cache wiped meanwhile: the resume rebuilds the same
    # folder from the file and ends with the uninterrupted run's adapters, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for step in range(4, 7):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    for name in ("best", "final"):
        (resumed / "checkpoints" / name).unlink(missing_ok=True)
    before = mx.load(str(built / "model.safetensors"))
    shutil.rmtree(tmp_path / "cache")
    result = run_in_process(*args, "--output-dir", resumed, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "Building the mlx-lm model of" in result.stderr
    assert adapters_equal(load_adapters(resumed), load_adapters(reference))
    after = mx.load(str(built / "model.safetensors"))
    assert before.keys() == after.keys() and all(mx.array_equal(before[k], after[k]).item() for k in before)
    state, config = final_state(resumed)
    assert trained_run.run_base_model(state.adapter_config, config).path == str(built)


def test_a_gguf_replaced_keeping_its_size_and_times_is_built_again_not_its_stale_folder(tmp_path):
    """The folder is keyed by the file's content, as the run's base identity is (file_identity):
    another model of the same size put in its place with the old modification time (cp -p,
    rsync -a, touch -r) is another folder, built from what the file holds now."""
    import os

    _, _, path, _ = family_gguf(tmp_path, "llama", types=q8_and_q4)
    first = build(path)
    before = os.stat(path)
    (tmp_path / "other").mkdir()
    _, _, other, _ = family_gguf(tmp_path / "other", "llama", types=q8_and_q4, seed=1)
    assert other.stat().st_size == before.st_size
    os.replace(other, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = build(path)
    assert second.path != first.path
    old, new = (mx.load(str(Path(base.path) / "model.safetensors")) for base in (first, second))
    assert not mx.array_equal(old["model.embed_tokens.weight"], new["model.embed_tokens.weight"]).item()
    assert mx.array_equal(new["model.embed_tokens.weight"], mx.load(str(path))["token_embd.weight"]).item()


def test_a_built_folder_changed_in_the_cache_is_built_again_not_trained_on(tmp_path):
    """Like a quantized copy (builds.remove_if_changed): the folder records its files' sums."""
    from test_run_identity import scale_one_weight

    _, _, path, _ = family_gguf(tmp_path, "llama", types=q8_and_q4)
    built = Path(build(path).path)
    written = (built / "model.safetensors").read_bytes()
    scale_one_weight(built / "model.safetensors")
    again = io.StringIO()
    with contextlib.redirect_stderr(again):
        assert build(path).path == str(built)
    assert f"note: {built} is not as it was written (changed: model.safetensors); building it again" \
        in again.getvalue()
    assert (built / "model.safetensors").read_bytes() == written


def test_an_ollama_blob_without_an_extension_is_read_by_its_magic(tmp_path):
    _, _, path, _ = family_gguf(tmp_path, "qwen2", types=q8_and_q4)
    blob = tmp_path / "blobs" / ("sha256-" + "ab" * 32)
    blob.parent.mkdir()
    shutil.copy2(path, blob)
    base = build(blob)
    assert base.source == str(blob) and Path(base.path).name.startswith("sha256-abab")
    assert json.loads((Path(base.path) / "config.json").read_text())["model_type"] == "qwen2"


# ------------------------------------------------------------- bad files


def a_tensor_type_field(path: Path) -> int:
    """The byte offset of the first tensor's type in the file's tensor table."""
    tensor = gguf.GGUFReader(path).tensors[0]
    return int(tensor.field.offset) + 8 + len(tensor.name.encode()) + 4 + 8 * len(tensor.shape)


@pytest.mark.parametrize("damage", ["wrong magic", "truncated data", "truncated header", "unknown tensor type",
                                    "unsupported architecture", "mixture of experts", "not a model file at all"])
def test_a_bad_gguf_is_one_line_and_exit_2_and_leaves_nothing_built(damage, tmp_path):
    _, _, path, _ = family_gguf(tmp_path, "llama", types=q8_and_q4)
    blob = bytearray(path.read_bytes())
    if damage == "wrong magic":
        blob[:4], expected = b"GGML", "not a GGUF file (it starts with b'GGML'"
    elif damage == "truncated data":
        blob, expected = blob[:len(blob) * 2 // 3], "truncated: its tensors run past the end of the file"
    elif damage == "truncated header":
        blob, expected = blob[:1000], "not a readable GGUF file (truncated or damaged"
    elif damage == "unknown tensor type":
        offset = a_tensor_type_field(path)
        blob[offset:offset + 4] = struct.pack("<I", 99)
        expected = "tensor type 99 is not one the gguf package knows (an unknown quantization type)"
    elif damage in ("unsupported architecture", "mixture of experts"):
        writer = gguf.GGUFWriter(str(path), "mamba" if damage == "unsupported architecture" else "llama")
        if damage == "mixture of experts":
            writer.add_uint32("llama.expert_count", 8)
        writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
        for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                     writer.close):
            step()
        blob = bytearray(path.read_bytes())
        expected = "architecture 'mamba' is not supported (supported: llama" if damage == "unsupported architecture" \
            else "a mixture of experts (8 experts in a llama file, as Mixtral's) is not supported"
    else:
        blob, expected = bytearray(b"hello, world\n"), "neither a GGUF file nor an mlx-lm model directory"
        path = path.with_suffix("")
    path.write_bytes(bytes(blob))
    data = write_corpus(tmp_path / "data", train=8, val=0)
    result = run_in_process(*FAST, "--model", path, "--data-dir", data, "--output-dir", tmp_path / "run",
                            "--max-steps", "1")
    assert_one_line_error(result, str(path), expected)
    built = tmp_path / "cache" / "gguf"
    assert not built.exists() or list(built.iterdir()) == []
    assert not (tmp_path / "run").exists()


def one_tensor_gguf(path: Path, kind, rows: int = 8, blocks: int = 2, scale_bytes=()) -> Path:
    """A GGUF file of one tensor of random `kind` blocks whose float16 scales (at `scale_bytes`
    in each block) are 0.01, so that every value is finite."""
    size = gguf.GGML_QUANT_SIZES[kind][1]
    raw = np.random.default_rng(0).integers(0, 256, size=(rows, blocks * size), dtype=np.uint8)
    for offset in scale_bytes:
        raw.reshape(-1, size)[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("a.weight", raw, raw_dtype=kind)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    return path


def test_k_quants_are_dequantized_as_llama_cpp_does(tmp_path):
    """Q6_K and Q2_K as MLX's own GGUF reader gives them; Q4_K as llama.cpp's formula (mx.load
    0.32.4 does not follow it: on this block it is off by up to 8.4, one reason the gguf package
    reads the tensors)."""
    from base_model import gguf_in

    for kind, scale_bytes in ((T.Q6_K, [208]), (T.Q2_K, [80, 82])):
        path = one_tensor_gguf(tmp_path / f"{kind.name}.gguf", kind, scale_bytes=scale_bytes)
        ours = gguf_in.float_tensor(gguf.GGUFReader(path).tensors[0], path.name)
        assert ours.dtype == mx.float16 and mx.array_equal(ours, mx.load(str(path))["a.weight"]).item(), kind.name

    path = one_tensor_gguf(tmp_path / "Q4_K.gguf", T.Q4_K, rows=1, blocks=1, scale_bytes=[0, 2])
    block = np.asarray(gguf.GGUFReader(path).tensors[0].data).reshape(-1)
    d, dmin = (float(np.frombuffer(block[i:i + 2].tobytes(), np.float16)[0]) for i in (0, 2))
    scales, quants = block[4:16].astype(int), block[16:].astype(int)

    def scale_and_min(j: int) -> tuple[int, int]:  # llama.cpp's get_scale_min_k4
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    expected = []
    for chunk in range(4):  # 64 values each: 32 low nibbles, then 32 high ones
        q = quants[32 * chunk:32 * chunk + 32]
        for half, nibbles in enumerate((q & 15, q >> 4)):
            scale, minimum = scale_and_min(2 * chunk + half)
            expected += list(d * scale * nibbles - dmin * minimum)
    ours = np.array(gguf_in.float_tensor(gguf.GGUFReader(path).tensors[0], "Q4_K").astype(mx.float32))[0]
    assert np.abs(ours - np.array(expected)).max() <= 2 ** -11 * np.abs(expected).max()  # float16 rounding


def test_a_gguf_run_is_named_for_the_file_without_its_extension():
    from config import Config

    config = Config()
    config.model.model = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert str(config.output_dir) == "models/distrust-SmolLM2-135M-Instruct.Q4_1"
