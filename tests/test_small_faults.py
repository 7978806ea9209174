"""The smaller faults: each one line (or a warning and the run goes on), never a traceback,
and found before minutes of loading where it can be. Data is checked before the model
loads, and nothing of an earlier run is moved aside (--fresh) before the data is checked
and the model loaded.

Commands run in the test's process, except Ctrl+C at start-up (a process of its own)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (FAST, REPO, TRAIN_SCRIPT, adapters_equal, assert_one_line_error, immutable, load_adapters,
                      mounted_tmpfs, remount_read_only, run_in_process, run_script_in_process, train_on_a_tiny_copy,
                      write_corpus)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """10 steps on a local copy of the tiny model, checkpoints at 4, 8 and 10: (root, base, run)."""
    root = tmp_path_factory.mktemp("small")
    base, out = train_on_a_tiny_copy(root, 8, 10, "--checkpoint-interval", "4", "--keep-checkpoints", "10")
    return root, base, out


def train_args(root: Path, base: Path, *extra):
    return [*FAST, "--model", base, "--data-dir", root / "data", *extra]


# ------------------------------------------------------------ bad values


@pytest.mark.parametrize("flags, fragment", [(["--seed", "-5"], "--seed must be in [0, 2**32)"),
                                             (["--seed", str(2**64)], "--seed must be in [0, 2**32)"),
                                             (["--temp", "inf"], "--temp must be a finite number")])
def test_generate_refuses_a_bad_seed_or_temperature_in_one_line(tiny_run, flags, fragment):
    root, base, out = tiny_run
    result = run_script_in_process("generate", "--output-dir", out, "--prompt", "the sample", *flags)
    assert_one_line_error(result, fragment, only_line=True)


def test_evaluate_says_at_once_that_json_cannot_go_where_asked(tiny_run):
    root, base, out = tiny_run
    result = run_script_in_process("evaluate", "--output-dir", out, "--json", "/proc/x/y.json")
    assert_one_line_error(result, "--json /proc/x/y.json", "cannot write in /proc", only_line=True)
    assert result.stdout == ""  # before evaluating


def test_evaluate_on_a_read_only_run_prints_its_table_then_one_line(tiny_run, tmp_path):
    root, base, out = tiny_run
    with mounted_tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        shutil.copytree(out, run)
        remount_read_only(disk)
        result = run_script_in_process("evaluate", "--output-dir", run, "--max-batches", "1")
    assert_one_line_error(result, "figures above could not be written", "Read-only file system",
                          "--json PATH writes them elsewhere", only_line=True)
    assert "gap primary - consensus" in result.stdout and "overall" in result.stdout


def catch_sigint() -> None:
    """In the child: Ctrl+C caught as at a terminal, even where the suite itself was started in the
    background (a shell gives background jobs SIGINT ignored, and a run keeps an ignored signal ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_as_the_run_ends_is_one_line_not_a_finalizer_traceback(tmp_path):
    """A Ctrl+C just after the summary, while garbage is collected (tqdm's __del__ took it and Python
    printed "Exception ignored in ... Traceback"): one line, exit 130, every time."""
    data = write_corpus(tmp_path / "data", train=8, val=4)
    for attempt in range(4):
        process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *FAST, "--data-dir", data, "--output-dir",
                                    tmp_path / f"out-{attempt}", "--max-steps", "2"], cwd=REPO, text=True, bufsize=1,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=catch_sigint)
        said = ""
        for line in process.stderr:
            said += line
            if "at the peak" in line:  # the summary's last line
                process.send_signal(signal.SIGINT)
                break
        said += process.stderr.read()
        assert process.wait(timeout=120) in (0, 130), said
        assert "Traceback" not in said and "Exception ignored" not in said, said


def test_ctrl_c_in_the_first_moments_is_no_traceback(tmp_path):
    """From the script's first import on: one line, exit 130. Before it, Python's own start-up (site,
    and the `from __future__` line it runs first: tens of ms) may still say KeyboardInterrupt."""
    data = write_corpus(tmp_path / "data", train=16, val=4)
    said = set()
    for delay in (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8):
        process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *FAST, "--data-dir", data, "--output-dir",
                                    tmp_path / "out", "--max-steps", "2"], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, preexec_fn=catch_sigint)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        frames = re.findall(r'File "([^"]+)", line \d+, in \S+\n(?:    (.*)\n)?', stderr)
        assert all(file.startswith("<frozen") or file.endswith("__future__.py")
                   or file == str(TRAIN_SCRIPT) and line == "from __future__ import annotations"
                   for file, line in frames), (delay, stderr)
        if process.returncode == 130:
            said.add(stderr.strip().splitlines()[-1])
        else:  # interrupted in Python's own start-up, or finished first (0)
            assert process.returncode in (-signal.SIGINT, 1, 0), (delay, stderr)
    assert said and said <= {"interrupted while starting; nothing was written",
                             "interrupted; committed checkpoints are intact",
                             "interrupted outside the training loop; committed checkpoints are intact"}, said


def test_a_checkpoint_removed_by_retention_after_it_was_chosen_still_loads(tiny_run, tmp_path):
    """export and generate choose a checkpoint, then load it: a run still training may remove it in between."""
    import mlx.core as mx
    from mlx_lm import load

    from base_model.trained_run import load_trained_model, open_run

    root, base, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    trained = open_run(run, "latest", "generate from")
    expected_model, _ = load(trained.base.path, adapter_path=str(trained.checkpoint))
    tokens = mx.array([[5, 100, 200, 300, 17]])
    shutil.rmtree(trained.checkpoint)  # as retention does
    model, _, _ = load_trained_model(trained)
    assert mx.array_equal(model(tokens), expected_model(tokens)).item()


def test_evaluate_json_never_replaces_what_the_run_reads(tiny_run):
    root, base, out = tiny_run
    state = out / "checkpoints" / "step-00000010" / "trainer_state.json"
    for path, fragment in [(state, "inside the run's checkpoints"), (root / "data" / "train.jsonl", "training data"),
                           (out / "metrics.jsonl", "a file of the run")]:
        before = path.read_bytes()
        result = run_script_in_process("evaluate", "--output-dir", out, "--json", path)
        assert_one_line_error(result, f"--json {path}", fragment, only_line=True)
        assert path.read_bytes() == before


def test_generate_into_a_pipe_closed_by_its_reader_stops_quietly(tiny_run):
    root, base, out = tiny_run
    process = subprocess.Popen([sys.executable, str(REPO / "src" / "generate.py"), "--output-dir", out, "--prompt",
                                "the sample", "--max-tokens", "200"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.read(1)  # `generate.py ... | head -c 1`
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) in (141, 0), stderr  # 0: it had written everything already
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_ctrl_c_a_library_turned_into_another_exception_is_still_exit_130(capsys):
    from run_safety.command import run_command

    def work():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # as numpy's import does: RuntimeError: Error calling __set_name__
            raise RuntimeError("Error calling __set_name__ on 'cached_property'") from exc

    assert run_command(work) == 130
    assert capsys.readouterr().err.strip() == "interrupted; committed checkpoints are intact"


def test_export_to_a_full_disk_or_a_name_too_long_is_one_line(tiny_run, tmp_path):
    root, base, out = tiny_run
    with mounted_tmpfs(tmp_path / "disk", "300k") as disk:
        result = run_script_in_process("export", "--output-dir", out, "--save-path", disk / "model")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"error: could not write the fused model to {disk / 'model'}")
        assert "MB free there" in result.stderr and os.listdir(disk) == []
    result = run_script_in_process("export", "--output-dir", out, "--save-path", tmp_path / ("m" * 250))
    assert_one_line_error(result, "250 bytes", "limit of 255", only_line=True)


# ------------------------------------------------------------- long paths


def test_an_output_path_over_the_limits_is_refused_at_start(tiny_run, tmp_path):
    root, base, out = tiny_run
    deep = tmp_path
    while len(os.fsencode(deep)) < 3990:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    result = run_in_process(*train_args(root, base, "--output-dir", deep / "run", "--max-steps", "2"))
    assert_one_line_error(result, "its path is", "over the system's limit of 4095", "use a shorter path")
    assert list(deep.iterdir()) == [] and "model:" not in result.stderr

    long_name = tmp_path / ("n" * 300)
    result = run_in_process(*train_args(root, base, "--output-dir", long_name, "--max-steps", "2"))
    assert_one_line_error(result, "300 bytes", "limit of 255")


def test_a_run_whose_checkpoints_all_fail_names_no_adapters(tiny_run, tmp_path):
    root, base, out = tiny_run
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with immutable(run / "checkpoints"):
        result = run_in_process(*train_args(root, base, "--output-dir", run, "--max-steps", "3",
                                            "--checkpoint-interval", "100"))
    assert result.returncode == 1, result.stderr
    assert "no checkpoint was saved" in result.stderr and "newest saved one is step 0" not in result.stderr
    assert "adapters  none written" in result.stderr and not (run / "adapters.safetensors").exists()


# ---------------------------------------------------- the data, checked first


@pytest.mark.parametrize("case, fragments", [
    ("empty", ["train.jsonl", "no records (the file is empty)"]),
    ("blank", ["train.jsonl", "no records (its 4 lines are blank)"]),
    ("bad val line", ["val.jsonl:3", "invalid JSON"]),
    # a writer killed mid-line, beyond the first records the pre-check parses
    ("cut last line", ["train.jsonl:300", "invalid JSON", "cut short"]),
])
def test_bad_data_is_found_before_the_model_loads_and_fresh_moves_nothing(tiny_run, tmp_path, case, fragments):
    root, base, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = sorted(p.name for p in run.iterdir())
    data = write_corpus(tmp_path / "data", train=300 if case == "cut last line" else 16, val=4)
    if case == "empty":
        (data / "train.jsonl").write_text("")
    elif case == "blank":
        (data / "train.jsonl").write_text("\n   \n\t\n\n")
    elif case == "cut last line":
        content = (data / "train.jsonl").read_bytes()
        (data / "train.jsonl").write_bytes(content[:-30])
    else:
        with open(data / "val.jsonl", "r+") as handle:
            lines = handle.readlines()
            lines[2] = '{"text": "cut\n'
            handle.seek(0)
            handle.writelines(lines)
    result = run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", run, "--fresh",
                            "--max-steps", "2")
    assert_one_line_error(result, *fragments)
    assert "model:" not in result.stderr  # the model was never loaded
    assert sorted(p.name for p in run.iterdir()) == before  # nothing moved aside


def test_fresh_moves_nothing_aside_when_the_model_does_not_load(tiny_run, tmp_path):
    root, base, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    broken = tmp_path / "broken-base"
    shutil.copytree(base, broken)
    (broken / "model.safetensors").write_bytes(b"not a model")
    before = sorted(p.name for p in run.iterdir())
    result = run_in_process(*FAST, "--model", broken, "--data-dir", root / "data", "--output-dir", run, "--fresh",
                            "--max-steps", "2")
    assert_one_line_error(result, "cannot load model")
    assert sorted(p.name for p in run.iterdir()) == before

    result = run_in_process(*train_args(root, base, "--output-dir", run, "--fresh", "--max-steps", "2"))
    assert result.returncode == 0, result.stderr
    assert "--fresh: the earlier run moved aside" in result.stderr
    assert result.stderr.index("model:") < result.stderr.index("--fresh: the earlier run moved aside")


# ------------------------------------------------ another run's checkpoint


def test_a_checkpoint_copied_in_from_another_run_is_skipped_and_set_aside(tiny_run, tmp_path):
    root, base, out = tiny_run
    other = tmp_path / "other"
    result = run_in_process(*train_args(root, base, "--output-dir", other, "--max-steps", "12", "--seed", "7",
                                        "--checkpoint-interval", "12"))
    assert result.returncode == 0, result.stderr
    run, plain = tmp_path / "run", tmp_path / "plain"
    shutil.copytree(out, run)
    shutil.copytree(out, plain)
    shutil.copytree(other / "checkpoints" / "step-00000012", run / "checkpoints" / "step-00000012")

    result = run_in_process(*train_args(root, base, "--output-dir", run, "--auto-resume", "--max-steps", "14"))
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint step-00000012: not this run's" in result.stderr and "seed" in result.stderr
    assert "at step 10" in result.stderr
    foreign = [p for p in run.iterdir() if p.name.startswith("checkpoints.foreign-")]
    assert len(foreign) == 1 and (foreign[0] / "step-00000012").is_dir()

    # The same as the run never meddled with.
    result = run_in_process(*train_args(root, base, "--output-dir", plain, "--auto-resume", "--max-steps", "14"))
    assert result.returncode == 0, result.stderr
    assert adapters_equal(load_adapters(run), load_adapters(plain))

    # With settings of its own none of the checkpoints fit: the differences, exit 2, nothing moved.
    before = sorted(p.name for p in (plain / "checkpoints").iterdir())
    result = run_in_process(*train_args(root, base, "--output-dir", plain, "--auto-resume", "--max-steps", "16",
                                        "--seed", "3"))
    assert_one_line_error(result, "the config differs", "seed")
    assert sorted(p.name for p in (plain / "checkpoints").iterdir()) == before


def test_json_of_an_unchanged_run_is_still_valid(tiny_run):
    """The evaluation JSON is written after the table, whole."""
    root, base, out = tiny_run
    result = run_script_in_process("evaluate", "--output-dir", out, "--max-batches", "1")
    assert result.returncode == 0, result.stderr
    written = Path(result.stderr.strip().splitlines()[-1].removeprefix("figures written to "))
    figures = json.loads(written.read_text())
    assert figures["step"] == 10 and "json" not in figures and "json_asked" not in figures
