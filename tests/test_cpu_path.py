"""The CPU path: an optimized BLAS under MLX (run_safety/cpu_blas.py) and the base's float copy (base_model/float_base.py).

Runs on the tiny model. The float copy is checked in the test's process (the same function
as the 4-bit layers up to rounding; only the adapters train), and end to end: the start
lines, adapters mlx-lm loads on the 4-bit base, a resume that computes the other way. The
BLAS is chosen when a process starts, so its tests run the command in processes of their own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import (FAST, adapters_equal, assert_one_line_error, load_adapters, load_tiny, run_cli, run_in_process, train_lines,
                      write_corpus)

FLOAT_LINE = "base: computes with float32 copies of its quantized layers"
QUANTIZED_LINE = "base: computes in its quantized form"


def logits_of(model, tokens):
    import mlx.core as mx

    return model(tokens).astype(mx.float32)


def test_the_float_copy_is_the_quantized_function_and_only_the_adapters_train():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from base_model.float_base import choose, copy_sizes, quantized_layers, use_float_base
    from base_model.lora import attach_lora

    quantized, floated = load_tiny().model, load_tiny().model
    for model in (quantized, floated):
        attach_lora(model, 4, 8.0, -1, 0.0, 0)
    # LoRA's B starts at zero: the same values in both, so that the adapters take part in what is compared.
    for model in (quantized, floated):
        model.update(tree_unflatten([(name, mx.full(value.shape, 0.01, value.dtype))
                                     for name, value in tree_flatten(model.trainable_parameters())
                                     if name.endswith("lora_b")]))
    trainable = sorted(name for name, _ in tree_flatten(floated.trainable_parameters()))
    assert choose("auto", floated) == (True, "--float-base auto: the CPU backend, and the copy fits")
    assert choose("off", floated)[0] is False
    float_bytes, quantized_bytes = copy_sizes(floated)
    layers = len(quantized_layers(floated))
    assert layers > 0 and float_bytes > 4 * quantized_bytes

    assert use_float_base(floated) == layers
    assert quantized_layers(floated) == []
    assert sorted(name for name, _ in tree_flatten(floated.trainable_parameters())) == trainable  # the copies frozen
    # The layer inside LoRALinear was replaced too, by a float32 one.
    inner = floated.model.layers[-1].self_attn.q_proj.linear
    assert type(inner) is nn.Linear and inner.weight.dtype == mx.float32
    tokens = mx.array([[3, 17, 42, 99, 7, 250, 11, 5]])
    a, b = logits_of(quantized, tokens), logits_of(floated, tokens)
    assert mx.abs(a - b).max().item() < 1e-2 * max(mx.abs(a).max().item(), 1.0)
    assert mx.array_equal(a.argmax(-1), b.argmax(-1)).item()
    assert choose("on", floated) == (False, "the base has no quantized layers")


def test_a_run_with_the_float_copy_says_so_and_its_adapters_load_on_the_4bit_base(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    from base_model.float_base import use_float_base

    data = write_corpus(tmp_path / "data", train=24, val=0)
    runs = {}
    for setting in ("auto", "off", "off-again"):
        out = tmp_path / setting
        result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "4",
                                "--float-base", setting.split("-")[0])
        assert result.returncode == 0, result.stderr
        runs[setting] = out, result.stderr
    assert FLOAT_LINE in runs["auto"][1] and "(--float-base auto: the CPU backend, and the copy fits)" in runs["auto"][1]
    assert QUANTIZED_LINE in runs["off"][1] and "--float-base off" in runs["off"][1]
    # The same training up to rounding: the first step's loss (adapters at their start) nearly equal.
    first = [train_lines(runs[setting][0])[0]["ce"] for setting in ("auto", "off")]
    assert first[0] == pytest.approx(first[1], abs=1e-3)

    out = runs["auto"][0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert "quantization" in json.loads((Path(config["model"]) / "config.json").read_text())
    on_4bit, _ = load(config["model"], adapter_path=str(out))  # the adapters are the quantized base's
    floated, _ = load(config["model"], adapter_path=str(out))
    use_float_base(floated)
    tokens = mx.array([[3, 17, 42, 99, 7, 250, 11, 5]])
    a, b = logits_of(on_4bit, tokens), logits_of(floated, tokens)
    assert mx.abs(a - b).max().item() < 1e-2 * max(mx.abs(a).max().item(), 1.0)
    assert set(load_adapters(out)) == set(load_adapters(runs["off"][0]))  # the same adapter file either way
    # The quantized way (Metal's and CUDA's) stays deterministic: the same seed, the same adapters.
    assert adapters_equal(load_adapters(runs["off"][0]), load_adapters(runs["off-again"][0]))


def test_a_resume_that_computes_the_other_way_continues_and_says_it_is_not_bit_for_bit(tmp_path):
    data = write_corpus(tmp_path / "data", train=24, val=0)
    out = tmp_path / "out"
    args = (*FAST, "--data-dir", data, "--output-dir", out, "--checkpoint-interval", "2")
    assert run_in_process(*args, "--max-steps", "2").returncode == 0
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["trainer"]["arithmetic"]["float_base"] is True
    result = run_in_process(*args, "--max-steps", "4", "--float-base", "off", "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "computed otherwise (float_base True -> False)" in result.stderr and "not bit for bit" in result.stderr
    result = run_in_process(*args, "--max-steps", "6", "--float-base", "off", "--auto-resume")
    assert result.returncode == 0 and "computed otherwise" not in result.stderr  # the same way: nothing to say


def test_float_base_settings_and_bad_values(tmp_path):
    from command_line.settings_file import read_settings_file
    from config import Config

    path = tmp_path / "run.yaml"
    for written, value in (("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on")):
        path.write_text(f"model: tiny\nfloat_base: {written}\n")
        assert Config.from_dict(read_settings_file(path).values).model.float_base == value
    result = run_in_process(*FAST, "--data-dir", write_corpus(tmp_path / "data"), "--output-dir", tmp_path / "bad",
                            "--float-base", "fast")
    assert_one_line_error(result, "--float-base", "auto, on, off", "'fast'")
    assert not (tmp_path / "bad").exists()


def test_the_blas_is_said_at_start_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    from run_safety import cpu_blas

    if cpu_blas.blas_line() is None:
        pytest.skip("not MLX's Linux CPU wheel: no BLAS is loaded here")
    data = write_corpus(tmp_path / "data", train=16, val=0)
    monkeypatch.setenv(cpu_blas.BLAS_VARIABLE, str(tmp_path / "no-such-blas.so"))
    result = run_cli(*FAST, "--data-dir", data, "--output-dir", tmp_path / "bad", "--max-steps", "1")
    assert_one_line_error(result, "DISTRUST_QLORA_BLAS=", "no-such-blas.so", "cblas_sgemm", "bundled")
    assert not (tmp_path / "bad").exists()

    monkeypatch.setenv(cpu_blas.BLAS_VARIABLE, "bundled")
    result = run_cli(*FAST, "--data-dir", data, "--output-dir", tmp_path / "bundled", "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("blas:")]
    assert said == ["blas: MLX's bundled reference BLAS (DISTRUST_QLORA_BLAS=bundled): float32 matrix products "
                    "about 29-37x slower than OpenBLAS"]


def test_openblas_threads_are_pinned_and_a_resume_with_other_threads_says_so(tmp_path, monkeypatch):
    from run_safety import cpu_blas

    if cpu_blas.blas_identity().get("blas_threads") is None:
        pytest.skip(f"no optimized BLAS in this process ({cpu_blas.blas_line()})")
    pinned = os.environ[cpu_blas.THREADS_VARIABLE]  # set by the conftest's load, before the library started
    args = (*FAST, "--data-dir", write_corpus(tmp_path / "data", train=24, val=0), "--checkpoint-interval", "2")
    result = run_in_process(*args, "--output-dir", tmp_path / "out", "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    assert f", {pinned} threads (OPENBLAS_NUM_THREADS)" in result.stderr
    other = "1" if pinned != "1" else "2"
    monkeypatch.setenv(cpu_blas.THREADS_VARIABLE, other)  # the user's value is kept: the child multiplies with it
    resumed = shutil.copytree(tmp_path / "out", tmp_path / "resumed")
    result = run_cli(*args, "--output-dir", resumed, "--max-steps", "4", "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert f", {other} threads (OPENBLAS_NUM_THREADS)" in result.stderr
    assert f"blas_threads {pinned} -> {other}" in result.stderr and "not bit for bit" in result.stderr
