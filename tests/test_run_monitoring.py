"""Run monitoring, end to end: early stopping, non-finite steps, validation, TensorBoard.

Each test runs the training command on the tiny model and reads back what the
run wrote: metrics.jsonl, checkpoints, the TensorBoard events. Killed runs and the
runs that resume them run in processes of their own; the others in the test's
process (run_in_process).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (FAST, REPO, TRAIN_SCRIPT, adapters_equal, load_adapters, make_record, read_metrics,
                      read_tensorboard, run_cli, run_in_process, train_lines, write_corpus, write_jsonl)

WITH_EARLY_STOPPING = [a for a in FAST if a != "--no-early-stopping"]

# Gradient spikes: every norm is above the threshold; spikes count only after
# warmup (2 steps), so the run stops at step warmup + patience, before its update.
SPIKE_PATIENCE = 6
SPIKE_STOP = 2 + SPIKE_PATIENCE
SPIKE = [*WITH_EARLY_STOPPING, "--checkpoint-interval", "1", "--max-steps", "40",
         "--grad-spike-threshold", "1e-6", "--grad-spike-patience", str(SPIKE_PATIENCE)]

# Plateau: the smoothing window is 50 steps, checks come every 5 steps after it
# fills; with a huge min-delta the first check (step 50) sets the best and the
# next one (step 55) stops with patience 1.
PLATEAU_STOP = 55
PLATEAU = [*WITH_EARLY_STOPPING, "--max-steps", "80", "--eval-steps", "5",
           "--early-stopping-patience", "1", "--early-stopping-min-delta", "1e9"]


# ----------------------------------------------------------------- helpers


def start_cli(*args, stderr_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stderr_path, "w") as err:
        return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def wait_until(predicate, process: subprocess.Popen, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return predicate()
        time.sleep(0.001)
    raise AssertionError(f"timed out after {timeout}s")


def committed_steps(stderr_path: Path) -> list[int]:
    lines = stderr_path.read_text().splitlines()
    return [int(line.rsplit("step-", 1)[1]) for line in lines
            if line.startswith("checkpoint: ") and line.rsplit("step-", 1)[1].isdigit()]


def kill_after(args, log: Path, *, committed: int) -> None:
    """Start the run, SIGKILL it right after its checkpoint at step >= `committed`."""
    process = start_cli(*args, stderr_path=log)
    wait_until(lambda: any(step >= committed for step in committed_steps(log)), process)
    assert process.poll() is None, "the run ended before the kill:\n" + log.read_text()
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def pointer(out: Path, name: str) -> str:
    return (out / "checkpoints" / name).read_text().strip()


def end_line(out: Path) -> dict:
    end = read_metrics(out)[-1]
    assert end["event"] == "end", end
    return end


def figures(out: Path) -> list[tuple]:
    return [(line["step"], line["objective"], line.get("ce"), line.get("grad_norm")) for line in train_lines(out)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def data_low_auth_val(tmp_path_factory) -> Path:
    """Validation samples all of low authority: only the low-authority split exists."""
    directory = write_corpus(tmp_path_factory.mktemp("data_low"), val=0)
    rng = random.Random(7)
    write_jsonl(directory / "val.jsonl", [make_record(rng, auth_weight=round(rng.uniform(0, 0.4), 3))
                                          for _ in range(16)])
    return directory


@pytest.fixture(scope="module")
def data_no_val(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data_no_val"), val=0)


@pytest.fixture(scope="module")
def spike_run(data_low_auth_val, tmp_path_factory):
    out = tmp_path_factory.mktemp("spike") / "out"
    result = run_in_process(*SPIKE, "--data-dir", data_low_auth_val, "--output-dir", out)
    return out, result


@pytest.fixture(scope="module")
def plateau_run(data_no_val, tmp_path_factory):
    out = tmp_path_factory.mktemp("plateau") / "out"
    result = run_in_process(*PLATEAU, "--data-dir", data_no_val, "--output-dir", out)
    return out, result


@pytest.fixture(scope="module")
def validated_run(data, tmp_path_factory):
    """Validation at steps 5, 10 and the last (12), TensorBoard on."""
    out = tmp_path_factory.mktemp("validated") / "out"
    args = [a for a in FAST if a != "--no-tensorboard"]
    result = run_in_process(*args, "--max-steps", "12", "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return out, result


# ------------------------------------------------------------ early stopping


def test_gradient_spikes_stop_right_after_warmup_plus_patience(spike_run):
    out, result = spike_run
    assert result.returncode == 0, result.stderr
    reason = end_line(out)["reason"]
    assert "gradient norm above" in reason and f"step {SPIKE_STOP}" in reason, reason
    assert reason in result.stderr
    # The stopping step is logged, its update never applied: the final checkpoint
    # is the step before, and the adapters at the top are that checkpoint's.
    lines = train_lines(out)
    assert [line["step"] for line in lines] == list(range(1, SPIKE_STOP + 1))
    assert all(line["grad_norm"] > 1e-6 for line in lines)
    assert end_line(out)["steps"] == SPIKE_STOP - 1
    final = out / "checkpoints" / pointer(out, "final")
    assert final.name == f"step-{SPIKE_STOP - 1:08d}" and (final / "manifest.json").is_file()
    assert adapters_equal(load_adapters(final), load_adapters(out))


def test_a_plateau_with_a_huge_min_delta_stops_at_the_second_check(plateau_run):
    out, result = plateau_run
    assert result.returncode == 0, result.stderr
    reason = end_line(out)["reason"]
    assert reason.startswith("plateau") and "at step 50" in reason, reason
    assert reason in result.stderr
    assert train_lines(out)[-1]["step"] == PLATEAU_STOP
    assert pointer(out, "final") == f"step-{PLATEAU_STOP:08d}"
    # Without a val file the run goes on without validation and says so.
    assert "no " in result.stderr and "val.jsonl" in result.stderr and "without validation" in result.stderr
    assert not [line for line in read_metrics(out) if "val_ce" in line]
    assert not (out / "checkpoints" / "best").exists()


def test_a_non_finite_loss_stops_before_the_update(data, tmp_path):
    out = tmp_path / "out"
    # An absurd learning rate: the weights blow up and the loss turns NaN within
    # a few steps; still with plateau detection off, non-finite steps stop the run.
    result = run_in_process(*FAST, "--learning-rate", "1e30", "--checkpoint-interval", "1", "--max-steps", "30",
                            "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    reason = end_line(out)["reason"]
    assert "non-finite" in reason and "before the update" in reason, reason
    assert reason in result.stderr
    lines = train_lines(out)
    bad = lines[-1]
    assert bad["objective"] is None or not math.isfinite(bad["objective"])  # NaN is written as null
    assert all(line["objective"] is not None and math.isfinite(line["objective"]) for line in lines[:-1])
    assert len(lines) < 30
    # Every checkpoint holds finite adapters; the top-level ones are the final checkpoint's.
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        for name, array in load_adapters(checkpoint).items():
            assert np.isfinite(np.array(array)).all(), (checkpoint.name, name)
    final = out / "checkpoints" / pointer(out, "final")
    assert final.name == f"step-{bad['step'] - 1:08d}"
    assert adapters_equal(load_adapters(final), load_adapters(out))


# --------------------------------------------------------------- validation


def test_validation_lines_come_at_the_eval_steps_and_the_end_and_best_names_the_minimum(data, validated_run):
    out, _ = validated_run
    vals = [line for line in read_metrics(out) if "val_ce" in line]
    assert [line["step"] for line in vals] == [5, 10, 12]
    # The val batches (the first batch_size * val_batches samples) hold both kinds of source.
    auth = [json.loads(line)["auth_weight"] for line in (data / "val.jsonl").read_text().splitlines()[:8]]
    assert min(auth) < 0.5 <= max(auth)
    for line in vals:
        for key in ("val_ce", "val_ce_low_auth", "val_ce_high_auth"):
            assert isinstance(line[key], float) and math.isfinite(line[key]), (key, line)
        assert "objective" not in line  # validation lines are not training lines
    best = min(vals, key=lambda line: line["val_ce"])
    assert pointer(out, "best") == f"step-{best['step']:08d}"
    assert (out / "checkpoints" / pointer(out, "best") / "manifest.json").is_file()
    assert end_line(out)["best_val_step"] == best["step"]


def test_a_val_set_of_one_kind_reports_only_that_split(spike_run):
    out, _ = spike_run
    vals = [line for line in read_metrics(out) if "val_ce" in line]
    assert [line["step"] for line in vals] == [5]
    assert "val_ce_low_auth" in vals[0] and "val_ce_high_auth" not in vals[0]


def expected_learning_rate(t: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup from 0 over `warmup` updates, then cosine decay to 0 at `total`: by hand."""
    if t < warmup:
        return peak * t / warmup
    decay_steps = max(total - warmup, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(t - warmup, decay_steps) / decay_steps))


def test_the_logged_learning_rate_is_the_one_each_step_used(validated_run):
    """Step k's update uses the rate at t = k - 1 (the optimizer counts from 0);
    the lr written on step k's line must be that one, not the previous step's."""
    out, _ = validated_run
    logged = [line["lr"] for line in train_lines(out)]
    used = [expected_learning_rate(step - 1, 3e-3, 2, 12) for step in range(1, 13)]
    assert logged == pytest.approx(used, rel=1e-5, abs=1e-12), list(zip(logged, used))
    assert logged[0] == 0.0 and logged[2] == pytest.approx(3e-3)  # warmup from 0, the peak right after it


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_schedule_with_and_without_warmup(warmup):
    import mlx.core as mx

    from training.optimization import learning_rate_schedule

    schedule = learning_rate_schedule(1e-3, warmup, 10)
    rates = [schedule(mx.array(t)).item() for t in range(11)]
    assert rates == pytest.approx([expected_learning_rate(t, 1e-3, warmup, 10) for t in range(11)], rel=1e-5,
                                  abs=1e-10)
    if warmup == 0:
        assert rates[0] == pytest.approx(1e-3) and rates[10] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------- early stopping and resume


def test_a_killed_and_resumed_spike_run_stops_at_the_same_step_for_the_same_reason(
        spike_run, data_low_auth_val, tmp_path):
    reference, _ = spike_run
    out = tmp_path / "out"
    args = (*SPIKE, "--data-dir", data_low_auth_val, "--output-dir", out)
    # Killed with spikes already counted (steps 3, 4, 5 are spikes).
    kill_after(args, tmp_path / "killed.log", committed=5)
    result = run_cli(*args, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    assert end_line(out)["reason"] == end_line(reference)["reason"]
    assert figures(out) == figures(reference)
    assert adapters_equal(load_adapters(out), load_adapters(reference))


def test_a_killed_and_resumed_plateau_run_stops_at_the_same_step_for_the_same_reason(
        plateau_run, data_no_val, tmp_path):
    reference, _ = plateau_run
    out = tmp_path / "out"
    args = (*PLATEAU, "--data-dir", data_no_val, "--output-dir", out)
    # First killed with the smoothing window half full, then after the first
    # plateau check (step 50): the window and the best smoothed loss must survive.
    kill_after(args, tmp_path / "killed-1.log", committed=25)
    kill_after((*args, "--auto-resume"), tmp_path / "killed-2.log", committed=50)
    result = run_cli(*args, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "at step 50" in result.stderr
    assert end_line(out)["reason"] == end_line(reference)["reason"]
    assert figures(out) == figures(reference)
    assert pointer(out, "final") == f"step-{PLATEAU_STOP:08d}"
    assert adapters_equal(load_adapters(out), load_adapters(reference))


# -------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_hold_the_training_and_validation_scalars(validated_run):
    out, _ = validated_run
    logs = out / "logs"
    assert list(logs.glob("events.out.tfevents.*")), list(out.iterdir())
    by_tag: dict[str, dict[int, float]] = {}
    for event in read_tensorboard(logs):
        for value in event.summary.value:
            by_tag.setdefault(value.tag, {})[event.step] = value.simple_value
    for tag in ("train/objective", "train/lr", "train/grad_norm", "train/ce"):
        assert sorted(by_tag.get(tag, {})) == list(range(1, 13)), (tag, sorted(by_tag))
    for tag in ("val/ce", "val/ce_low_auth", "val/ce_high_auth"):
        assert sorted(by_tag.get(tag, {})) == [5, 10, 12], (tag, sorted(by_tag))
    # The same numbers as metrics.jsonl (TensorBoard stores float32).
    for line in train_lines(out):
        assert by_tag["train/objective"][line["step"]] == pytest.approx(line["objective"], rel=1e-6)
        assert by_tag["train/grad_norm"][line["step"]] == pytest.approx(line["grad_norm"], rel=1e-6)
    for line in read_metrics(out):
        if "val_ce" in line:
            assert by_tag["val/ce"][line["step"]] == pytest.approx(line["val_ce"], rel=1e-6)
