"""conftest.run_in_process, which most tests use instead of a process of their own:
it must give what the command in a process of its own gives, and leave this
process as it found it."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest

from conftest import (FAST, GradCheckpointInProcess, adapters_equal, load_adapters, read_metrics, run_cli,
                      run_in_process, write_corpus)

# What differs between two runs of the same command: how fast it ran, when, and the memory
# MLX holds (the whole process's, which in this process holds other tests' arrays too).
TIMED = ("seconds", "session_seconds", "tokens_per_sec", "memory_mb", "peak_memory_mb", "time", "created")
TIMED_TEXT = [(r"\d+:\d\d elapsed", "T elapsed"), (r"[\d,.]+ tok/s", "N tok/s"), (r"ETA [^ |]+", "ETA T"),
              (r"\d+m \d+s", "T"), (r"\d+h \d+m", "T"), (r"[+-]?[\d,.]+ [MG]B", "M")]


def same_text(text: str, out: str) -> str:
    """Text with the run folder named the same way and figures of speed and time blanked."""
    text = text.replace(out, "OUT")
    for pattern, blank in TIMED_TEXT:
        text = re.sub(pattern, blank, text)
    return text


def untimed(out) -> list[dict]:
    return [{key: value for key, value in line.items() if key not in TIMED and key != "path"}
            for line in read_metrics(out)]


def process_state() -> dict:
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"handlers": {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                                                signal.SIGALRM)},
            "streams": (sys.stdin, sys.stdout, sys.stderr), "argv": list(sys.argv), "cwd": os.getcwd(),
            "environ": dict(os.environ), "warning_filters": list(warnings.filters),
            "showwarning": warnings.showwarning, "python_random": random.getstate(),
            "numpy_random": (kind, keys.tolist(), position, has_gauss, cached)}


def test_a_run_in_process_gives_what_a_process_of_its_own_gives(tmp_path):
    data = write_corpus(tmp_path / "data", train=24, val=8)
    runs = {}
    for name, run in (("process", run_cli), ("in-process", run_in_process)):
        out = tmp_path / name
        result = run(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "6", "--lora-dropout", "0.1")
        assert result.returncode == 0, result.stderr
        runs[name] = out, result
    (own, own_result), (here, here_result) = runs["process"], runs["in-process"]
    assert same_text(here_result.stderr, str(here)) == same_text(own_result.stderr, str(own))
    assert here_result.stdout == own_result.stdout == ""
    assert untimed(here) == [{key: value.replace(str(own), str(here)) if isinstance(value, str) else value
                              for key, value in line.items()} for line in untimed(own)]
    assert adapters_equal(load_adapters(here), load_adapters(own))

    # argparse's exits become return codes, with what it printed.
    for args in (["--help"], ["--max-steps", "abc"], ["--model", "tiny", "--lora-rank", "0"]):
        own_result, here_result = run_cli(*args), run_in_process(*args)
        assert (here_result.returncode, here_result.stdout, here_result.stderr) == \
            (own_result.returncode, own_result.stdout, own_result.stderr), args


def test_this_process_is_left_as_it_was_after_a_run_a_refusal_and_a_crash(tmp_path, monkeypatch):
    import train_qlora

    data = write_corpus(tmp_path / "data", train=12, val=0)
    before = process_state()
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out", "--max-steps", "2",
                          "--no-tensorboard").returncode == 0
    assert process_state() == before
    # A resume sets Python's and numpy's generators to the checkpoint's.
    resumed = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out", "--max-steps", "3",
                             "--auto-resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert process_state() == before
    assert run_in_process(*FAST, "--data-dir", tmp_path / "nowhere", "--output-dir", tmp_path / "other").returncode == 2
    assert process_state() == before

    def crash(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train_qlora, "run", crash)
    crashed = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "crashed")
    assert crashed.returncode == 1 and "Traceback" in crashed.stderr and "RuntimeError: a bug" in crashed.stderr
    assert process_state() == before


def test_grad_checkpoint_is_refused_in_process_and_patches_nothing(tmp_path):
    from base_model import loading

    data = write_corpus(tmp_path / "data", train=12, val=0)
    out = tmp_path / "out"
    with pytest.raises(GradCheckpointInProcess):
        run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "2", "--grad-checkpoint")
    block = type(loading.load_model("tiny", quantize_bits=4).model.layers[0])
    assert not getattr(block, "_distrust_grad_checkpoint", False)
    assert not (out / ".run.lock").exists()


def test_a_run_past_its_timeout_is_stopped_like_a_process(monkeypatch):
    import train_qlora

    monkeypatch.setattr(train_qlora, "run", lambda *args: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_process(*FAST, "--output-dir", "never-written", timeout=0.5)
    assert time.monotonic() - started < 10
