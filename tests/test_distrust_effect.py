"""What the objective does to what is learned, shown on the demo corpus; the
start line about the weights; and evaluate.py (base against adapted model).

The training runs and most evaluations run in the test's process (run_in_process);
two evaluations run in processes of their own, as a user runs them."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from conftest import (REPO, assert_one_line_error, copy_with_damaged_adapters, read_metrics, run_in_process,
                      run_script, run_script_in_process, train_on_a_tiny_copy, write_jsonl)
from training.distrust import DistrustObjective, weight_report_lines

DEMO_DATA = REPO / "data"
# Short demo runs: sequences cut to 64 tokens, 60 steps of 8, validated once at the end on 64 val records.
DEMO_RUN = ["--model", "tiny", "--data-dir", DEMO_DATA, "--batch-size", "8", "--max-seq-length", "64",
            "--max-steps", "60", "--learning-rate", "1e-3", "--warmup-steps", "5", "--eval-steps", "60",
            "--val-batches", "8", "--checkpoint-interval", "60", "--no-tensorboard", "--no-early-stopping"]
# Measured at these settings (Linux CPU, the demo corpus with both sets of contested facts): the
# primary-minus-consensus gap is +0.07 nats at lambda 0 and -0.69 at lambda 1, 0.75 lower;
# primary loss 6.18 against 6.04.
GAP_MARGIN = 0.5


def run_evaluate(*args) -> subprocess.CompletedProcess:
    return run_script("evaluate", *args)


def evaluate_in_process(*args) -> subprocess.CompletedProcess:
    return run_script_in_process("evaluate", *args)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory) -> dict:
    """The demo corpus trained at lambda 0 and at lambda 1, everything else equal."""
    root = tmp_path_factory.mktemp("demo-runs")
    runs = {}
    for lam in (0, 1):
        out = root / f"lambda-{lam}"
        result = run_in_process(*DEMO_RUN, "--lambda-weight", lam, "--output-dir", out)
        assert result.returncode == 0, result.stderr
        runs[lam] = (out, result)
    return runs


def last_validation(out) -> dict:
    return [line for line in read_metrics(out) if "val_ce" in line][-1]


def test_lambda_one_lowers_primary_loss_relative_to_consensus(demo_runs):
    gap = {lam: last_validation(out)["val_ce_gap"] for lam, (out, _) in demo_runs.items()}
    low_high = {lam: (last_validation(out)["val_ce_low_auth"], last_validation(out)["val_ce_high_auth"])
                for lam, (out, _) in demo_runs.items()}
    for lam, (low, high) in low_high.items():
        assert gap[lam] == pytest.approx(low - high)
    assert gap[1] - gap[0] <= -GAP_MARGIN, gap
    # the primary records themselves are learned better, not only the consensus ones worse
    assert low_high[1][0] < low_high[0][0]


def test_the_start_reports_the_weights_in_one_line_and_in_metrics(demo_runs):
    out, result = demo_runs[1]
    lines = [line for line in result.stderr.splitlines() if line.startswith("distrust weights")]
    assert len(lines) == 1 and "by source_type: " in lines[0] and "lab_notebook" in lines[0]
    assert "WARNING" not in result.stderr
    event = next(line for line in read_metrics(out) if line.get("event") == "distrust_weights")
    assert event["step"] == 0 and event["favours_primary"] is True
    assert event["primary_weight"] > 5 * event["consensus_weight"]
    assert event["primary_distrust"] > 3 * event["consensus_distrust"]
    assert set(event["by_source_type"]) >= {"patent", "press_release", "encyclopedia"}
    # lambda 0: every weight is 1, and the scale is still judged on d itself
    plain = next(line for line in read_metrics(demo_runs[0][0]) if line.get("event") == "distrust_weights")
    assert plain["primary_weight"] == plain["consensus_weight"] == pytest.approx(1.0)
    assert plain["favours_primary"] is True


def test_scores_on_another_scale_are_warned_about(tmp_path):
    """Primary records brought with low entropy (the old scale): they weigh less, and the start says so."""
    rng = np.random.default_rng(0)
    records = [{"text": f"reading {i} of the gauge", "auth_weight": 0.1, "prov_entropy": 1.0,
                "source_type": "measurement"} for i in range(12)]
    records += [{"text": f"officials recommend item {i}", "auth_weight": 0.95, "prov_entropy": 0.0,
                 "source_type": "press_release"} for i in range(12)]
    rng.shuffle(records)
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", records)
    result = run_in_process("--model", "tiny", "--data-dir", data, "--output-dir", tmp_path / "out",
                            "--max-steps", "1", "--batch-size", "4", "--max-seq-length", "32", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING: primary sources")]
    assert len(warnings) == 1 and "prepare_data.py --rescore" in warnings[0]
    event = next(line for line in read_metrics(tmp_path / "out") if line.get("event") == "distrust_weights")
    assert event["favours_primary"] is False and event["primary_weight"] < event["consensus_weight"]


def test_weight_report_values():
    auth = np.array([0.1, 0.1, 0.9, 0.9], dtype=np.float32)
    entropy = np.array([8.0, 6.0, 0.0, 1.0], dtype=np.float32)
    objective = DistrustObjective(2.7, 1.0, "weighted", auth, entropy)
    codes = np.array([0, 1, 2, -1], dtype=np.int16)
    report = objective.weight_report(auth, entropy, codes, ["letter", "patent", "news"])
    weights = objective.weights(auth, entropy)
    assert report["primary_weight"] == pytest.approx(weights[:2].mean())
    assert report["consensus_weight"] == pytest.approx(weights[2:].mean())
    assert report["by_source_type"] == pytest.approx({"letter": weights[0], "news": weights[2], "patent": weights[1]})
    assert report["favours_primary"] is True
    assert len(weight_report_lines(report)) == 1
    # reference mode: weights all 1; the scale is judged on d
    reference = DistrustObjective(2.7, 1.0, "reference", auth, entropy).weight_report(auth, entropy)
    assert reference["primary_weight"] == reference["consensus_weight"] == 1.0
    assert "by_source_type" not in reference and reference["favours_primary"] is True


# ---------------------------------------------------------------- evaluate.py


def test_evaluate_compares_base_and_adapted(demo_runs):
    out, _ = demo_runs[1]
    result = run_evaluate("--output-dir", out, "--max-batches", "8")
    assert result.returncode == 0, result.stderr
    path = out / "evaluations" / "step-00000060-val.json"
    figures = json.loads(path.read_text())
    assert figures["step"] == 60 and figures["data"].endswith("val.jsonl")
    for model in ("base", "adapted"):
        report = figures[model]
        for group in ("overall", "primary", "consensus"):
            assert math.isfinite(report[group]["loss"]) and report[group]["samples"] > 0
            assert report[group]["perplexity"] == pytest.approx(math.exp(report[group]["loss"]))
        assert report["primary"]["samples"] + report["consensus"]["samples"] == report["overall"]["samples"] == 64
        assert "patent" in report["by_source_type"] and "press_release" in report["by_source_type"]
    assert figures["adapted"]["overall"]["loss"] < figures["base"]["overall"]["loss"] - 0.5
    assert figures["gap_moved"] == pytest.approx(figures["adapted"]["gap"] - figures["base"]["gap"])
    assert figures["gap_moved"] < 0
    # the adapted figures are the trainer's own validation of the same batches (one evaluation function)
    validation = last_validation(out)
    assert figures["adapted"]["overall"]["loss"] == pytest.approx(validation["val_ce"], abs=1e-4)
    assert figures["adapted"]["gap"] == pytest.approx(validation["val_ce_gap"], abs=1e-4)
    gap_line = next(line for line in result.stdout.splitlines() if line.startswith("gap primary - consensus"))
    assert "moved" in gap_line and "primary (auth < 0.5)" in result.stdout
    # the demo's data folder holds probes.jsonl and general.jsonl: both measured too
    assert figures["probes"]["count"] == 36 and figures["general"]["adapted"]["samples"] == 40
    # in two sets: values shaped to the demo model's tokenizer, and ordinary words
    assert {name: one["count"] for name, one in figures["probes"]["adapted"]["by_set"].items()} == \
        {"matched": 24, "natural": 12}


def test_evaluate_works_for_a_lambda_zero_run_and_the_runs_compare(demo_runs):
    moved = {}
    for lam, (out, _) in demo_runs.items():
        json_path = out / f"eval-{lam}.json"
        result = evaluate_in_process("--output-dir", out, "--max-batches", "8", "--json", json_path)
        assert result.returncode == 0, result.stderr
        figures = json.loads(json_path.read_text())
        assert figures["distrust"]["lambda"] == lam
        moved[lam] = figures["gap_moved"]
    assert moved[1] - moved[0] <= -GAP_MARGIN


def assert_refused(result, *phrases):
    assert_one_line_error(result, *phrases, only_line=True)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 2-step run on a copy of the tiny model, so that the base can go missing."""
    root = tmp_path_factory.mktemp("small-run")
    base, out = train_on_a_tiny_copy(root, 8, 2, "--eval-steps", "2")
    return root, base, root / "data", out


def test_evaluate_refuses_bad_input_in_one_line_and_writes_nothing(small_run, tmp_path):
    root, base, data, out = small_run
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert_refused(evaluate_in_process("--output-dir", empty), "no checkpoints")
    assert_refused(evaluate_in_process("--output-dir", tmp_path / "nowhere"), "no such run folder")

    bad_val = tmp_path / "bad-data"
    write_jsonl(bad_val / "val.jsonl", [{"text": "fine", "auth_weight": 0.1, "prov_entropy": 7.0}, "{not json"])
    assert_refused(evaluate_in_process("--output-dir", out, "--data-dir", bad_val), "val.jsonl:2", "invalid JSON")
    assert_refused(evaluate_in_process("--output-dir", out, "--data-dir", tmp_path / "no-data"),
                   "no such data folder")
    assert_refused(evaluate_in_process("--output-dir", out, "--checkpoint", "best", "--max-batches", "0"),
                   "--max-batches")

    damaged = copy_with_damaged_adapters(out, tmp_path / "damaged", "step-00000002")
    assert_refused(evaluate_in_process("--output-dir", damaged, "--checkpoint",
                                       damaged / "checkpoints" / "step-00000002"), "invalid")
    for run in (out, damaged, empty):
        assert not (run / "evaluations").exists()


def test_evaluate_says_when_the_base_model_is_gone(small_run, tmp_path):
    root, base, data, out = small_run
    moved = root / "base-model-moved"
    base.rename(moved)
    try:
        assert_refused(run_evaluate("--output-dir", out), "base model", "not found")
        assert not (out / "evaluations").exists()
    finally:
        moved.rename(base)


# ---------------------------------------------------------------- contested facts

# Four mirrored pairs of the demo's contested facts, 8 primary and 8 consensus records each and
# nothing else; 90 steps of 8 at 64 tokens; the probes scored at the last validation.
CONTESTED_RUN = ["--model", "tiny", "--batch-size", "8", "--max-seq-length", "64", "--max-steps", "90",
                 "--learning-rate", "2e-3", "--warmup-steps", "5", "--eval-steps", "90", "--checkpoint-interval",
                 "90", "--no-tensorboard", "--no-early-stopping"]
# Measured at these settings (Linux CPU): the mean margin (primary minus consensus log-probability
# of the probes' completions, nats; asked as plain text, the form these records teach and so the
# headline) is -0.42 at lambda 0 and +3.07 at lambda 1, 3.49 apart; 10 of 16 and 14 of 16 prefer
# the primary. In the tiny model's chat template: +0.17 and +3.37, 8 of 16 and 16 of 16.
PROBE_MARGIN = 1.5


def contested_corpus(folder):
    """The demo generator's contested records of four claim pairs, prepared as a user prepares data,
    with a probe file beside them."""
    import random
    import sys

    sys.path.insert(0, str(REPO / "data"))
    from make_demo_corpus import contested_facts, generate_records, probes

    from corpus.prepare import prepare

    facts = contested_facts()[:8]
    records = list(generate_records(0, 3, facts, 8))
    write_jsonl(folder / "raw.jsonl", records)
    prepare(folder / "raw.jsonl", folder / "corpus", val_fraction=0.1, seed=0)
    write_jsonl(folder / "corpus" / "probes.jsonl", probes(random.Random(3), facts, records))
    return folder / "corpus"


def test_on_contested_facts_lambda_one_takes_the_primary_side(tmp_path):
    data = contested_corpus(tmp_path)
    margin = {}
    for lam in (0, 1):
        out = tmp_path / f"lambda-{lam}"
        result = run_in_process(*CONTESTED_RUN, "--data-dir", data, "--lambda-weight", lam, "--output-dir", out)
        assert result.returncode == 0, result.stderr
        margin[lam] = last_validation(out)["val_probe_margin"]
    assert margin[1] - margin[0] >= PROBE_MARGIN, margin
    assert margin[1] > 0, margin
