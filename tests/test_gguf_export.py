"""export.py --gguf for every family it writes, on tiny random models of that
architecture (mlx-lm's model classes) with tokenizers trained here in the
family's style (tiny_families): each is trained for two steps, exported as the
user exports it, and the GGUF read back with the `gguf` package: tensor names,
shapes and types, weights equal to the fused model's within the type's
rounding (Q/K permutation undone, Gemma's norm + 1 undone), the metadata
llama.cpp reads (hyper-parameters, vocabulary, special tokens, BOS flag, chat
template). Bad cases: one line, exit 2, nothing written.

llama.cpp itself runs these files in bench/bench_gguf_llamacpp.py (not here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FAST, assert_one_line_error, run_in_process, run_script_in_process, write_corpus
from gguf_checks import ARCHITECTURES, check_tensors, check_vocabulary, dequantized, fields

from base_model import tiny_families

# family -> (tokenizer.ggml.model, tokenizer.ggml.pre)
VOCABULARIES = {"llama": ("llama", None), "smollm": ("gpt2", "smollm"), "llama3": ("gpt2", "llama-bpe"),
                "mistral": ("llama", None), "mixtral": ("llama", None), "qwen2": ("gpt2", "qwen2"),
                "qwen3": ("gpt2", "qwen2"), "gemma2": ("llama", None), "gemma3": ("llama", None),
                "phi3": ("llama", None)}


ROUND_TRIP_TEXTS = ["The measurement was taken at dawn, and 1887 readings say it's 42.5 km.",
                    "Two  spaces,\nnew lines\n\nCafé 東京 🙂", "def f(x):\n    return x * 2\n"]


def export_in_process(*args):
    return run_script_in_process("export", *args)


@pytest.fixture(scope="module")
def families_root(tmp_path_factory):
    """A model cache of this module's own (each family's quantized copy is built once in it)."""
    root = tmp_path_factory.mktemp("gguf-families")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTRUST_QLORA_CACHE", str(root / "cache"))
        yield root


def train_family(root, family: str):
    base = tiny_families.build_family_model(family, root / family / "base")
    corpus = write_corpus(root / family / "data", train=8, val=0)
    run = root / family / "run"
    result = run_in_process(*FAST, "--model", base, "--data-dir", corpus, "--output-dir", run, "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    return base, run


@pytest.mark.parametrize("family", list(tiny_families.FAMILIES))
def test_each_family_exports_a_gguf_llama_cpp_reads(family, families_root):
    import mlx.core as mx
    from gguf import GGUFReader
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from base_model import gguf_out

    base, run = train_family(families_root, family)
    gguf_type = {"qwen2": "q4_0", "phi3": "q8_0"}.get(family, "f16")  # the other types below, from the writer
    save = families_root / family / f"distrust-{family}"
    result = export_in_process("--output-dir", run, "--save-path", save, "--gguf-type", gguf_type)
    assert result.returncode == 0, result.stderr
    path = save / f"distrust-{family}-{gguf_type}.gguf"
    assert f"GGUF: {path} ({gguf_type}; " in result.stdout
    record = json.loads((save / "distrust_qlora_export.json").read_text())
    assert record["gguf"] == path.name and record["gguf_type"] == gguf_type

    model, tokenizer, config = load(str(save), return_config=True)
    parameters = {name: np.array(value.astype(mx.float32))
                  for name, value in tree_flatten(dequantize_model(model).parameters())}
    rows = parameters["model.embed_tokens.weight"].shape[0]
    reader = GGUFReader(str(path))
    meta = fields(reader)
    check_tensors(reader, parameters, config, gguf_type)
    check_vocabulary(meta, save, tokenizer, rows, *VOCABULARIES[family])

    arch = ARCHITECTURES[config["model_type"]]
    assert meta["general.architecture"] == arch and meta["general.name"] == save.name
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[gguf_type]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected = {"block_count": config["num_hidden_layers"], "embedding_length": config["hidden_size"],
                "feed_forward_length": config["intermediate_size"], "context_length": 2048,
                "attention.head_count": config["num_attention_heads"],
                "attention.head_count_kv": config["num_key_value_heads"], "attention.key_length": head_dim,
                "attention.value_length": head_dim, "rope.dimension_count": head_dim,
                "rope.freq_base": config["rope_theta"]}
    for key, value in expected.items():
        assert meta[f"{arch}.{key}"] == pytest.approx(value), key
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    if family == "mixtral":
        assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    if family == "llama3":  # the factors Llama 3's RoPE divides frequencies by: what MLX's RoPE uses
        rope = model.model.layers[0].self_attn.rope
        factors = np.array(rope._freqs) / config["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        written = dequantized(next(t for t in reader.tensors if t.name == "rope_freqs.weight"))
        np.testing.assert_allclose(written, factors, rtol=1e-5)
        assert written.min() == 1.0 and written.max() == 8.0  # both ends of the scaling are reached
    if family == "gemma2":
        assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"]) == (50.0, 30.0)
        assert meta["gemma2.attention.sliding_window"] == 4096
    if family == "gemma3":
        assert meta["gemma3.attention.sliding_window"] == 8
        assert meta["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert meta["gemma3.rope.freq_base_swa"] == 10000.0
        assert (meta["gemma3.rope.scaling.type"], meta["gemma3.rope.scaling.factor"]) == ("linear", 8.0)
    if family == "phi3":
        # llama.cpp lets Phi-3's chat tokens swallow the white space after them (as its tokenizer does)
        # only for a model whose name says phi3: another name gets it.
        renamed = families_root / family / "mine.gguf"
        gguf_out.export_model_dir(save, renamed, "f16", "mine")
        assert fields(GGUFReader(str(renamed)))["general.name"] == "mine (phi3)"
    if family in ("gemma2", "gemma3"):
        assert meta["tokenizer.ggml.add_space_prefix"] is False
    elif VOCABULARIES[family][0] == "llama":
        assert meta["tokenizer.ggml.add_space_prefix"] is True

    # Round trip: the f16 file read back as a base (--model FILE.gguf's own path, kept unquantized) is the
    # fused model within float16 rounding, and tokenizes as it does. (The import takes no mixture of experts.)
    if family != "mixtral":
        from base_model import gguf_in

        f16 = path if gguf_type == "f16" else families_root / family / "round-trip-f16.gguf"
        if f16 != path:
            gguf_out.export_model_dir(save, f16, "f16", save.name)
        again, again_tokenizer = load(gguf_in.prepare_gguf_base(str(f16), 0).path)
        ids = mx.array([tokenizer.encode(ROUND_TRIP_TEXTS[0])])
        want, got = (np.array(m(ids).astype(mx.float32)) for m in (model, again))
        assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()
        assert [again_tokenizer.encode(text) for text in ROUND_TRIP_TEXTS] == \
            [tokenizer.encode(text) for text in ROUND_TRIP_TEXTS]

    # The other types, from the writer's function on the fused folder.
    others = sorted({"f16", "q8_0", "q4_0"} - {gguf_type}) if family in ("smollm", "mixtral", "gemma3") else []
    for other in others:
        target = families_root / family / f"{other}.gguf"
        summary = gguf_out.export_model_dir(save, target, other)
        assert summary["bytes"] == target.stat().st_size
        check_tensors(GGUFReader(str(target)), parameters, config, other)


def test_an_architecture_not_written_and_a_bad_type_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """OLMo 2 (a llama-like model llama.cpp runs, which this export does not write)."""
    import mlx.core as mx
    from mlx_lm.models import olmo2
    from mlx_lm.utils import save_config, save_model

    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "tiny-olmo2"
    tiny_families.write_tokenizer(base, "gpt2")
    config = {"model_type": "olmo2", "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
              "num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 600, "eos_token_id": 0}
    mx.random.seed(0)
    model = olmo2.Model(olmo2.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(base, model)
    save_config(config, base / "config.json")
    corpus = write_corpus(tmp_path / "data", train=8, val=0)
    run = tmp_path / "run"
    result = run_in_process(*FAST, "--model", base, "--data-dir", corpus, "--output-dir", run, "--max-steps", "2")
    assert result.returncode == 0, result.stderr

    save = tmp_path / "exported"
    assert_one_line_error(export_in_process("--output-dir", run, "--save-path", save, "--gguf"),
                          "--gguf", "'olmo2'", "qwen3, gemma2, gemma3 and phi3", "convert_hf_to_gguf.py", only_line=True)
    result = export_in_process("--output-dir", run, "--save-path", save, "--gguf-type", "q5_k")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--gguf-type: invalid choice: 'q5_k'" in result.stderr and "'q4_0'" in result.stderr
    assert not save.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "run", "tiny-olmo2"]


def test_vocabularies_and_rope_scalings_llama_cpp_would_read_wrong_are_refused(tmp_path):
    """The plan refuses, naming why, what llama.cpp would tokenize or position differently."""
    from mlx_lm.utils import load_tokenizer

    from base_model import gguf_out
    from run_safety.errors import UserError

    base = tiny_families.build_family_model("qwen2", tmp_path / "qwen2")
    config = json.loads((base / "config.json").read_text())
    spec = json.loads((base / "tokenizer.json").read_text())
    plan = gguf_out.plan_gguf(config, base, load_tokenizer(base), "q4_0")
    assert (plan.arch, plan.vocabulary.model, plan.vocabulary.pre) == ("qwen2", "gpt2", "qwen2")

    def refusal(config: dict, spec: dict) -> str:
        (base / "tokenizer.json").write_text(json.dumps(spec))
        with pytest.raises(UserError) as caught:
            gguf_out.plan_gguf(config, base, load_tokenizer(base))
        return str(caught.value)

    other_split = json.loads(json.dumps(spec))
    other_split["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    assert "splits text in a way llama.cpp has no name for" in refusal(config, other_split)
    unigram = dict(spec, model={"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]})
    assert "Unigram" in refusal(config, unigram)
    yarn = dict(config, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})
    assert "RoPE scaling 'yarn'" in refusal(yarn, spec)
