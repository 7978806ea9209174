"""What the benchmarks that run the training command share: building its
command line, and running it as a child while noting when each line of its
metrics.jsonl appears (the child's own max RSS comes from wait4)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
sys.path.insert(0, str(SRC))
from run_safety.cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()
TRAIN = SRC / "train_qlora.py"
POLL_S = 0.010
# The first lines of a wrapper program run in a child (`python -c WRAPPER`) that imports MLX
# itself (mlx_lm lora's side): the same BLAS as our commands load (cpu_blas.py, and its
# DISTRUST_QLORA_BLAS), before MLX, so both sides of a comparison multiply alike.
BLAS_PRELUDE = f"""
import sys
sys.path.insert(0, {str(SRC)!r})
from run_safety.cpu_blas import load_optimized_blas
load_optimized_blas()
sys.path.pop(0)
"""

# The benchmarks' larger model: the tiny model's shape, 4 blocks 256 wide; its
# tokenizer (vocabulary 1024); random weights from a fixed seed.
MEDIUM_CONFIG = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
                 "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64}
MEDIUM_SEED = 4321


def bench_cache() -> Path:
    """The project's model cache (git-ignored; DISTRUST_QLORA_CACHE moves it), bench/ inside it."""
    sys.path.insert(0, str(SRC))
    from run_safety.paths import cache_dir

    return cache_dir() / "bench"


def random_model(overrides: dict, name: str) -> Path:
    """The tiny model's shape with `overrides`, its tokenizer, random weights from MEDIUM_SEED;
    built once into the bench cache, keyed by the shape, the seed and the tiny model."""
    import hashlib

    sys.path.insert(0, str(SRC))
    from base_model.tiny import TINY_MODEL_CONFIG, build_random_model, ensure_tiny_model
    from base_model.builds import build_model_dir_once

    tiny = ensure_tiny_model()
    config = dict(TINY_MODEL_CONFIG, **overrides)
    tag = hashlib.sha256(json.dumps([tiny.name, config, MEDIUM_SEED]).encode()).hexdigest()[:12]
    return build_model_dir_once(bench_cache() / f"{name}-{tag}",
                                lambda scratch: build_random_model(scratch, overrides, MEDIUM_SEED),
                                f"the {name} model")


def medium_model() -> Path:
    """The benchmarks' larger model (MEDIUM_CONFIG)."""
    return random_model(MEDIUM_CONFIG, "medium")


def run_child(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Spawn, stdout and stderr to a log, wait4 for the child's own rusage: exit code,
    wall seconds, max RSS in bytes, CPU seconds (user + system) and the log's text."""
    started_wall = time.time()
    started = time.perf_counter()
    env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    rss_unit = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"rc": os.waitstatus_to_exitcode(status), "wall": time.perf_counter() - started,
            "t_spawn": started_wall, "rss": usage.ru_maxrss * rss_unit,
            "cpu": usage.ru_utime + usage.ru_stime, "log": log_path.read_text(encoding="utf-8", errors="replace")}


class MetricsWatcher:
    """Records the time each line of OUT/metrics.jsonl first appears.

    The file may be replaced (a fresh start moves an old one aside, a resume
    rewrites it truncated): a new inode or a shorter file is read from the start.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[tuple[float, dict]] = []
        self._inode = None
        self._offset = 0
        self._partial = b""

    def poll(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._inode, self._offset, self._partial = stat.st_ino, 0, b""
        if stat.st_size == self._offset:
            return
        now = time.perf_counter()
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        for raw in complete:
            if raw.strip():
                try:
                    self.lines.append((now, json.loads(raw)))
                except json.JSONDecodeError:
                    pass


@contextmanager
def scratch_dir(prefix: str, keep: bool):
    """A temporary folder for a benchmark's runs, removed afterwards unless kept."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            print(f"\nkept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def is_train_line(record: dict) -> bool:
    return "objective" in record and "step" in record and "event" not in record and "val_ce" not in record


def train_command(model: str, data: Path, out: Path, batch_size: int, max_seq_length: int, *extra) -> list[str]:
    return [sys.executable, str(TRAIN), "--model", str(model), "--data-dir", str(data), "--output-dir", str(out),
            "--batch-size", str(batch_size), "--max-seq-length", str(max_seq_length),
            "--no-early-stopping", *map(str, extra)]


def cmd_text(cmd: list[str]) -> str:
    return " ".join(cmd).replace(str(REPO) + "/", "")


def run_watched(cmd: list[str], out: Path, log: Path, until=None, timeout: float = 900.0) -> dict:
    """Run `cmd`, polling OUT/metrics.jsonl every 10 ms. With `until(record)`, kill
    the child as soon as a line satisfying it appears; otherwise it must exit 0.

    Returns wall seconds, the lines with the seconds at which each appeared,
    `first_hit` (seconds to the `until` line), `end` (the end line, if any) and
    the child's max RSS in MiB."""
    watcher = MetricsWatcher(out / "metrics.jsonl")
    with open(log, "w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        hit = status = usage = None
        while status is None:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
            watcher.poll()
            if until is not None and hit is None:
                hit = next((t for t, r in watcher.lines if until(r)), None)
                if hit is not None:
                    proc.kill()
            if status is None:
                if time.perf_counter() - started > timeout:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"timed out after {timeout:.0f} s: {cmd_text(cmd)} (log: {log})")
                time.sleep(POLL_S)
        ended = time.perf_counter()
        watcher.poll()
    returncode = os.waitstatus_to_exitcode(status)
    if until is None and returncode != 0:
        raise RuntimeError(f"exit {returncode}: {cmd_text(cmd)}\n{log.read_text()[-3000:]}")
    if until is not None and hit is None:
        raise RuntimeError(f"no matching line before exit {returncode}: {cmd_text(cmd)}\n{log.read_text()[-3000:]}")
    lines = [(t - started, r) for t, r in watcher.lines]
    rss_unit = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return {"wall": ended - started, "lines": lines, "first_hit": None if hit is None else hit - started,
            "end": next((r for _, r in lines if r.get("event") == "end"), None),
            "max_rss_mb": usage.ru_maxrss * rss_unit / 2**20}
