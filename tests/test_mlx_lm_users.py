"""An mlx-lm user's first day, end to end: their data folder and their YAML config as
they are, the options they rely on (gradient checkpointing, the optimizer, DoRA,
starting from adapters), each resuming bit for bit after a kill.

Killed runs, the runs that resume them, runs with --grad-checkpoint (mlx-lm patches
the block class for the whole process) and the stdout of a quantizing run run in
processes of their own; the others in the test's process (run_in_process)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (FAST, REPO, TRAIN_SCRIPT, WORDS, adapters_equal, assert_one_line_error, load_adapters,
                      read_metrics, run_cli, run_in_process, run_script_in_process, train_lines, write_corpus,
                      write_jsonl)


def mlx_lm_records(n: int, seed: int) -> list[dict]:
    """mlx-lm's three record forms, without scores; some with metadata the scorer reads."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    records = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            record = {"text": words(rng.randint(5, 25))}
            if i % 2:
                record.update(source_type="lab_notebook", year=1900 + i)
        elif kind == 1:
            record = {"messages": [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": words(5)},
                                   {"role": "assistant", "content": words(8)}]}
        else:
            record = {"prompt": words(5), "completion": words(9)}
            if i % 2:
                record.update(publisher="Ministry of Health", year=2015)
        records.append(record)
    return records


@pytest.fixture(scope="module")
def mlx_data(tmp_path_factory) -> Path:
    """An mlx-lm data folder: train / valid / test.jsonl, no scores anywhere."""
    data = tmp_path_factory.mktemp("mlx-data")
    write_jsonl(data / "train.jsonl", mlx_lm_records(48, seed=1))
    write_jsonl(data / "valid.jsonl", mlx_lm_records(12, seed=2))
    write_jsonl(data / "test.jsonl", mlx_lm_records(12, seed=3))
    return data


def test_an_mlx_lm_data_folder_trains_with_the_scores_prepare_data_gives(mlx_data, tmp_path):
    out = tmp_path / "run"
    result = run_in_process(*FAST, "--data-dir", mlx_data, "--output-dir", out, "--max-steps", "5",
                            "--lambda-weight", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    said = [line for line in lines if "no auth_weight/prov_entropy" in line]
    assert said == [
        f"data: 48 of 48 training records have no auth_weight/prov_entropy: scored at load from their metadata, "
        f"else their text, as src/prepare_data.py scores them (to see why: python src/prepare_data.py --input "
        f"{mlx_data / 'train.jsonl'} --output SOME_DIR --explain)",
        f"data: 12 of 12 validation records have no auth_weight/prov_entropy: scored at load from their metadata, "
        f"else their text, as src/prepare_data.py scores them (to see why: python src/prepare_data.py --input "
        f"{mlx_data / 'valid.jsonl'} --output SOME_DIR --explain)",
    ]
    assert (f"data: validation on {mlx_data / 'valid.jsonl'} (mlx-lm's name; there is no val.jsonl): 12 records "
            f"checked, the first 8 used (--val-batches 2 x --batch-size 4)") in lines
    assert [line["step"] for line in read_metrics(out) if "val_ce" in line] == [5]
    data_event = next(line for line in read_metrics(out) if line.get("event") == "data")
    assert data_event["train_scored_at_load"] == 48 and data_event["val_scored_at_load"] == 12

    # The run's record of the scores (its corpus index in OUTPUT/cache) is what prepare_data.py writes.
    prepared = tmp_path / "prepared"
    prep = run_script_in_process("prepare_data", "--input", mlx_data / "train.jsonl", "--output", prepared,
                                 "--val-fraction", "0")
    assert prep.returncode == 0, prep.stderr
    written = [json.loads(line) for line in (prepared / "train.jsonl").read_text().splitlines()]
    from corpus.index import _read_cache

    (cache_file,) = (out / "cache").glob("index-*.safetensors")
    cached = _read_cache(cache_file)
    assert cached["scored_at_load"] == 48 and len(cached["auth_weight"]) == len(written) == 48
    assert cached["auth_weight"].tolist() == np.asarray([r["auth_weight"] for r in written], np.float32).tolist()
    assert cached["prov_entropy"].tolist() == np.asarray([r["prov_entropy"] for r in written], np.float32).tolist()
    assert len(set(cached["auth_weight"].tolist())) > 3  # metadata and text moved the scores

    # evaluate.py takes test.jsonl when the folder has one.
    evaluated = run_script_in_process("evaluate", "--output-dir", out)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"on {mlx_data / 'test.jsonl'} (12 samples)" in evaluated.stdout


def test_records_with_scores_keep_them_and_one_score_alone_is_refused(tmp_path):
    data = write_corpus(tmp_path / "data", val=0)
    given = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    out = tmp_path / "run"
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert "scored at load" not in result.stderr
    from corpus.index import _read_cache

    (cache_file,) = (out / "cache").glob("index-*.safetensors")
    assert _read_cache(cache_file)["auth_weight"].tolist() == \
        np.asarray([r["auth_weight"] for r in given], np.float32).tolist()

    write_jsonl(data / "train.jsonl", [{"text": "a b c", "auth_weight": 0.5}])
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "other", "--max-steps", "1")
    assert_one_line_error(result, "train.jsonl:1: missing field 'prov_entropy' (a record gives both scores, or "
                                  "neither and is scored at load")


# ------------------------------------------------------------------ configs

LORA_YAML = """\
model: tiny
train: true
fine_tune_type: lora
optimizer: adam
data: {data}
seed: 0
num_layers: -1
batch_size: 4
iters: 6
val_batches: 2
learning_rate: 3e-3
steps_per_report: 10
steps_per_eval: 5
resume_adapter_file: null
adapter_path: {out}
save_every: 5
test: false
max_seq_length: 48
grad_checkpoint: true
lora_parameters:
  rank: 4
  scale: 2.0
  dropout: 0.0
"""
# What the YAML above sets, as this toolkit's flags (the rest as FAST sets it).
SAME_AS_FLAGS = ["--model", "tiny", "--optimizer", "adam", "--seed", "0", "--lora-layers", "-1", "--batch-size", "4",
                 "--max-steps", "6", "--val-batches", "2", "--learning-rate", "3e-3", "--eval-steps", "5",
                 "--checkpoint-interval", "5", "--max-seq-length", "48", "--grad-checkpoint", "--lora-rank", "4",
                 "--lora-alpha", "8"]
REST = ["--warmup-steps", "2", "--no-tensorboard", "--no-early-stopping"]


def test_an_mlx_lm_lora_yaml_gives_the_same_run_as_the_flags(mlx_data, tmp_path):
    # Both runs with --grad-checkpoint (grad_checkpoint: true): processes of their own.
    config = tmp_path / "lora.yaml"
    config.write_text(LORA_YAML.format(data=mlx_data, out=tmp_path / "from-yaml"))
    from_yaml = run_cli("--config", config, *REST)
    assert from_yaml.returncode == 0, from_yaml.stderr
    from_flags = run_cli(*SAME_AS_FLAGS, *REST, "--data-dir", mlx_data, "--output-dir", tmp_path / "from-flags")
    assert from_flags.returncode == 0, from_flags.stderr
    assert adapters_equal(load_adapters(tmp_path / "from-yaml"), load_adapters(tmp_path / "from-flags"))
    assert [(line["step"], line["objective"], line["grad_norm"]) for line in train_lines(tmp_path / "from-yaml")] == \
        [(line["step"], line["objective"], line["grad_norm"]) for line in train_lines(tmp_path / "from-flags")]
    saved = json.loads((tmp_path / "from-yaml" / "checkpoints" / "step-00000006" / "config.json").read_text())
    assert saved["config"]["lora"] == {"rank": 4, "alpha": 8.0, "layers": -1, "dropout": 0.0, "fine_tune_type": "lora",
                                       "keys": []}

    config.write_text(LORA_YAML.format(data=mlx_data, out=tmp_path / "x") + "lr_schedule:\n  name: cosine_decay\n"
                      "clear_cache_threshold: 1000\n")
    refused = run_in_process("--config", config, *REST)
    assert_one_line_error(refused, f"{config}: not supported here", "lr_schedule: ", "clear_cache_threshold: 1000",
                          only_line=True)
    assert not (tmp_path / "x").exists()


def test_the_example_config_in_the_repo_trains(tmp_path):
    out = tmp_path / "example"
    result = run_in_process("--config", REPO / "examples" / "lora_config.yaml", "--output-dir", out,
                            "--max-steps", "2", "--max-seq-length", "48", "--batch-size", "4", "--val-batches", "1",
                            "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    assert "reached --max-steps 2" in result.stderr
    saved = json.loads((out / "checkpoints" / "step-00000002" / "config.json").read_text())["config"]
    assert saved["lora"]["alpha"] == 32.0 and saved["training"]["learning_rate"] == 2e-3  # scale 2 x rank 16


# ------------------------------------------------------------------ options, resumed after a kill

STEPS = 8
BASE = [*FAST, "--max-steps", str(STEPS), "--checkpoint-interval", "2", "--eval-steps", "4"]


def start(args, log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)


def kill_after_checkpoint(args, log: Path, step: int) -> None:
    process = start(args, log)
    deadline = time.monotonic() + 120
    while f"step-{step:08d}" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def final_optimizer(out: Path) -> dict:
    import mlx.core as mx

    checkpoints = out / "checkpoints"
    return mx.load(str(checkpoints / (checkpoints / "final").read_text().strip() / "optimizer.safetensors"))


@pytest.mark.parametrize("options", [
    ["--optimizer", "adam", "--fine-tune-type", "dora"],
    ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--sgd-nesterov", "--grad-checkpoint"],
    ["--optimizer", "adafactor", "--weight-decay", "0.01"],
    ["--lora-keys", "self_attn.q_proj", "self_attn.v_proj"],
], ids=["adam+dora", "sgd+grad-checkpoint", "adafactor", "attention-only"])
def test_each_option_trains_and_resumes_bit_for_bit_after_a_kill(options, tmp_path):
    data = write_corpus(tmp_path / "data", train=32, val=8)
    reference, out = tmp_path / "reference", tmp_path / "out"
    # The reference in this process, unless --grad-checkpoint (it patches a model class for the
    # whole process); the resume of the killed run in a process of its own, as always after a kill.
    run = run_cli if "--grad-checkpoint" in options else run_in_process
    result = run(*BASE, *options, "--data-dir", data, "--output-dir", reference)
    assert result.returncode == 0, result.stderr
    kill_after_checkpoint([*BASE, *options, "--data-dir", data, "--output-dir", out], tmp_path / "killed.log", 4)
    resumed = run_cli(*BASE, *options, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    assert [(l["step"], l["objective"], l["grad_norm"]) for l in train_lines(out)] == \
        [(l["step"], l["objective"], l["grad_norm"]) for l in train_lines(reference)]
    assert adapters_equal(load_adapters(out), load_adapters(reference))
    assert adapters_equal(final_optimizer(out), final_optimizer(reference))
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["fine_tune_type"] == ("dora" if "dora" in options else "lora")
    if "dora" in options:
        assert any(name.endswith(".m") for name in load_adapters(out))  # DoRA's magnitudes are trained
        # mlx-lm itself loads the DoRA adapters onto the base the run names.
        from base_model.loading import load_with_mlx_lm

        model, _, _ = load_with_mlx_lm(written["model"], False, adapter_path=str(out))
        assert type(model.layers[0].self_attn.q_proj).__name__ == "DoRALinear"
    if "--lora-keys" in options:
        # LoRA on exactly those layers of every block, and adapter_config.json names them, so
        # mlx-lm rebuilds exactly these layers.
        assert "LoRA on 2 blocks (self_attn.q_proj, self_attn.v_proj)" in result.stderr
        assert set(load_adapters(out)) == {f"model.layers.{block}.self_attn.{layer}.lora_{ab}"
                                           for block in (0, 1) for layer in ("q_proj", "v_proj") for ab in "ab"}
        assert written["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
        from base_model.loading import load_with_mlx_lm

        model, _, _ = load_with_mlx_lm(written["model"], False, adapter_path=str(out))
        assert {name: type(getattr(model.layers[1].self_attn, name)).__name__ for name in ("q_proj", "k_proj")} == \
            {"q_proj": "LoRALinear", "k_proj": "QuantizedLinear"}
    if "--grad-checkpoint" in options:
        # The same run without it: the same adapters, within float rounding.
        plain = tmp_path / "plain"
        without = [a for a in options if a != "--grad-checkpoint"]
        assert run_in_process(*BASE, *without, "--data-dir", data, "--output-dir", plain).returncode == 0
        a, b = load_adapters(out), load_adapters(plain)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), rtol=1e-5, atol=1e-6)
    # An option that changes what is learned cannot change on resume.
    refused = run_in_process(*BASE, "--data-dir", data, "--output-dir", out, "--auto-resume", "--max-steps", "10")
    assert refused.returncode == 2 and "the config differs" in refused.stderr, refused.stderr
    assert "optimizer" in refused.stderr or "fine_tune_type" in refused.stderr or "lora.keys" in refused.stderr


def test_init_adapters_start_a_new_run_from_a_finished_one(tmp_path):
    data = write_corpus(tmp_path / "data", train=32, val=8)
    first = tmp_path / "first"
    assert run_in_process(*BASE, "--data-dir", data, "--output-dir", first).returncode == 0
    second = tmp_path / "second"
    result = run_in_process(*BASE, "--max-steps", "2", "--learning-rate", "1e-9", "--warmup-steps", "0",
                            "--data-dir", data, "--output-dir", second, "--init-adapters", first)
    assert result.returncode == 0, result.stderr
    assert f"adapters: starting from {first / 'adapters.safetensors'}" in result.stderr
    started, learned = load_adapters(second), load_adapters(first)
    for name in learned:  # a learning rate of 1e-9: still the adapters it started from
        np.testing.assert_allclose(np.array(started[name]), np.array(learned[name]), atol=1e-6)
    state = json.loads((second / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["trainer"]["inputs"]["init_adapters"]["size"] == (first / "adapters.safetensors").stat().st_size

    # Another shape is refused before anything is trained, naming what differs.
    refused = run_in_process(*BASE, "--lora-rank", "8", "--data-dir", data, "--output-dir", tmp_path / "third",
                             "--init-adapters", first / "adapters.safetensors")
    assert_one_line_error(refused, "--init-adapters", "lora_a", "is [", "this run's is [", "--lora-rank")
    assert not (tmp_path / "third" / "checkpoints").exists()
    missing = run_in_process(*BASE, "--data-dir", data, "--output-dir", tmp_path / "fourth", "--init-adapters", data)
    assert_one_line_error(missing, f"{data} holds no adapters.safetensors")


# ------------------------------------------------------------------ the run folder


def test_a_fresh_start_moves_the_earlier_run_aside_with_one_time_and_the_lock_goes(tmp_path):
    data = write_corpus(tmp_path / "data", train=24, val=8)
    out = tmp_path / "out"
    with_tensorboard = [a for a in FAST if a != "--no-tensorboard"]
    first = run_in_process(*with_tensorboard, "--data-dir", data, "--output-dir", out, "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    assert not (out / ".run.lock").exists()  # a run that ended leaves no lock behind
    second = run_in_process(*with_tensorboard, "--data-dir", data, "--output-dir", out, "--max-steps", "2", "--fresh")
    assert second.returncode == 0, second.stderr
    moved = sorted(p.name for p in out.iterdir() if ".old-" in p.name)
    assert len(moved) == 3, moved
    stamps = {name.split(".old-")[1] for name in moved}
    assert len(stamps) == 1 and [name.split(".old-")[0] for name in moved] == ["checkpoints", "logs", "metrics.jsonl"]
    stamp = stamps.pop()
    assert len(stamp) == 16 and stamp[8] == "T" and stamp.endswith("Z")  # 20260125T140306Z, as checkpoints.old-
    assert f"moved aside to {out / ('checkpoints.old-' + stamp)}" in second.stderr
    from conftest import read_tensorboard

    steps = {event.step for event in read_tensorboard(out / "logs") if event.summary.value}
    assert steps == {1, 2}  # the new run alone: nothing for TensorBoard to drop as out of order
    assert not (out / ".run.lock").exists()


def test_list_checkpoints_shows_a_val_loss_only_where_a_validation_ran(tmp_path):
    data = write_corpus(tmp_path / "data", train=24, val=8)
    out = tmp_path / "out"
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "6", "--eval-steps", "4",
                          "--checkpoint-interval", "2").returncode == 0
    listing = run_in_process("--output-dir", out, "--list-checkpoints")
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines() if line.startswith("step-")}
    assert rows["step-00000002"][3] == "-" and rows["step-00000004"][3] != "-"
    assert rows["step-00000006"][3] != "-"  # the end validates too


def test_quantizing_a_base_prints_nothing_on_stdout(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISTRUST_QLORA_CACHE=str(tmp_path / "cache"))
    data = write_corpus(tmp_path / "data", train=16, val=0)
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *FAST, "--data-dir", str(data), "--output-dir",
                             str(tmp_path / "out"), "--max-steps", "1"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[INFO] Quantized" in result.stderr and result.stdout == ""
