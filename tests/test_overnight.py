"""What an overnight run meets besides kill -9: links planted in its folder, a
closed terminal, a full disk, a kill between a commit and its bookkeeping, a
damaged index cache, a checkpoint whose JSON is wrong but whose manifest
matches, a training file changed under it. Each ends whole or in a clean
refusal: no traceback, nothing written outside the run folder.

What needs a process of its own runs in one: the closed terminal, the full disk
and the file-size limit, the file changed under a running process, and the links
at temporary names (which name this test's pid: another live process's, for the
run). The other runs run in the test's process (run_in_process)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints.manifest import write_manifest
from conftest import (FAST, REPO, TRAIN_SCRIPT, adapters_equal, assert_one_line_error, default_stop_signals, load_adapters,
                      read_metrics, run_cli, run_in_process, train_lines, write_corpus, write_jsonl)

STEPS = 12
ARGS = [*FAST, "--checkpoint-interval", "4", "--eval-steps", "4", "--max-steps", str(STEPS)]
VICTIM_TEXT = "a file outside the run folder\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """One uninterrupted run, every checkpoint kept."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_in_process(*ARGS, "--keep-checkpoints", "100", "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return out


def copy_run(reference: Path, destination: Path, *, up_to: int) -> Path:
    """The reference run as it stood after step `up_to`'s checkpoint (later ones and their bookkeeping gone)."""
    shutil.copytree(reference, destination)
    checkpoints = destination / "checkpoints"
    for path in checkpoints.glob("step-*"):
        if int(path.name.split("-")[1]) > up_to:
            shutil.rmtree(path)
    for name in ("best", "final"):
        target = checkpoints / name
        if target.exists() and not (checkpoints / target.read_text().strip()).exists():
            target.unlink()
    return destination


def assert_no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------ planted links


@pytest.mark.parametrize("name", [".run.lock", "metrics.jsonl", "adapters.safetensors", "adapter_config.json",
                                  "logs", "cache", "checkpoints/best"])
def test_a_link_planted_where_the_run_writes_is_refused_and_the_victim_untouched(data, reference, tmp_path, name):
    out = copy_run(reference, tmp_path / "out", up_to=8)
    victim = tmp_path / "victim"
    victim.write_text(VICTIM_TEXT) if name not in ("logs", "cache") else victim.mkdir()
    (out / name).unlink() if (out / name).is_file() else shutil.rmtree(out / name, ignore_errors=True)
    (out / name).symlink_to(victim)
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume", "--max-steps", "14")
    assert_one_line_error(result, str(out / name), "symbolic link")
    assert (victim.read_text() == VICTIM_TEXT) if victim.is_file() else not any(victim.iterdir())


def test_links_planted_at_temporary_names_are_never_followed(data, reference, tmp_path):
    """The names a run once used for its temporaries, and names in the form it uses now."""
    out = copy_run(reference, tmp_path / "out", up_to=8)
    victims = []
    for i, name in enumerate([".adapters.safetensors.tmp", "metrics.jsonl.tmp", ".tmp-adapters.safetensors-0-1",
                              f".tmp-metrics.jsonl-abcd-{os.getpid()}", "checkpoints/.tmp-best-1"]):
        victim = tmp_path / f"victim-{i}"
        victim.write_text(VICTIM_TEXT)
        (out / name).symlink_to(victim)
        victims.append(victim)
    result = run_cli(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert all(victim.read_text() == VICTIM_TEXT for victim in victims)
    assert adapters_equal(load_adapters(out), load_adapters(reference))
    assert not (out / "metrics.jsonl").is_symlink()


@pytest.mark.parametrize("how", ["symlink", "fifo"])
def test_a_checkpoint_file_that_is_a_link_or_a_fifo_is_skipped_like_a_damaged_one(data, reference, tmp_path, how):
    out = copy_run(reference, tmp_path / "out", up_to=8)
    state = out / "checkpoints" / "step-00000008" / "trainer_state.json"
    outside = tmp_path / "outside.json"
    shutil.copyfile(state, outside)  # the same bytes: only its kind of file is wrong
    state.unlink()
    state.symlink_to(outside) if how == "symlink" else os.mkfifo(state)
    listing = run_in_process("--output-dir", out, "--list-checkpoints", timeout=60)  # must not hang on the FIFO
    assert listing.returncode == 0 and "not a regular file" in listing.stdout, listing.stdout
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint step-00000008" in result.stderr and "resumed from" in result.stderr
    assert "at step 4" in result.stderr
    assert adapters_equal(load_adapters(out), load_adapters(reference))


# ------------------------------------------------------------ the terminal closing


def test_closing_the_terminal_commits_a_checkpoint_and_exits_129(data, tmp_path):
    """The run on a real terminal (a pty); the terminal goes away (its master side closed): SIGHUP."""
    import pty

    out = tmp_path / "out"
    pid, master = pty.fork()
    if pid == 0:  # the child: the training command, its stdout and stderr the terminal
        default_stop_signals()
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, str(TRAIN_SCRIPT), *map(str, ARGS), "--max-steps", "400",
                                  "--checkpoint-interval", "1000", "--eval-steps", "1000",
                                  "--data-dir", str(data), "--output-dir", str(out)])
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.01)[0]:
                try:
                    os.read(master, 65536)  # keep the terminal drained
                except OSError:
                    break
            if (out / "metrics.jsonl").exists() and len(train_lines(out)) >= 3:
                break
    finally:
        os.close(master)  # the terminal hangs up
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129
    end = read_metrics(out)[-1]
    step = train_lines(out)[-1]["step"]
    assert end["event"] == "end" and "SIGHUP" in end["reason"]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "final").read_text().strip() == f"step-{step:08d}"
    assert 3 <= step < 400


# ------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real disk that fills up (ENOSPC). Needs the right to mount (root here and in CI)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of `folder` up to `leave` bytes free."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as handle:
        try:
            while shutil.disk_usage(folder).free > leave:
                handle.write(b"\0" * min(65536, max(shutil.disk_usage(folder).free - leave, 1)))
                handle.flush()
        except OSError:
            pass
    return ballast


def test_a_disk_filling_up_mid_run_warns_goes_on_then_stops_after_three_failed_saves(data, small_disk):
    out = small_disk / "out"
    args = [*ARGS, "--max-steps", "200", "--checkpoint-interval", "2", "--eval-steps", "1000", "--keep-checkpoints", "1",
            "--data-dir", data, "--output-dir", out]
    log = small_disk.parent / "run.log"
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=REPO, stdout=err,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "checkpoints" / "step-00000004").exists():
        time.sleep(0.01)
    fill(small_disk)
    code = process.wait(timeout=120)
    stderr = log.read_text()
    assert code == 1, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    lines = stderr.splitlines()
    failed_saves = [line for line in lines if line.startswith("WARNING: checkpoint")]
    assert len(failed_saves) == 3 and all("No space left on device" in line for line in failed_saves), stderr
    assert lines[-1].startswith("error:") and "3 checkpoint saves failed in a row" in lines[-1], stderr
    # The committed checkpoints verify, and nothing half-written is left anywhere.
    listing = run_cli("--output-dir", out, "--list-checkpoints", timeout=60)
    assert "NO:" not in listing.stdout and "step-" in listing.stdout, listing.stdout
    leftovers = [p for p in out.rglob(".tmp-*")]
    assert not leftovers, leftovers

    # Resuming while the disk is still full: one line saying so, nothing changed.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    result = run_cli(*args, "--auto-resume", timeout=120)
    assert_one_line_error(result, "MB free", "free some space")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert not list(out.rglob(".tmp-*"))

    # Space again: the run goes on from its newest checkpoint.
    (small_disk / "ballast").unlink()
    result = run_cli(*args, "--auto-resume", "--max-steps", str(train_lines(out)[-1]["step"] + 2), timeout=120)
    assert result.returncode == 0, result.stderr


def test_metrics_that_cannot_be_written_are_warned_about_once_and_training_goes_on(data, tmp_path):
    """metrics.jsonl and the TensorBoard file outgrow a file-size limit (the run's other files stay
    under it): one warning for each, no traceback, no hang, the run finishes."""
    out = tmp_path / "out"
    limited = (
        "import resource, runpy, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))\n"
        f"sys.path.insert(0, {str(TRAIN_SCRIPT.parent)!r})\n"
        f"sys.argv = [{str(TRAIN_SCRIPT)!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    with_tensorboard = [arg for arg in FAST if arg != "--no-tensorboard"]
    args = [*with_tensorboard, "--lora-rank", "1", "--max-steps", "200", "--checkpoint-interval", "50",
            "--eval-steps", "1000", "--data-dir", data, "--output-dir", out]
    result = subprocess.run([sys.executable, "-c", limited, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    warnings = [line for line in result.stderr.splitlines() if "metrics.jsonl" in line and "WARNING" in line]
    assert len(warnings) == 1 and "File too large" in warnings[0] and "MB free" in warnings[0], result.stderr
    tensorboard = [line for line in result.stderr.splitlines() if "TensorBoard" in line and "WARNING" in line]
    assert len(tensorboard) == 1 and "File too large" in tensorboard[0], result.stderr
    # Every line that is there is whole; the checkpoints are all there.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert (out / "checkpoints" / "step-00000200").is_dir()


# ------------------------------------------------------------ bookkeeping after the final commit


def test_a_kill_between_the_final_commit_and_its_bookkeeping_is_finished_by_the_resume(data, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out", up_to=STEPS)
    checkpoints = out / "checkpoints"
    saved = json.loads((checkpoints / "step-00000012" / "trainer_state.json").read_text())
    best = saved["trainer"]["loop"]["best_val_step"]  # the best validation as of step 12
    stale_best = 4 if best != 4 else 12
    # As the disk is if killed right after step 12's rename: top-level adapters still step 8's,
    # `final` not written, `best` naming a step that is not the best one.
    for name in ("adapters.safetensors", "adapter_config.json"):
        shutil.copyfile(checkpoints / "step-00000008" / name, out / name)
    (checkpoints / "final").unlink()
    (checkpoints / "best").write_text(f"step-{stale_best:08d}\n")

    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr
    assert adapters_equal(load_adapters(out), load_adapters(reference))
    assert (checkpoints / "final").read_text().strip() == "step-00000012"
    assert (checkpoints / "best").read_text().strip() == f"step-{best:08d}"


# ------------------------------------------------------------ the index cache


def test_a_flipped_bit_in_the_index_cache_is_found_and_the_index_rebuilt(data, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out", up_to=8)
    (cache,) = (out / "cache").glob("index-*.safetensors")
    blob = bytearray(cache.read_bytes())
    blob[-40] ^= 0x01  # in the arrays, past the header
    cache.write_bytes(bytes(blob))
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "fails its checksum" in result.stderr and "rebuilding" in result.stderr
    assert [line["objective"] for line in train_lines(out)] == [line["objective"] for line in train_lines(reference)]
    assert adapters_equal(load_adapters(out), load_adapters(reference))


# ------------------------------------------------------------ a checkpoint whose JSON is wrong


def tamper(checkpoint: Path, change) -> None:
    """Change trainer_state.json and write a manifest that matches it, as an attacker could."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    write_manifest(checkpoint, json.loads((checkpoint / "manifest.json").read_text())["step"],
                   state["trainer"] if isinstance(state.get("trainer"), dict) else {}, fsync=False)


def set_position(batch):
    return lambda state: state["trainer"]["loop"]["position"].update(batch=batch)


TAMPERINGS = {
    "position -5": set_position(-5),
    "position 10**6": set_position(10**6),
    "string where a number belongs": lambda state: state["trainer"]["loop"].update(tokens_seen="many"),
    "missing key": lambda state: state["trainer"]["loop"].pop("position"),
    "garbage rng": lambda state: state["trainer"]["rng"].update(python=[3, [1, 2, 3], None]),
    "step of 10**20 in the file": lambda state: state.update(step=10**20),
    "early stopping garbage": lambda state: state["trainer"]["early_stopping"].update(best_loss={"a": 1}),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_a_checkpoint_with_wrong_json_and_a_matching_manifest_is_skipped(data, reference, tmp_path, case):
    out = copy_run(reference, tmp_path / "out", up_to=8)
    tamper(out / "checkpoints" / "step-00000008", TAMPERINGS[case])
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    skipped = [line for line in result.stderr.splitlines() if "skipping checkpoint step-00000008" in line]
    assert len(skipped) == 1, result.stderr
    assert "resumed from" in result.stderr and "at step 4" in result.stderr
    assert adapters_equal(load_adapters(out), load_adapters(reference))


def test_a_step_of_10_to_the_20_in_name_and_manifest_is_refused_cleanly(data, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out", up_to=8)
    checkpoints = out / "checkpoints"
    huge = 10**20
    tamper(checkpoints / "step-00000008", lambda state: state.update(step=huge))
    manifest = json.loads((checkpoints / "step-00000008" / "manifest.json").read_text())
    write_manifest(checkpoints / "step-00000008", huge, {}, fsync=False)
    (checkpoints / "step-00000008").rename(checkpoints / f"step-{huge:08d}")
    assert manifest  # rewritten above with the huge step
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    assert f"skipping checkpoint step-{huge:08d}" in result.stderr and "at step 4" in result.stderr


def test_a_checkpoint_named_with_resume_that_cannot_be_used_stops_the_run(data, reference, tmp_path):
    out = copy_run(reference, tmp_path / "out", up_to=8)
    tamper(out / "checkpoints" / "step-00000008", set_position(10**6))
    result = run_in_process(*ARGS, "--data-dir", data, "--output-dir", out, "--resume",
                            out / "checkpoints" / "step-00000008")
    assert_one_line_error(result, "step-00000008", "data position")


# ------------------------------------------------------------ the training file changing under the run


def test_a_training_file_changed_during_a_streaming_run_stops_after_committing_the_steps_done(tmp_path):
    data = write_corpus(tmp_path / "data", train=200)
    out = tmp_path / "out"
    args = [*FAST, "--max-steps", "2000", "--checkpoint-interval", "1000", "--eval-steps", "1000",
            "--data-dir", data, "--output-dir", out]
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], cwd=REPO, stdout=err,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and len(train_lines(out)) >= 5):
        time.sleep(0.01)
    with open(data / "train.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "one more line", "auth_weight": 0.5, "prov_entropy": 3.0}) + "\n")
    code = process.wait(timeout=60)
    stderr = log.read_text()
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "changed during the run" in stderr.splitlines()[-1]
    step = train_lines(out)[-1]["step"]
    assert step >= 5
    assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert read_metrics(out)[-1]["event"] == "end"


def test_a_planted_link_in_the_data_folder_is_not_a_write_target(tmp_path):
    """Reading through a link in the data folder is the user's business; writing never goes there."""
    data = write_corpus(tmp_path / "data")
    write_jsonl(tmp_path / "elsewhere" / "val.jsonl", [{"text": "x y", "auth_weight": 0.1, "prov_entropy": 6.0}] * 8)
    (data / "val.jsonl").unlink()
    (data / "val.jsonl").symlink_to(tmp_path / "elsewhere" / "val.jsonl")
    before = (tmp_path / "elsewhere" / "val.jsonl").read_bytes()
    result = run_in_process(*FAST, "--max-steps", "5", "--data-dir", data, "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "val.jsonl").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["val.jsonl"]
