"""Faults of the machine, each one line and an exit code, never a traceback: exit 2 for
what is found at start and the user can change (TMPDIR, the working directory, the
cache folder, ulimit -v), exit 1 for a disk that fills up under the command.

What the process's own limits or working directory are about runs in a process of its
own (real setrlimit in the child, a really deleted directory); a TMPDIR or a cache named
by the environment runs in the test's process, on real tmpfs mounts where it must be
full or read-only."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (FAST, REPO, TRAIN_SCRIPT, assert_one_line_error, mounted_tmpfs, remount_read_only,
                      run_in_process, write_corpus)

ARGS = [*FAST, "--max-steps", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), train=16, val=8)


def train_limited(*args, limits=(), cwd: Path = REPO, before=None, timeout: float = 300):
    """The training command in a process of its own, under real resource limits (setrlimit in
    the child) and with `before()` run in the child first."""
    def in_child():
        for which, value in limits:
            resource.setrlimit(which, value)
        if before is not None:
            before()

    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=cwd, preexec_fn=in_child,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=timeout)


def assert_machine_fault(result, *fragments):
    """Exit 1 and one `error:` line holding each fragment, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ TMPDIR


@pytest.mark.parametrize("case", ["missing", "a file", "empty", "read-only", "full", "noexec"])
def test_a_tmpdir_mlx_cannot_compile_in_is_one_line_before_the_model_loads(case, data, tmp_path, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("without g++ MLX compiles nothing, so TMPDIR does not matter")
    expected = {"missing": "does not exist", "a file": "is not a folder", "empty": "is set but empty",
                "read-only": "Read-only file system", "full": "MB free", "noexec": "mounted noexec"}[case]
    folder, out = tmp_path / "tmp", tmp_path / "out"
    with contextlib.ExitStack() as mounts:
        if case == "a file":
            folder.write_text("")
        if case in ("read-only", "full", "noexec"):
            mounts.enter_context(mounted_tmpfs(folder, "64k"))
        if case == "read-only":
            remount_read_only(folder)
        elif case == "full":
            subprocess.run(["dd", "if=/dev/zero", f"of={folder / 'ballast'}", "bs=4k"], capture_output=True)
        elif case == "noexec":
            subprocess.run(["mount", "-o", "remount,noexec", str(folder)], check=True)
        monkeypatch.setenv("TMPDIR", "" if case == "empty" else str(folder))
        result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out)
    assert_one_line_error(result, "TMPDIR", expected)
    assert "model:" not in result.stderr  # refused before loading
    assert not out.exists()  # the run left nothing


def test_a_kernel_library_cut_short_names_the_file_to_remove(data, tmp_path):
    """A compile killed mid-write (or on a full disk) leaves a broken library every later run loads."""
    import mlx.core as mx

    from run_safety import machine

    if shutil.which("g++") is None:
        pytest.skip("without g++ MLX compiles nothing")
    compiled = Path(machine.kernel_temp_dir()[0]) / "mlx" / mx.__version__ / "cpu"
    if not list(compiled.glob("lib*.so")):  # this process's kernels, compiled once (the suite's runs need them)
        assert run_in_process(*ARGS, "--data-dir", data, "--output-dir", tmp_path / "a").returncode == 0
    kernels = tmp_path / "tmp" / "mlx" / mx.__version__ / "cpu"
    shutil.copytree(compiled, kernels)
    libraries = sorted(kernels.glob("lib*.so"))
    for library in libraries:
        library.write_bytes(b"")
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *ARGS, "--data-dir", data, "--output-dir",
                             tmp_path / "b"], env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")), capture_output=True,
                            text=True, timeout=300)
    assert_machine_fault(result, "cannot load its compiled kernel", "remove that file")
    named = result.stderr.split("compiled kernel ")[1].split(" ")[0]
    assert Path(named) in libraries


# ------------------------------------------------------------- open files


def test_a_hard_open_files_limit_of_1024_trains(data, tmp_path):
    """mlx-lm sets the limit to (2048, 4096) when imported, which raised ValueError under it."""
    result = train_limited(*ARGS, "--data-dir", data, "--output-dir", tmp_path / "out",
                           limits=[(resource.RLIMIT_NOFILE, (1024, 1024))])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "adapters.safetensors").is_file()


def test_mlx_lm_imports_under_a_hard_limit_of_2048():
    code = ("import sys, resource; sys.path.insert(0, 'src'); from run_safety import machine; "
            "machine.import_mlx_lm_within_open_files_limit(); import mlx_lm.utils; "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048)))
    assert done.returncode == 0, done.stderr
    soft, hard = eval(done.stdout.strip())
    assert hard <= 2048 and soft == min(2048, hard)  # as high as the hard limit allows


# ------------------------------------------------------- working directory


def test_a_deleted_working_directory_is_one_line(data, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()

    def enter_and_delete():
        os.chdir(gone)
        os.rmdir(gone)

    result = train_limited(*ARGS, "--data-dir", data, "--output-dir", tmp_path / "out", before=enter_and_delete)
    assert_one_line_error(result, "working directory", "no longer exists", only_line=True)
    assert not (tmp_path / "out").exists()


def test_a_working_directory_deleted_mid_run_does_not_stop_a_run_with_absolute_paths(data, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *FAST, "--max-steps", "15", "--data-dir", data,
                                    "--output-dir", out], cwd=here, stdout=err, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "checkpoints" / "step-00000005").exists():
        time.sleep(0.01)
    here.rmdir()
    assert process.wait(timeout=300) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    assert (out / "checkpoints" / "step-00000015").is_dir()


# ------------------------------------------------------------ model cache


def test_a_read_only_or_full_cache_is_one_line_and_leaves_no_scratch(data, tmp_path, monkeypatch):
    from run_safety import paths

    cache = tmp_path / "cache"
    with mounted_tmpfs(cache, "64k"):
        monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(cache))
        full = run_in_process(*ARGS, "--data-dir", data, "--output-dir", tmp_path / "out")
        assert_machine_fault(full, "cannot build the tiny demo model", str(cache), "DISTRUST_QLORA_CACHE")
        assert os.listdir(cache) == []  # the scratch folder went with the failure

        remount_read_only(cache)
        read_only = run_in_process(*ARGS, "--data-dir", data, "--output-dir", tmp_path / "out")
    assert_one_line_error(read_only, "cannot build the tiny demo model", "Read-only file system")
    assert paths.cache_dir() == cache  # the test did look there


def test_a_full_cache_while_the_4_bit_copy_is_written_is_one_line(data, tmp_path, monkeypatch):
    from base_model import tiny

    base = tmp_path / "base"
    shutil.copytree(tiny.ensure_tiny_model(), base)  # a float base: quantized on load, into the cache
    cache = tmp_path / "cache"
    with mounted_tmpfs(cache, "64k"):
        monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(cache))
        result = run_in_process(*[a if a != "tiny" else str(base) for a in ARGS], "--data-dir", data,
                                "--output-dir", tmp_path / "out")
        assert_machine_fault(result, "cannot build the 4-bit copy", "MB free")
        assert [p.name for p in (cache / "quantized").iterdir()] == []


# ---------------------------------------------------------- address space


@pytest.mark.parametrize("limit, flag", [(resource.RLIMIT_AS, "ulimit -v"), (resource.RLIMIT_DATA, "ulimit -d")])
def test_an_address_space_limit_too_small_is_one_line_not_an_abort(limit, flag, data, tmp_path):
    """Under 400 MB, MLX and the tokenizer died with SIGABRT or SIGSEGV and no message."""
    result = train_limited(*ARGS, "--data-dir", data, "--output-dir", tmp_path / "out",
                           limits=[(limit, (400 << 20, resource.getrlimit(limit)[1]))])
    assert_one_line_error(result, flag, "400 MiB", "raise it")
    assert "model:" not in result.stderr
