"""End to end: the training command on the tiny model, real MLX steps, no network.

The first test runs the command in a process of its own, as a user does; the others
run it in the test's process (conftest.run_in_process): the same command, the same
result object, without a new interpreter, MLX import and model load for each run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import (FAST, adapters_equal, load_adapters, read_metrics, run_cli, run_in_process, train_lines,
                      write_corpus)


def test_loss_falls_and_mlx_lm_loads_the_adapters(corpus, tmp_path):
    out = tmp_path / "out"
    result = run_cli(*FAST, "--data-dir", corpus, "--output-dir", out, "--max-steps", "40")
    assert result.returncode == 0, result.stderr
    losses = [line["ce"] for line in train_lines(out)]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3  # about 0.5 on this corpus

    metrics = read_metrics(out)
    assert any("val_ce" in line for line in metrics)
    assert metrics[-1]["event"] == "end" and "max-steps" in metrics[-1]["reason"]

    from mlx_lm import generate, load

    import json
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["fine_tune_type"] == "lora" and adapter_config["num_layers"] == 2
    model, tokenizer = load(adapter_config["model"], adapter_path=str(out))
    text = generate(model, tokenizer, prompt="the measurement", max_tokens=5)
    assert isinstance(text, str)


def test_same_seed_gives_identical_adapters_and_another_seed_does_not(corpus, tmp_path):
    runs = {}
    # "a" in a process of its own, "b" and "c" in this one (after whatever ran here before):
    # the same seed gives the same adapters in a fresh process and in a used one.
    for name, seed, run in (("a", 0, run_cli), ("b", 0, run_in_process), ("c", 1, run_in_process)):
        out = tmp_path / name
        result = run(*FAST, "--data-dir", corpus, "--output-dir", out, "--max-steps", "8",
                     "--lora-dropout", "0.1", "--seed", seed)
        assert result.returncode == 0, result.stderr
        runs[name] = load_adapters(out)
    assert adapters_equal(runs["a"], runs["b"])
    assert not adapters_equal(runs["a"], runs["c"])


def test_lambda_zero_is_plain_cross_entropy_and_reference_mode_learns_the_same(corpus, tmp_path):
    settings = (*FAST, "--data-dir", corpus, "--max-steps", "6")
    runs = {
        "lambda0": ("--lambda-weight", "0"),
        "reference": ("--distrust-mode", "reference"),
        "lambda1": ("--lambda-weight", "1"),
    }
    for name, flags in runs.items():
        result = run_in_process(*settings, *flags, "--output-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr

    for line in train_lines(tmp_path / "lambda0"):
        assert line["objective"] == line["ce"]
    # The published term has no gradient: exactly what plain cross-entropy learns.
    assert adapters_equal(load_adapters(tmp_path / "lambda0"), load_adapters(tmp_path / "reference"))
    # The weighted objective acts: lambda = 1 learns something else.
    assert not adapters_equal(load_adapters(tmp_path / "lambda0"), load_adapters(tmp_path / "lambda1"))


def test_reference_mode_logs_the_published_formula(tmp_path):
    # Every sample has the same scores, so the term is known whatever the batch.
    corpus = write_corpus(tmp_path / "data", auth_weight=0.2, prov_entropy=1.5)
    out = tmp_path / "out"
    result = run_in_process(*FAST, "--data-dir", corpus, "--output-dir", out, "--max-steps", "3",
                            "--distrust-mode", "reference", "--alpha", "2.7", "--lambda-weight", "0.5")
    assert result.returncode == 0, result.stderr
    expected = 0.5 * 2.7 * (math.log(1 - 0.2 + 1e-8) + 1.5) ** 2
    for line in train_lines(out):
        assert line["objective"] - line["ce"] == pytest.approx(expected, rel=1e-6)  # scores are stored as float32


def test_without_val_file_the_run_completes_with_a_note(tmp_path):
    corpus = write_corpus(tmp_path / "data", val=0)
    result = run_in_process(*FAST, "--data-dir", corpus, "--output-dir", tmp_path / "out", "--max-steps", "5")
    assert result.returncode == 0, result.stderr
    assert "training without validation" in result.stderr


def test_gradient_accumulation_takes_the_micro_batches_of_the_same_stream(corpus, tmp_path):
    for name, accum in (("one", "1"), ("two", "2")):
        result = run_in_process(*FAST, "--data-dir", corpus, "--output-dir", tmp_path / name, "--max-steps",
                                "6" if accum == "1" else "3", "--grad-accum", accum)
        assert result.returncode == 0, result.stderr
    one, two = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    # Same batch size, so the same batches: step k of accumulation 2 holds batches 2k-1 and 2k.
    assert [line["tokens"] for line in two] == [a["tokens"] + b["tokens"] for a, b in zip(one[::2], one[1::2])]
    assert all(math.isfinite(line["objective"]) for line in two)
