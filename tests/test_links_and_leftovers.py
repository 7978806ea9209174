"""Nothing is written through a link planted in a run folder, symbolic or hard; export
never replaces what the run reads; leftovers of killed processes go at the next start,
and one that cannot be removed (chattr +i) is a warning naming it, never a traceback
and never mistaken for an interrupted save.

Runs and commands run in the test's process, except the build killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (FAST, REPO, assert_one_line_error, dead_pid, immutable, run_in_process, run_script_in_process,
                      train_on_a_tiny_copy)

VICTIM_TEXT = "a file outside the run folder\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """10 steps on a local copy of the tiny model: (root, base, run folder)."""
    root = tmp_path_factory.mktemp("links")
    base, out = train_on_a_tiny_copy(root, 8, 10, "--checkpoint-interval", "4", "--keep-checkpoints", "10")
    return root, base, out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------ planted links


def test_evaluate_writes_nothing_through_a_link_planted_in_the_run(tiny_run, tmp_path):
    root, base, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run, symlinks=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (run / "evaluations").symlink_to(victim)
    result = run_script_in_process("evaluate", "--output-dir", run)
    assert_one_line_error(result, str(run / "evaluations"), "symbolic link", "--json PATH", only_line=True)
    assert list(victim.iterdir()) == [] and result.stdout == ""  # refused before evaluating

    # A link at the figures' own name is replaced by the file, never written through.
    (run / "evaluations").unlink()
    (run / "evaluations").mkdir()
    figures = run / "evaluations" / "step-00000010-val.json"
    (victim / "figures.json").write_text(VICTIM_TEXT)
    figures.symlink_to(victim / "figures.json")
    result = run_script_in_process("evaluate", "--output-dir", run, "--max-batches", "1")
    assert result.returncode == 0, result.stderr
    assert (victim / "figures.json").read_text() == VICTIM_TEXT
    assert not figures.is_symlink() and json.loads(figures.read_text())["step"] == 10


@pytest.mark.parametrize("name", [".run.lock", "metrics.jsonl"])
def test_a_hard_link_where_the_run_writes_in_place_is_refused_and_its_other_name_untouched(tiny_run, tmp_path, name):
    root, base, out = tiny_run
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT if name == ".run.lock" else "")  # an empty metrics.jsonl would be appended to
    run = tmp_path / "run"
    run.mkdir()
    os.link(victim, run / name)
    result = run_in_process(*FAST, "--model", base, "--data-dir", root / "data", "--output-dir", run,
                            "--max-steps", "2")
    assert_one_line_error(result, str(run / name), "hard link", "rm ")
    assert victim.read_text() == (VICTIM_TEXT if name == ".run.lock" else "")


def test_a_link_planted_where_w_and_b_writes_its_files_is_refused(tiny_run, tmp_path):
    root, base, out = tiny_run
    victim = tmp_path / "victim"
    victim.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb").symlink_to(victim)
    result = run_in_process(*FAST, "--model", base, "--data-dir", root / "data", "--output-dir", run,
                            "--max-steps", "2")
    assert_one_line_error(result, str(run / "wandb"), "symbolic link")
    assert list(victim.iterdir()) == []


def test_export_refuses_a_save_path_the_run_reads_even_with_force(tiny_run):
    root, base, out = tiny_run
    quantized = Path(json.loads((out / "adapter_config.json").read_text())["model"])
    assert quantized != base and quantized.is_dir()  # the base as trained: its 4-bit copy in the cache
    before = {path: snapshot(path) for path in (base, quantized, root / "data")}
    for save_path, what in [(base, "the base as given to --model"), (quantized, "the base the run trained on"),
                            (root / "data", "the data folder"), (root, "a folder holding"),
                            (quantized.parent, "a folder holding the base the run trained on")]:
        result = run_script_in_process("export", "--output-dir", out, "--save-path", save_path, "--force")
        assert_one_line_error(result, f"--save-path {save_path} would replace", what, only_line=True)
    assert {path: snapshot(path) for path in before} == before


# ---------------------------------------------------------------- leftovers

KILLED_BUILD = """
import sys, time
sys.path.insert(0, "src")
from pathlib import Path
from base_model import builds

def build(scratch):
    (scratch / "model.safetensors").write_bytes(bytes(1 << 20))
    print("building", flush=True)
    time.sleep(300)

builds.build_model_dir_once(Path(sys.argv[1]), build, "a model killed while built")
"""


def test_the_scratch_folder_of_a_build_killed_with_sigkill_is_removed_at_the_next_start(tmp_path, capfd):
    from base_model import builds

    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(cache / "killed")], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "building"
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = [p for p in cache.iterdir() if p.name.startswith(".killed-build-")]
    assert len(left) == 1 and left[0].name.endswith(f"-{process.pid}")  # named by its writer's pid

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a build of a process still running is its own business
        busy = cache / f".other-build-0123abcd-{alive.pid}"
        busy.mkdir()
        target = builds.build_model_dir_once(cache / "next", lambda scratch: (scratch / "config.json").write_text(
            "{}"), "the next model")
    finally:
        alive.kill()
        alive.wait()
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([busy.name, "next"])  # the killed one's scratch is gone
    assert f"removed the scratch folder of a build that was killed: {left[0]}" in capfd.readouterr().err


def test_a_leftover_that_cannot_be_removed_is_a_warning_naming_it(tiny_run, tmp_path):
    root, base, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    pid = dead_pid()
    deleting = run / "checkpoints" / f".tmp-deleting-step-00000004-{pid}"
    deleting.mkdir()
    (deleting / "adapters.safetensors").write_bytes(b"half deleted")
    temporary = run / f".tmp-adapters.safetensors-0123abcd-{pid}"
    temporary.write_bytes(b"half written")
    index = run / "cache" / f".tmp-index-0123456789abcdef.safetensors-0123abcd-{pid}"  # 30 bytes a record
    index.write_bytes(b"half an index")
    with immutable(deleting / "adapters.safetensors", temporary, within=run):
        result = run_in_process(*FAST, "--model", base, "--data-dir", root / "data", "--output-dir", run,
                                "--auto-resume", "--max-steps", "12")
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: could not remove")]
        assert len(warnings) == 2, result.stderr
        assert any(str(deleting) in line for line in warnings) and any(str(temporary) in line for line in warnings)
        assert all("Operation not permitted" in line and "remove it by hand" in line for line in warnings)
        assert not index.exists()  # the one that could be removed was
    # Once it can be, the next start removes it.
    result = run_in_process(*FAST, "--model", base, "--data-dir", root / "data", "--output-dir", run,
                            "--auto-resume", "--max-steps", "12")
    assert result.returncode == 0 and not deleting.exists() and not temporary.exists(), result.stderr


def test_a_checkpoint_whose_removal_failed_is_never_put_back_as_an_interrupted_save(tmp_path):
    from checkpoints import CheckpointManager
    from test_checkpoints import make_state

    warnings: list[str] = []
    manager = CheckpointManager(tmp_path / "checkpoints", keep=1, warn=warnings.append)
    manager.save(make_state(1))
    manager.save(make_state(2))
    old = manager.directory / "step-00000002" / "optimizer.safetensors"
    with immutable(old, within=manager.directory):
        manager.save(make_state(2))  # a resumed run saving step 2 again: the old one cannot be removed
        manager.save(make_state(3))
        manager.save(make_state(4))  # retention removes the new step 2 (and 3)
        assert sorted(p.name for p in manager.directory.iterdir() if not p.name.startswith(".")) == ["step-00000004"]
        warnings.clear()
        CheckpointManager(manager.directory, keep=1, warn=warnings.append).clean_temporaries()
        assert not (manager.directory / "step-00000002").exists()  # not "restored"
        assert not any("restored" in line for line in warnings)
        assert len(warnings) == 1 and "could not remove" in warnings[0] and ".tmp-replaced-step-00000002" in warnings[0]
    removed = CheckpointManager(manager.directory, keep=1, warn=warnings.append).clean_temporaries()
    assert [p.name for p in removed] == [f".tmp-replaced-step-00000002-{os.getpid()}"]
    assert sorted(p.name for p in manager.directory.iterdir()) == ["step-00000004"]


def test_retention_that_cannot_remove_a_checkpoint_warns_and_goes_on(tmp_path):
    from checkpoints import CheckpointManager
    from test_checkpoints import make_state

    warnings: list[str] = []
    manager = CheckpointManager(tmp_path / "checkpoints", keep=1, warn=warnings.append)
    for step in (1, 2):
        manager.save(make_state(step))
    stuck = manager.directory / "step-00000002" / "adapters.safetensors"
    with immutable(stuck, within=manager.directory):
        manager.save(make_state(3))
        manager.save(make_state(4))
    assert sorted(p.name for p in manager.directory.iterdir() if not p.name.startswith(".")) == ["step-00000004"]
    assert any("could not remove" in line and "step-00000002" in line for line in warnings), warnings
    assert (manager.directory / f".tmp-deleting-step-00000002-{os.getpid()}").is_dir()  # out of sight, named
