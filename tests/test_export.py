"""export.py on a tiny run, run as a user runs it.

The fused folder loads with mlx_lm.load and gives the logits of the trained
model (base as trained + adapters) within float tolerance, by default and
with --dequantize; --requantize is measurably not the same model. The GGUF
reads back with the `gguf` package: tensor names and shapes, vocabulary,
merges, chat template, and weights equal to the fused model's (every family:
test_gguf_export.py). Bad input is one line, exit 2, and nothing is written.

Two tests run export.py in a process of its own, as a user does; the others
run it in the test's process (conftest.run_script_in_process), and the runs
they export are trained there too.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import (FAST, REPO, assert_one_line_error, copy_with_damaged_adapters, run_in_process, run_script,
                      run_script_in_process, train_on_a_tiny_copy, write_corpus)
from gguf_checks import check_tensors, check_vocabulary, fields

EXPORT = REPO / "src" / "export.py"
PROBE = [[5, 100, 200, 300, 400, 17, 99, 1000, 3, 7] * 3]


def run_export(*args) -> subprocess.CompletedProcess:
    return run_script("export", *args)


def export_in_process(*args) -> subprocess.CompletedProcess:
    return run_script_in_process("export", *args)


def logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(PROBE)).astype(mx.float32))


def assert_refused(result, *phrases):
    assert_one_line_error(result, *phrases, only_line=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """10 steps on a local copy of the tiny model (so that the base can go missing)."""
    root = tmp_path_factory.mktemp("export")
    base, out = train_on_a_tiny_copy(root, val=8)
    return root, base, out


@pytest.fixture(scope="module")
def trained_logits(tiny_run):
    from mlx_lm import load

    _, _, out = tiny_run
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    return logits(load(adapter_config["model"], adapter_path=str(out))[0])


def test_export_is_the_trained_model_and_its_gguf_reads_back(tiny_run, trained_logits, tmp_path):
    import mlx.core as mx
    from gguf import GGUFReader, GGUFValueType
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    _, base, out = tiny_run
    save = tmp_path / "exports" / "distrust-tiny"
    result = run_export("--output-dir", out, "--save-path", save, "--gguf")
    assert result.returncode == 0, result.stderr
    assert "fused model:" in result.stdout and "GGUF:" in result.stdout
    assert sorted(p.name for p in save.parent.iterdir()) == ["distrust-tiny"]  # no temporary left

    model, tokenizer, config = load(str(save), return_config=True)
    assert np.abs(logits(model) - trained_logits).max() <= 1e-4
    # The layers with adapters are unquantized; the rest is 4-bit as trained.
    weights = dict(tree_flatten(model.parameters()))
    assert config["quantization"]["bits"] == 4
    assert "model.layers.1.self_attn.q_proj.scales" not in weights and "model.embed_tokens.scales" in weights
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template
    record = json.loads((save / "distrust_qlora_export.json").read_text())
    assert record["step"] == 10 and record["fused"] == "exact"

    # The GGUF: the fused model, unquantized, in float16, with the tiny model's GPT-2 style vocabulary.
    reader = GGUFReader(str(save / "distrust-tiny-f16.gguf"))
    parameters = {name: np.array(value.astype(mx.float32))
                  for name, value in tree_flatten(dequantize_model(model).parameters())}
    check_tensors(reader, parameters, config, "f16")
    meta = fields(reader)
    check_vocabulary(meta, base, tokenizer, 1024, "gpt2", "gpt-2")
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["general.name"] == "distrust-tiny"
    assert "<|assistant|>" in meta["tokenizer.chat_template"] and meta["tokenizer.ggml.add_bos_token"] is False
    # llama.cpp refuses token types of any other type than int32.
    assert reader.fields["tokenizer.ggml.token_type"].types == [GGUFValueType.ARRAY, GGUFValueType.INT32]


def test_dequantize_gives_the_same_model_and_requantize_does_not(tiny_run, trained_logits, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    _, _, out = tiny_run
    result = export_in_process("--output-dir", out, "--save-path", tmp_path / "float", "--dequantize")
    assert result.returncode == 0, result.stderr
    model, _, config = load(str(tmp_path / "float"), return_config=True)
    assert "quantization" not in config
    assert not any(name.endswith(".scales") for name, _ in tree_flatten(model.parameters()))
    exact = np.abs(logits(model) - trained_logits).max()
    assert exact <= 1e-4

    result = export_in_process("--output-dir", out, "--save-path", tmp_path / "small", "--requantize")
    assert result.returncode == 0, result.stderr
    assert "not exactly the trained model" in result.stdout
    drift = np.abs(logits(load(str(tmp_path / "small"))[0]) - trained_logits).max()
    assert drift > 100 * max(exact, 1e-6)


def test_an_existing_save_path_is_replaced_only_with_force(tiny_run, tmp_path):
    _, _, out = tiny_run
    save = tmp_path / "model"
    save.mkdir()
    (save / "mine.txt").write_text("keep me")
    assert_refused(run_export("--output-dir", out, "--save-path", save), "exists", "--force")
    assert [p.name for p in save.iterdir()] == ["mine.txt"]

    result = run_export("--output-dir", out, "--save-path", save, "--force")
    assert result.returncode == 0, result.stderr
    assert not (save / "mine.txt").exists() and (save / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_run, tmp_path):
    root, base, out = tiny_run
    save = tmp_path / "exported"
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert_refused(export_in_process("--output-dir", empty, "--save-path", save), "no checkpoints", "no adapters")
    assert_refused(export_in_process("--output-dir", tmp_path / "nowhere", "--save-path", save), "no such run folder")
    assert_refused(export_in_process("--output-dir", out, "--save-path", save, "--checkpoint", "step-00000099"),
                   "does not exist")
    assert_refused(export_in_process("--output-dir", out, "--save-path", out, "--force"), "would replace")

    damaged = copy_with_damaged_adapters(out, tmp_path / "damaged", "step-00000010")
    assert_refused(export_in_process("--output-dir", damaged, "--save-path", save,
                                     "--checkpoint", damaged / "checkpoints" / "step-00000010"), "invalid")

    moved = root / "tiny-base-moved"
    base.rename(moved)
    try:
        assert_refused(export_in_process("--output-dir", out, "--save-path", save), "base model", "not found")
    finally:
        moved.rename(base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "empty-run"]


def test_the_layout_line_counts_each_bit_width_of_a_base_with_mixed_bits(tmp_path, monkeypatch):
    """A GGUF of Q8_0 embedding, output and attention and Q4_0 MLP (as llama.cpp's mixed files,
    or a Q4_1 file with a Q8_0 embedding) is a base of 8- and 4-bit layers: the line says how many
    of each stay as trained, and to what the fused layers are quantized again, as the folder holds."""
    from mlx_lm import load
    import mlx.core as mx
    from test_gguf_import import IDS, family_gguf, q8_and_q4

    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))
    _, _, path, _ = family_gguf(tmp_path, "llama", types=q8_and_q4)  # 2 blocks, lm_head of its own
    data = write_corpus(tmp_path / "data", train=8, val=0)
    run = tmp_path / "run"
    result = run_in_process(*FAST, "--model", path, "--data-dir", data, "--output-dir", run, "--max-steps", "1",
                            "--lora-keys", "self_attn.q_proj", "mlp.down_proj")
    assert result.returncode == 0, result.stderr
    # Embedding, lm_head and 4 attention layers a block 8-bit, 3 MLP layers a block 4-bit; 4 are fused (unquantized).
    assert f"model: {path} (10 layers 8-bit, 6 4-bit; its mlx-lm folder" in result.stderr

    def bits_in(folder):
        model, config = load(str(folder), return_config=True)[::2]
        quantization = config["quantization"]
        return sorted(quantization.get(name, quantization)["bits"] if hasattr(module, "bits") else 0
                      for name, module in model.named_modules() if hasattr(module, "to_quantized")
                      or hasattr(module, "bits"))

    exact = export_in_process("--output-dir", run, "--save-path", tmp_path / "exact", "--gguf")
    assert exact.returncode == 0, exact.stderr
    assert (tmp_path / "exact" / "exact-f16.gguf").is_file()  # GGUF in, trained, GGUF out
    assert "(4 fused layers unquantized, the others as trained: 8 layers 8-bit, 4 4-bit;" in exact.stdout
    assert bits_in(tmp_path / "exact") == [0] * 4 + [4] * 4 + [8] * 8
    # It loads as an ordinary mlx-lm folder (no fused layer named as quantized) and is the trained model.
    trained = load(json.loads((run / "adapter_config.json").read_text())["model"], adapter_path=str(run))[0]
    fused, expected = (model(mx.array([IDS])).astype(mx.float32) for model in (load(str(tmp_path / "exact"))[0],
                                                                                 trained))
    # Within float16 rounding: the file's scales are float16, so are the fused weights.
    assert mx.abs(fused - expected).max().item() <= 5e-3 * mx.abs(expected).max().item()
    again = export_in_process("--output-dir", run, "--save-path", tmp_path / "again", "--requantize")
    assert again.returncode == 0, again.stderr
    assert "(4 fused layers quantized again to their own bits (2 layers 8-bit, 2 4-bit): not exactly the " \
           "trained model;" in again.stdout
    assert bits_in(tmp_path / "again") == [4] * 6 + [8] * 10
