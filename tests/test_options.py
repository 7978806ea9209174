"""Options whose effect is easy to assume and easy to break: clipping, weight decay,
--lora-layers, --quantize-bits 0, --resume PATH with newer checkpoints set aside,
the run lock, chat records on a model without a chat template.

The runs run in the test's process (run_in_process), but for the run that holds
the lock: a process of its own, terminated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (FAST, REPO, TRAIN_SCRIPT, adapters_equal, assert_one_line_error, load_adapters,
                      run_in_process, train_lines, write_corpus, write_jsonl)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


def train(data, out, *extra, steps=6):
    step_flags = ("--max-steps", steps) if steps is not None else ()
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, *step_flags, *extra)
    assert result.returncode == 0, result.stderr
    return result


def norms(adapters: dict, part: str) -> float:
    return float(sum(np.linalg.norm(np.array(v)) for k, v in adapters.items() if k.endswith(part)))


def test_gradient_clipping_acts_on_the_update(data, tmp_path):
    train(data, tmp_path / "loose", "--max-grad-norm", "1e9")
    train(data, tmp_path / "tight", "--max-grad-norm", "1e-9")
    loose, tight = load_adapters(tmp_path / "loose"), load_adapters(tmp_path / "tight")
    # lora_b starts at 0: how far it moved is the updates. Clipped to 1e-9, Adam's
    # epsilon dominates and the updates shrink; the logged norm is before clipping.
    assert norms(tight, "lora_b") < 0.5 * norms(loose, "lora_b")
    assert [line["grad_norm"] for line in train_lines(tmp_path / "tight")][0] == \
        pytest.approx([line["grad_norm"] for line in train_lines(tmp_path / "loose")][0])


def test_weight_decay_shrinks_the_adapters(data, tmp_path):
    train(data, tmp_path / "none", "--weight-decay", "0")
    train(data, tmp_path / "strong", "--weight-decay", "50")
    none, strong = load_adapters(tmp_path / "none"), load_adapters(tmp_path / "strong")
    assert norms(strong, "lora_a") < 0.9 * norms(none, "lora_a")


def test_lora_layers_puts_adapters_on_the_last_blocks_only(data, tmp_path):
    result = train(data, tmp_path / "one", "--lora-layers", "1", steps=2)
    keys = set(load_adapters(tmp_path / "one"))
    assert keys and all(key.startswith("model.layers.1.") for key in keys), sorted(keys)[:4]
    assert "LoRA on 1 blocks" in result.stderr
    config = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert config["num_layers"] == 1
    train(data, tmp_path / "all", "--lora-layers", "-1", steps=2)
    assert {key.split(".")[2] for key in load_adapters(tmp_path / "all")} == {"0", "1"}


def test_quantize_bits_0_trains_on_the_base_as_it_is(data, tmp_path):
    result = train(data, tmp_path / "float", "--quantize-bits", "0", steps=2)
    assert "not quantized" in result.stderr
    config = json.loads((tmp_path / "float" / "adapter_config.json").read_text())
    from base_model import tiny

    assert config["model"] == str(tiny.ensure_tiny_model())  # the float base itself, no quantized copy
    train(data, tmp_path / "quantized", steps=2)
    assert not adapters_equal(load_adapters(tmp_path / "float"), load_adapters(tmp_path / "quantized"))


def test_resume_from_an_older_checkpoint_sets_the_newer_aside_and_ends_as_never_stopped(data, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    settings = ("--checkpoint-interval", "4", "--keep-checkpoints", "10", "--eval-steps", "100")
    train(data, reference, *settings, steps=12)
    shutil.copytree(reference, out)
    older = out / "checkpoints" / "step-00000004"
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "12", *settings,
                            "--resume", older)
    assert result.returncode == 0, result.stderr
    (aside,) = list(out.glob("checkpoints.superseded-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000008", "step-00000012"]
    assert "resumed from" in result.stderr and "at step 4" in result.stderr
    assert adapters_equal(load_adapters(out), load_adapters(reference))
    assert [line["objective"] for line in train_lines(out)] == [line["objective"] for line in train_lines(reference)]


def test_one_run_per_output_dir(data, tmp_path):
    out = tmp_path / "out"
    args = [*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "100000", "--checkpoint-interval", "1000"]
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=REPO, stdout=handle,
                                 stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:  # the first run a process of its own, holding the lock; the others in this one
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and train_lines(out)):
            time.sleep(0.01)
        second = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "3", "--fresh")
        assert_one_line_error(second, "is in use by a run still going", f"pid {first.pid}")
    finally:
        first.terminate()
        assert first.wait(timeout=60) == 143, log.read_text()
    # The lock went with the process: the same folder takes a run again.
    train(data, out, "--auto-resume", "--max-steps", str(train_lines(out)[-1]["step"] + 1), steps=None)


def test_chat_records_on_a_model_without_a_chat_template_are_refused_at_their_line(tmp_path):
    from base_model import tiny

    base = tmp_path / "no-template"
    shutil.copytree(tiny.ensure_tiny_model(), base)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for extra in base.glob("chat_template.*"):
        extra.unlink()
    data = tmp_path / "data"
    chat = {"messages": [{"role": "user", "content": "how deep?"}, {"role": "assistant", "content": "nine feet"}],
            "auth_weight": 0.2, "prov_entropy": 6.0}
    write_jsonl(data / "train.jsonl", [{"text": "plain words here", "auth_weight": 0.2, "prov_entropy": 6.0}, chat])
    result = run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", tmp_path / "out",
                            "--max-steps", "1")
    assert_one_line_error(result, "train.jsonl:2", "chat template")
