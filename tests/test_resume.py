"""Resuming, end to end: the training command killed, interrupted, damaged, and resumed.

The training command runs on the tiny model. Runs that are killed, signalled,
asked at a terminal, given no terminal, or held to a file-size limit run in
processes of their own, and so does the run that resumes what a killed or
signalled process left; the other runs (the reference among them) run in the
test's process (run_in_process). The reference is one uninterrupted run (module
fixture `reference`); a run killed or stopped at any moment and resumed must end
with bit-for-bit its adapters, optimizer state and per-step losses: the
project's core promise.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import CheckpointManager
from conftest import (FAST, REPO, TRAIN_SCRIPT, adapters_equal, default_stop_signals, load_adapters, read_metrics,
                      run_cli, run_in_process, train_lines, write_corpus, write_jsonl)

STEPS = 20
# A checkpoint every step: kills land inside saves, and there is always one to damage.
ARGS = [*FAST, "--checkpoint-interval", "1", "--max-steps", str(STEPS)]
COMPARED = ("step", "objective", "ce", "grad_norm", "tokens")


# ----------------------------------------------------------------- helpers


def start_cli(*args, stderr_path: Path) -> subprocess.Popen:
    """The training command in its own process, not on a terminal, stderr to a file."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(stderr_path, "w") as err:
        return subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=default_stop_signals)


def wait_until(predicate, process: subprocess.Popen | None = None, timeout: float = 60.0, poll: float = 0.002) -> bool:
    """Poll until `predicate()` holds (True) or the process has exited / time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return predicate()
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def committed_steps(stderr_path: Path) -> list[int]:
    """Steps of the 'checkpoint: .../step-NNNNNNNN' lines a run printed so far."""
    try:
        text = stderr_path.read_text()
    except FileNotFoundError:
        return []
    return [int(line.rsplit("step-", 1)[1]) for line in text.splitlines()
            if line.startswith("checkpoint: ") and "step-" in line and line.rsplit("step-", 1)[1].isdigit()]


def temporaries(checkpoints: Path, prefix: str = ".tmp-") -> list[str]:
    try:
        return sorted(name for name in os.listdir(checkpoints) if name.startswith(prefix))
    except FileNotFoundError:
        return []


def step_dirs(checkpoints: Path) -> list[str]:
    return sorted(name for name in os.listdir(checkpoints) if name.startswith("step-"))


def pointer(checkpoints: Path, name: str) -> str:
    return (checkpoints / name).read_text().strip()


def final_optimizer(out: Path) -> dict:
    import mlx.core as mx

    checkpoints = out / "checkpoints"
    return mx.load(str(checkpoints / pointer(checkpoints, "final") / "optimizer.safetensors"))


def final_trainer_state(out: Path) -> dict:
    checkpoints = out / "checkpoints"
    return json.loads((checkpoints / pointer(checkpoints, "final") / "trainer_state.json").read_text())


def compared(out: Path) -> list[tuple]:
    return [tuple(line.get(key) for key in COMPARED) for line in train_lines(out)]


def val_lines(out: Path) -> list[dict]:
    return [line for line in read_metrics(out) if "val_ce" in line]


def assert_same_as_reference(out: Path, reference: Path) -> None:
    """Adapters, optimizer state, per-step figures, validations and data position all identical."""
    assert compared(out) == compared(reference)
    assert val_lines(out) == val_lines(reference)
    assert all("val_probe_margin" in line for line in val_lines(out))
    assert adapters_equal(load_adapters(out), load_adapters(reference))
    assert adapters_equal(final_optimizer(out), final_optimizer(reference))
    mine, theirs = final_trainer_state(out), final_trainer_state(reference)
    assert mine["step"] == theirs["step"] == STEPS
    for key in ("position", "tokens_seen", "best_val_loss", "best_val_step"):
        assert mine["trainer"]["loop"][key] == theirs["trainer"]["loop"][key], key
    end = read_metrics(out)[-1]
    assert end["event"] == "end" and "max-steps" in end["reason"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The corpus, with probes: scored at each validation, they must leave a resumed run bit-identical
    (and their figures are among the validation lines compared)."""
    data = write_corpus(tmp_path_factory.mktemp("data"))
    write_jsonl(data / "probes.jsonl", [{"prompt": "the reading", "primary": " rose at dawn", "consensus": " fell"},
                                        {"prompt": "experts agree", "primary": " slowly", "consensus": " it was"}])
    return data


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run, every checkpoint kept (the damage test copies it)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_in_process(*ARGS, "--keep-checkpoints", "100", "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return out, result


def copy_run(reference: Path, destination: Path, *, up_to: int) -> Path:
    """The reference run as it stood had it been stopped after step `up_to`'s checkpoint."""
    shutil.copytree(reference, destination)
    checkpoints = destination / "checkpoints"
    for name in step_dirs(checkpoints):
        if int(name.split("-")[1]) > up_to:
            shutil.rmtree(checkpoints / name)
    for name in ("best", "final"):
        if (checkpoints / name).exists() and not (checkpoints / pointer(checkpoints, name)).exists():
            (checkpoints / name).unlink()
    return destination


# ------------------------------------------------------------- kill -9


def test_killed_at_random_moments_and_resumed_equals_the_uninterrupted_run(data, reference, tmp_path):
    reference_out, _ = reference
    out, checkpoints = tmp_path / "out", tmp_path / "out" / "checkpoints"
    settings = (*ARGS, "--keep-checkpoints", "2", "--data-dir", data, "--output-dir", out)
    rng = random.Random(20240603)
    kills, inside_save, left_behind = 0, 0, False
    modes = ["startup", "inside-save", "random", "inside-save", "random", "inside-save", "inside-save"]
    for round_number, mode in enumerate(modes):
        log = tmp_path / f"round-{round_number}.log"
        process = start_cli(*settings, "--auto-resume", stderr_path=log)
        if mode == "startup":
            # Anywhere from interpreter start to the first steps.
            time.sleep(rng.uniform(0.1, 1.5))
        else:
            target = rng.randint(1, 3)  # steps into this process's run
            wait_until(lambda: len(committed_steps(log)) >= target, process)
            if mode == "random":
                time.sleep(rng.uniform(0.0, 0.06))
            else:
                wait_until(lambda: bool(temporaries(checkpoints, ".tmp-step-")), process, poll=0.0005)
                time.sleep(rng.uniform(0.0, 0.004))
        if process.poll() is not None:
            break  # it finished before the kill: the final run below has nothing left to do
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        kills += 1
        if temporaries(checkpoints, ".tmp-step-"):
            inside_save += 1
        stderr = log.read_text()
        assert "Traceback" not in stderr, stderr
        if left_behind:  # the previous kill left a half save: this run removed it first
            assert "leftover of an interrupted save" in stderr or "restored checkpoint" in stderr, stderr
        left_behind = bool(temporaries(checkpoints))
        # What a kill leaves visible is only ever whole checkpoints.
        visible = CheckpointManager(checkpoints, warn=lambda message: None).checkpoints()
        assert all(info.valid for info in visible), [(info.path.name, info.problem) for info in visible]

    assert kills >= 5, f"only {kills} kills landed before the run finished"
    assert inside_save >= 2, f"only {inside_save} kills landed inside a checkpoint save"

    result = run_cli(*settings, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    assert not temporaries(checkpoints)
    assert_same_as_reference(out, reference_out)


# ------------------------------------------------------- damaged checkpoints

FILES = ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json",
         "config.json", "manifest.json")


def damage(path: Path, how: str) -> None:
    if how == "flip":
        content = bytearray(path.read_bytes())
        content[len(content) // 2] ^= 0xFF
        path.write_bytes(bytes(content))
    elif how == "truncate":
        content = path.read_bytes()
        path.write_bytes(content[:len(content) // 2])
    else:
        path.unlink()


def test_a_damaged_newest_checkpoint_is_skipped_by_name_and_the_previous_one_used(data, reference, tmp_path):
    reference_out, reference_result = reference
    # No false alarm: a clean run warns about nothing and lists every checkpoint as valid.
    assert "warning" not in reference_result.stderr.lower(), reference_result.stderr
    listing = run_in_process("--model", "tiny", "--output-dir", reference_out, "--list-checkpoints", timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "NO:" not in listing.stdout and listing.stdout.count(" yes") == STEPS, listing.stdout

    # Every file of a checkpoint, each way of damaging it: one damaged checkpoint
    # each, newest first, so a resume must walk back past all of them to step 2.
    cases = [(name, how) for how in ("flip", "truncate", "delete") for name in FILES]
    assert len(cases) == STEPS - 2
    out = copy_run(reference_out, tmp_path / "out", up_to=STEPS)
    checkpoints = out / "checkpoints"
    damaged = {}
    for offset, (name, how) in enumerate(cases):
        step_name = f"step-{STEPS - offset:08d}"
        damage(checkpoints / step_name / name, how)
        damaged[step_name] = (name, how)

    listing = run_in_process("--model", "tiny", "--output-dir", out, "--list-checkpoints", timeout=60)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("step-")}
    for step_name, (name, how) in damaged.items():
        assert "NO:" in rows[step_name], (step_name, name, how, rows[step_name])
        if how != "flip" or name != "manifest.json":
            assert name in rows[step_name], (step_name, name, how, rows[step_name])
    for step_name in ("step-00000001", "step-00000002"):
        assert "NO:" not in rows[step_name] and " yes" in rows[step_name], rows[step_name]

    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "skipping checkpoint" in line]
    for step_name, (name, how) in damaged.items():
        named = [line for line in warnings if step_name in line]
        assert named, (step_name, name, how, result.stderr)
        if how != "flip" or name != "manifest.json":
            assert name in named[0], (step_name, name, how, named[0])
    assert len(warnings) == len(damaged), warnings
    assert f"resumed from {checkpoints / 'step-00000002'} at step 2" in result.stderr, result.stderr
    assert_same_as_reference(out, reference_out)


# --------------------------------------------------------------- signals


def test_sigint_sigterm_and_sighup_commit_a_checkpoint_and_the_resumed_run_equals_the_uninterrupted_one(
        data, reference, tmp_path):
    reference_out, _ = reference
    out, checkpoints = tmp_path / "out", tmp_path / "out" / "checkpoints"
    settings = (*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    stopped_at = []
    for number, (sig, code) in enumerate(((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129))):
        log = tmp_path / f"run-{number}.log"
        process = start_cli(*settings, stderr_path=log)
        already = stopped_at[-1] if stopped_at else 0
        wait_until(lambda: len(committed_steps(log)) >= 3, process)
        assert process.poll() is None, "the run ended before it could be signalled"
        process.send_signal(sig)
        assert process.wait(timeout=60) == code, log.read_text()
        stderr = log.read_text()
        assert "Traceback" not in stderr, stderr
        end = read_metrics(out)[-1]
        step = train_lines(out)[-1]["step"]
        assert already < step < STEPS
        assert end["event"] == "end" and signal.Signals(sig).name in end["reason"] and str(step) in end["reason"]
        # The checkpoint at the very step it stopped is committed, valid, and the final one.
        assert pointer(checkpoints, "final") == f"step-{step:08d}"
        assert committed_steps(log)[-1] == step
        assert (checkpoints / f"step-{step:08d}" / "manifest.json").is_file()
        assert not temporaries(checkpoints)
        stopped_at.append(step)

    result = run_cli(*settings)
    assert result.returncode == 0, result.stderr
    assert f"at step {stopped_at[-1]}" in result.stderr
    assert_same_as_reference(out, reference_out)


def test_a_second_sigint_exits_at_once_leaving_whole_checkpoints(data, tmp_path):
    out, checkpoints = tmp_path / "out", tmp_path / "out" / "checkpoints"
    log = tmp_path / "run.log"
    process = start_cli(*ARGS, "--max-steps", "2000", "--data-dir", data, "--output-dir", out, stderr_path=log)
    wait_until(lambda: len(committed_steps(log)) >= 3, process)
    process.send_signal(signal.SIGINT)
    # Two signals close together are one to the process (Python's handler runs
    # between bytecodes): the second Ctrl+C comes once the first was seen.
    wait_until(lambda: "SIGINT: finishing" in log.read_text(), process, poll=0.0005)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130, log.read_text()
    assert "Second interrupt" in log.read_text()
    visible = CheckpointManager(checkpoints, warn=lambda message: None).checkpoints()
    assert visible and all(info.valid for info in visible), [(info.path.name, info.problem) for info in visible]
    assert visible[-1].step == committed_steps(log)[-1]


# ------------------------------------------------- no terminal, --fresh


def test_without_a_terminal_and_without_a_choice_it_exits_2_then_fresh_moves_the_old_aside(data, reference, tmp_path):
    reference_out, _ = reference
    out = copy_run(reference_out, tmp_path / "out", up_to=12)
    checkpoints = out / "checkpoints"
    before = step_dirs(checkpoints)

    started = time.monotonic()
    result = run_cli(*ARGS, "--data-dir", data, "--output-dir", out, input="", timeout=60)  # stdin: a pipe
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 60
    for flag in ("--auto-resume", "--resume", "--fresh"):
        assert flag in result.stderr, result.stderr
    assert "step 12" in result.stderr and "Traceback" not in result.stderr
    assert step_dirs(checkpoints) == before  # nothing touched

    result = run_cli(*ARGS, "--max-steps", "3", "--data-dir", data, "--output-dir", out, "--fresh", input="")
    assert result.returncode == 0, result.stderr
    aside = sorted(out.glob("checkpoints.old-*"))
    assert len(aside) == 1, list(out.iterdir())
    assert step_dirs(aside[0]) == before
    assert aside[0].name in result.stderr
    # The new run started from step 1 and its checkpoints are its own.
    assert [line["step"] for line in train_lines(out)] == [1, 2, 3]
    assert step_dirs(checkpoints) == ["step-00000001", "step-00000002", "step-00000003"]


# ------------------------------------------------------- config changes


def test_a_config_that_changes_the_result_refuses_to_resume_naming_the_fields(data, reference, tmp_path):
    reference_out, _ = reference
    out = copy_run(reference_out, tmp_path / "out", up_to=12)
    before = (out / "metrics.jsonl").read_bytes()
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume",
                            "--lora-rank", "8", "--seed", "1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.lower()
    assert "rank" in message and "seed" in message, result.stderr
    assert "learning_rate" not in message and "batch_size" not in message, result.stderr
    # Refused before anything was written.
    assert (out / "metrics.jsonl").read_bytes() == before
    assert step_dirs(out / "checkpoints")[-1] == "step-00000012"


def test_max_steps_and_eval_steps_may_change_and_a_finished_run_continues(data, reference, tmp_path):
    reference_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume",
                            "--max-steps", str(2 * STEPS), "--eval-steps", "4")
    assert result.returncode == 0, result.stderr
    assert f"at step {STEPS}" in result.stderr
    lines = train_lines(out)
    assert [line["step"] for line in lines] == list(range(1, 2 * STEPS + 1))
    # What came before the resume is kept as it was.
    assert [tuple(line.get(k) for k in COMPARED) for line in lines[:STEPS]] == compared(reference_out)
    new_val_steps = [line["step"] for line in val_lines(out) if line["step"] > STEPS]
    assert new_val_steps == list(range(STEPS + 4, 2 * STEPS + 1, 4))
    assert pointer(out / "checkpoints", "final") == f"step-{2 * STEPS:08d}"
    end = read_metrics(out)[-1]
    assert end["event"] == "end" and str(2 * STEPS) in end["reason"]
    assert not adapters_equal(load_adapters(out), load_adapters(reference_out))


# ---------------------------------------------------------------- disk full

# Files over this size cannot be written (RLIMIT_FSIZE, the kernel's EFBIG), as
# on a full disk: every checkpoint's arrays are larger, metrics.jsonl is smaller.
WRITE_LIMIT = 32_000

LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.path.insert(0, sys.argv[2])
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_limited(*args, limit: int = WRITE_LIMIT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), str(TRAIN_SCRIPT.parent), str(TRAIN_SCRIPT),
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_checkpoints_that_cannot_be_written_warn_loudly_and_stop_the_run_after_a_few(data, reference, tmp_path):
    pytest.importorskip("resource")
    reference_out, _ = reference
    sizes = {path.name: path.stat().st_size for path in (reference_out / "checkpoints" / "step-00000010").iterdir()}
    assert min(sizes["adapters.safetensors"], sizes["optimizer.safetensors"]) > WRITE_LIMIT, sizes
    assert (reference_out / "metrics.jsonl").stat().st_size < WRITE_LIMIT / 2

    out = copy_run(reference_out, tmp_path / "out", up_to=10)
    checkpoints = out / "checkpoints"
    kept = {name: (checkpoints / "step-00000010" / name).read_bytes() for name in sizes}
    result = run_limited(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING: checkpoint")]
    assert len(warnings) >= 2, result.stderr
    # the top-level copy of the adapters fails too (at the resume): said in one line naming the file
    assert any(line.startswith("WARNING: could not update") and "adapters.safetensors" in line
               for line in result.stderr.splitlines()), result.stderr
    for number, line in enumerate(warnings, start=11):
        assert f"step {number}" in line and "File too large" in line, line
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error:") and "failed in a row" in error, result.stderr
    # The metrics went on being written; the last good checkpoint is intact and no partial one is visible.
    assert [line["step"] for line in train_lines(out)][-1] == 13
    assert step_dirs(checkpoints)[-1] == "step-00000010"
    assert not temporaries(checkpoints)
    assert {name: (checkpoints / "step-00000010" / name).read_bytes() for name in sizes} == kept
    listing = run_cli("--model", "tiny", "--output-dir", out, "--list-checkpoints", timeout=60)
    assert "NO:" not in listing.stdout, listing.stdout
    # Resuming once there is room again continues from there to the same end.
    result = run_cli(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "at step 10" in result.stderr
    assert_same_as_reference(out, reference_out)


def test_a_run_whose_final_save_fails_does_not_report_success(data, reference, tmp_path):
    """The last save fails (disk full) after the last step: the adapters at the top
    of the output dir are still an older step's, so exit 0 ('finished') would be a lie."""
    pytest.importorskip("resource")
    reference_out, _ = reference
    out = copy_run(reference_out, tmp_path / "out", up_to=STEPS - 1)
    result = run_limited(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert "WARNING" in result.stderr and f"step {STEPS}" in result.stderr, result.stderr
    # Not a success, and not a crash either: exit 1, the reason said, no traceback.
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    ended = [line for line in result.stderr.splitlines() if line.startswith("Run ended: ")]
    assert ended == [f"Run ended: finished: reached --max-steps {STEPS}; but the final checkpoint could not be "
                     f"saved (the newest saved one is step {STEPS - 1})"], result.stderr
    assert read_metrics(out)[-1]["event"] == "end"


def _run_on_a_terminal(args, answer: str, timeout: float = 120) -> tuple[int, str]:
    """The CLI with a real pseudo-terminal as stdin/stdout: what a user at a shell sees."""
    import pty
    import select
    import sys
    import time

    from conftest import REPO, TRAIN_SCRIPT

    pid, fd = pty.fork()
    if pid == 0:  # the child: the training command on the terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, str(TRAIN_SCRIPT), *map(str, args)])
    screen, answered, deadline = b"", False, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if not answered and b"[Y/n]" in screen:
                os.write(fd, answer.encode() + b"\n")
                answered = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


def test_at_a_terminal_the_user_is_asked_and_the_answer_is_followed(tmp_path):
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    first = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "5")
    assert first.returncode == 0, first.stderr
    settings = [*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "8"]

    code, screen = _run_on_a_terminal(settings, "y")
    lines = screen.replace("\r\n", "\n").splitlines()
    asked = lines.index(next(line for line in lines if line.startswith("Found checkpoints")))
    # What each answer does is said before the question.
    assert lines[asked:asked + 5] == [
        f"Found checkpoints in {out / 'checkpoints'} (newest valid: step 5).",
        "  y (or Enter): resume from step 5, with everything as it was then",
        "  n: start anew from step 0; the checkpoints, metrics.jsonl and logs/ are moved aside "
        "(renamed *.old-<time>, nothing is deleted)",
        "  (next time, --auto-resume or --fresh chooses without asking)",
        "Resume from step 5? [Y/n] y",
    ], lines[asked:asked + 5]
    assert code == 0 and "resumed from" in screen and "reached --max-steps 8" in screen

    code, screen = _run_on_a_terminal(settings, "n")
    assert "Resume from step 8? [Y/n]" in screen
    assert code == 0 and "moved aside to" in screen and "resumed from" not in screen
    (old,) = tmp_path.glob("out/checkpoints.old-*")
    assert (old / "step-00000008").is_dir()  # kept, not deleted
    stamp = old.name.split(".old-")[1]
    assert (out / f"metrics.jsonl.old-{stamp}").is_file()  # the earlier run's record, moved with its checkpoints
    assert [line["step"] for line in train_lines(out)] == list(range(1, 9))  # the new run's own


def test_damaged_checkpoints_only_are_never_overwritten(tmp_path):
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "10").returncode == 0
    for state in (out / "checkpoints").glob("step-*/trainer_state.json"):
        with open(state, "ab") as handle:
            handle.write(b" ")
    before = {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    for flags in (["--auto-resume"], []):
        result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "10", *flags)
        assert result.returncode == 2, result.stderr
        assert "none of them verifies" in result.stderr and "--fresh" in result.stderr
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before


def test_resuming_on_other_training_data_is_refused(tmp_path):
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "5").returncode == 0
    with open(data / "train.jsonl", "a") as handle:
        handle.write('{"text": "one more record", "auth_weight": 0.5, "prov_entropy": 1.0}\n')
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "10", "--auto-resume")
    assert result.returncode == 2 and "train_data.size" in result.stderr, result.stderr


def test_a_stop_right_after_a_checkpoint_keeps_it_and_its_best_mark(tmp_path):
    # Spikes count after warmup (2): step 3 is the first, so patience 1 stops at step 3,
    # right after the checkpoint (and best validation) of step 2.
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    flags = [a for a in FAST if a != "--no-early-stopping"]
    result = run_in_process(*flags, "--data-dir", data, "--output-dir", out, "--max-steps", "10",
                            "--eval-steps", "2", "--checkpoint-interval", "2",
                            "--grad-spike-threshold", "1e-9", "--grad-spike-patience", "1")
    assert result.returncode == 0, result.stderr
    assert "gradient norm above" in result.stderr
    pointers = out / "checkpoints"
    assert (pointers / "best").read_text().strip() == "step-00000002"
    assert (pointers / "final").read_text().strip() == "step-00000002"
    saves = [line for line in read_metrics(out) if line.get("event") == "checkpoint"]
    assert [line["step"] for line in saves] == [2]  # committed once, not again at the stop
