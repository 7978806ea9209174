"""The order in which a run makes names durable, by strict POSIX rules: a name in a folder
survives a power loss once that folder is flushed, and a folder's own name once its parent
is. A commit is only durable when every folder on its path is; so each folder's name is
flushed before anything inside it is committed, and a checkpoint's name before any pointer
or copy names it.

Observed in the test's process by recording each flush (durable.flush_fd, the one function
every flush goes through) with the path it flushed, then reading the order back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import FAST, run_in_process, write_corpus

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir() or sys.platform == "darwin",
                                reason="finds the path of a flushed descriptor through /proc/self/fd")


def first(flushes: list, predicate, after: int = -1) -> int:
    return next((i for i, flush in enumerate(flushes) if i > after and predicate(flush)), len(flushes))


def test_each_name_is_durable_before_anything_inside_or_naming_it_is_committed(tmp_path, monkeypatch):
    from run_safety import durable

    data = write_corpus(tmp_path / "data")
    runs = tmp_path / "runs"  # neither it nor the run folder exists yet: both are created
    out = runs / "out"
    checkpoints = out / "checkpoints"
    flushes = []  # (path flushed, whether checkpoints/ existed then)
    flush_fd = durable.flush_fd

    def recording(fd: int) -> None:
        flushes.append((os.readlink(f"/proc/self/fd/{fd}"), checkpoints.is_dir()))
        flush_fd(fd)

    monkeypatch.setattr(durable, "flush_fd", recording)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "4",
                            "--checkpoint-interval", "2", "--eval-steps", "2")
    assert result.returncode == 0, result.stderr
    R, C = str(out), str(checkpoints)
    inside_run = first(flushes, lambda f: f[0].startswith(R + "/") or f[0] == R)
    assert inside_run < len(flushes)

    # The run folder's name, and that of the folder made for it, before anything inside it.
    assert first(flushes, lambda f: f[0] == str(tmp_path)) < inside_run, flushes[:inside_run + 1]
    assert first(flushes, lambda f: f[0] == str(runs)) < inside_run, flushes[:inside_run + 1]

    # checkpoints/'s name in the run folder before the first checkpoint is committed in it.
    first_save = first(flushes, lambda f: f[0].startswith(C + "/.tmp-step-"))
    first_commit = first(flushes, lambda f: f[0] == C, after=first_save)
    assert first_commit < len(flushes)
    assert first(flushes, lambda f: f[0] == R and f[1]) < first_commit, flushes[:first_commit + 1]

    # Each checkpoint's name in checkpoints/ before a pointer or the top-level copy of its adapters.
    for step in (2, 4):
        save = first(flushes, lambda f: f[0].startswith(f"{C}/.tmp-step-{step:08d}-"))
        commit = first(flushes, lambda f: f[0] == C, after=save)
        pointer = first(flushes, lambda f: f[0].startswith((f"{C}/.tmp-best-", f"{C}/.tmp-final-")), after=save)
        copy = first(flushes, lambda f: f[0].startswith(f"{R}/.tmp-adapters.safetensors-"), after=save)
        assert save < commit < min(pointer, copy) < len(flushes), (step, save, commit, pointer, copy)
