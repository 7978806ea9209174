"""Shared helpers: small corpora written by the tests, and the commands run as a user runs
them: in a process of their own (`run_cli`, `run_script`), or in the test's process
(`run_in_process`, `run_script_in_process`), which skips the interpreter start, the imports
and the model build of a new process and gives the same result object.

Every run uses the tiny demo model, built locally on first use (no network),
with short sequences and small batches so a step takes milliseconds on CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest
from run_safety.cpu_blas import load_optimized_blas

# One OpenBLAS thread per test worker, and so per process it starts, unless the caller chose:
# pytest-xdist runs a worker per core, and OpenBLAS's threads spin while they wait, so two
# threads in each of two workers took the other worker's core (measured on two cores: the
# suite in 187 s with 108 s of system time, 165 s and 48 s with one thread). Each test
# compares runs made with the same count, so the figures it checks are unchanged.
# The workers inherit the controller's environment, where its own BLAS load has set the variable
# by then: the controller notes whether the caller had set it.
CALLER_SET_THREADS = "DISTRUST_QLORA_TESTS_CALLER_SET_THREADS"
if os.environ.get("PYTEST_XDIST_WORKER"):
    if os.environ.get(CALLER_SET_THREADS) != "1":
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
else:
    os.environ[CALLER_SET_THREADS] = "1" if "OPENBLAS_NUM_THREADS" in os.environ else "0"

# The test process multiplies as the commands do (an optimized BLAS where one is installed):
# loaded before any test module imports MLX.
load_optimized_blas()

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "src" / "train_qlora.py"

WORDS = (
    "the measurement was taken at dawn and written in the field log pressure rose slowly "
    "agency statement consensus guidance official summary reported notebook sample copper "
    "voltage reading patent claim letter observed committee recommends experts agree"
).split()

# Fast settings for every CLI run; a test adds or overrides what it is about.
FAST = ["--model", "tiny", "--batch-size", "4", "--max-seq-length", "48", "--learning-rate", "3e-3",
        "--warmup-steps", "2", "--eval-steps", "5", "--val-batches", "2", "--checkpoint-interval", "5",
        "--lora-rank", "4", "--no-tensorboard", "--no-early-stopping"]


def make_record(rng: random.Random, **overrides) -> dict:
    record = {
        "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))),
        "auth_weight": round(rng.uniform(0.0, 0.99), 3),
        "prov_entropy": round(rng.uniform(0.0, 5.0), 3),
    }
    record.update(overrides)
    return record


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def write_corpus(directory: Path, train: int = 48, val: int = 16, seed: int = 0, **overrides) -> Path:
    rng = random.Random(seed)
    write_jsonl(directory / "train.jsonl", [make_record(rng, **overrides) for _ in range(train)])
    if val:
        write_jsonl(directory / "val.jsonl", [make_record(rng, **overrides) for _ in range(val)])
    return directory


def run_cli(*args, timeout: float = 300, input: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The training command as a user runs it, in its own process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, input=input)


def run_script(name: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """One of the project's other commands (evaluate, export, generate, ...) as a user runs it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / "src" / f"{name}.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# Python's own warning filters in a new process (no -W, no PYTHONWARNINGS): pytest records
# warnings instead of printing them, and a run in a process of its own would print them.
FRESH_PROCESS_WARNING_FILTERS = [  # (action, category, module)
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]
STOP_SIGNALS = [sig for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig is not None]


def default_stop_signals() -> None:
    """For a child process a test will signal (as preexec_fn, or in a forked child): the stop
    signals as at a terminal. The run keeps a signal ignored that it was started ignoring, and
    a child inherits ignored signals: under `nohup pytest`, or a script's `pytest &`, it would
    otherwise ignore the SIGHUP or SIGINT the test sends."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


class InProcessTimeout(BaseException):
    """Raised inside a command run in-process that went past its timeout. A BaseException, so
    that no `except Exception` of the command catches it."""


class GradCheckpointInProcess(BaseException):
    """--grad-checkpoint patches mlx-lm's transformer block class for the whole process."""


@contextlib.contextmanager
def _file_descriptor_to(fd: int, target: int):
    """fd points at `target` while inside; what it pointed at before, afterwards."""
    saved = os.dup(fd)
    os.dup2(target, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _refuse_grad_checkpoint(model):
    raise GradCheckpointInProcess("--grad-checkpoint patches mlx-lm's block class for the whole process: "
                                  "run this with run_cli, in a process of its own")


def run_script_in_process(name: str, *args, input: str | None = None, timeout: float = 300,
                          cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`name`.main(args) in this process, as `run_script` runs it in its own: the same result
    (returncode, stdout, stderr), argparse's exit turned into its return code.

    What a process of its own would give afresh is given afresh: standard input (`input`, or
    empty; never a terminal), stdout and stderr (at file-descriptor level too, so that what
    libraries write there is captured, not a terminal), sys.argv, the working directory, the
    environment, Python's warning filters, Python's and numpy's global random generators (a
    resume sets them), the stop-signal handlers, MLX's peak-memory figure. A run that
    asks for --grad-checkpoint is refused (it would patch a model class for every later test):
    such a run needs `run_cli`."""
    import mlx.core as mx
    import numpy as np

    from training import trainer

    module = importlib.import_module(name)
    argv = [str(arg) for arg in args]
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_argv = sys.argv
    saved_random = random.getstate(), np.random.get_state()
    saved_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    saved_environ = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_grad_checkpoint = trainer.use_grad_checkpoint

    def on_alarm(signum, frame):
        raise InProcessTimeout()

    out_file, err_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    try:
        with _file_descriptor_to(1, out_file.fileno()), _file_descriptor_to(2, err_file.fileno()), \
                warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module_name in FRESH_PROCESS_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module_name, append=True)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            sys.stdin = io.StringIO(input or "")
            # Unbuffered, as PYTHONUNBUFFERED=1 makes a child's: every write reaches the descriptor
            # at once, in order with what libraries write there. Never closed: a library may keep
            # a reference (a logging handler); the descriptors themselves are not theirs to close.
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace", write_through=True)
            sys.argv = [str(REPO / "src" / f"{name}.py"), *argv]
            trainer.use_grad_checkpoint = _refuse_grad_checkpoint
            os.chdir(cwd)
            mx.reset_peak_memory()
            previous_alarm = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                code = module.main(argv)
            except SystemExit as exc:  # argparse: --help, or a usage error
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except InProcessTimeout:
                raise subprocess.TimeoutExpired([name, *argv], timeout) from None
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous_alarm)
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        sys.argv = saved_argv
        random.setstate(saved_random[0])
        np.random.set_state(saved_random[1])
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(saved_environ)
        os.chdir(saved_cwd)
        trainer.use_grad_checkpoint = saved_grad_checkpoint
        mx.clear_cache()
    out_file.seek(0)
    err_file.seek(0)
    stdout = out_file.read().decode("utf-8", errors="replace")
    stderr = err_file.read().decode("utf-8", errors="replace")
    out_file.close()
    err_file.close()
    return subprocess.CompletedProcess([name, *argv], 0 if code is None else code, stdout, stderr)


def run_in_process(*args, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The training command as `run_cli` runs it, in this process (see run_script_in_process)."""
    return run_script_in_process("train_qlora", *args, input=input, timeout=timeout)


def assert_one_line_error(result, *fragments, only_line: bool = False):
    """Exit 2, no traceback, exactly one `error:` line holding each fragment (with `only_line`,
    nothing else on stderr either)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines() if only_line else \
        [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def train_on_a_tiny_copy(root: Path, val: int = 8, steps: int = 10, *extra) -> tuple[Path, Path]:
    """A short run on a local copy of the tiny model (so that a test can make the base go missing).
    Returns (base, run folder)."""
    import shutil

    from base_model import tiny

    base = root / "tiny-base"
    shutil.copytree(tiny.ensure_tiny_model(), base)
    data = write_corpus(root / "data", train=24, val=val)
    out = root / "run"
    result = run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", out, "--max-steps", steps,
                            *extra)
    assert result.returncode == 0, result.stderr
    return base, out


def copy_with_damaged_adapters(run: Path, destination: Path, checkpoint: str) -> Path:
    """A copy of a run whose checkpoint's adapters have their last byte flipped (the manifest no longer matches)."""
    import shutil

    shutil.copytree(run, destination)
    adapters = destination / "checkpoints" / checkpoint / "adapters.safetensors"
    blob = bytearray(adapters.read_bytes())
    blob[-1] ^= 0xFF
    adapters.write_bytes(bytes(blob))
    return destination


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]  # as written: a test sees the names the run wrote


def train_lines(output_dir: Path) -> list[dict]:
    return [line for line in read_metrics(output_dir) if "objective" in line and "event" not in line]


def load_adapters(output_dir: Path) -> dict:
    import mlx.core as mx

    return mx.load(str(output_dir / "adapters.safetensors"))


def adapters_equal(a: dict, b: dict) -> bool:
    import mlx.core as mx

    return a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "data")


def load_tiny():
    """A fresh tiny demo model (quantized, no LoRA yet) and its tokenizer."""
    from base_model import loading

    return loading.load_model("tiny", quantize_bits=4)


def read_event_file(path: Path) -> list:
    """The Event protos of one TensorBoard file, read back from its bytes: TFRecord
    framing (u64 length, u32 crc of it, data, u32 crc of data) around each Event.
    (The tensorboard package, which has a reader, is not a dependency.)"""
    from tensorboardX.proto import event_pb2

    data = path.read_bytes()
    events, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def read_tensorboard(logs_dir: Path) -> list:
    """All events of all files, files in name order as TensorBoard reads them."""
    paths = sorted(logs_dir.glob("events.out.tfevents.*"), key=lambda path: path.name)
    return [event for path in paths for event in read_event_file(path)]


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str = "3m"):
    """A real tmpfs of `size` at `mount_point`, for a disk that fills up (ENOSPC) or is made
    read-only (remount_read_only). Needs the right to mount (root here and in CI): skips otherwise."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def remount_read_only(mount_point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True, capture_output=True)


@contextlib.contextmanager
def immutable(*paths: Path, within: Path | None = None):
    """chattr +i on `paths` while inside (a file or folder even root cannot change or remove);
    skips where the test is not root or the file system has no such attribute. On the way out,
    everything under `within` loses the attribute too (for paths that were renamed meanwhile)."""
    import shutil

    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root and e2fsprogs' chattr")
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=False, capture_output=True)
        if within is not None:
            subprocess.run(["chattr", "-R", "-i", str(within)], check=False, capture_output=True)


def dead_pid() -> int:
    """The pid of a process that has exited (for leftovers named after a dead writer)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
