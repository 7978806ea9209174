"""Overnight faults, round 3: a terminal that stalls, streams closed by the launcher, FIFOs and
dangling links in the data folder, full disks outside training (export, prepare_data), a base
changed since training (export, generate, evaluate), a base whose JSON was only re-indented.

What needs a process of its own runs in one: the stalled pipe and its SIGHUP, the closed
descriptors, the kill of prepare_data. A FIFO that would hang a command has a timeout around
it. A full disk is a real tmpfs (root only: skipped with the reason elsewhere)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (FAST, REPO, TRAIN_SCRIPT, assert_one_line_error, default_stop_signals,
                      mounted_tmpfs, read_metrics, run_in_process, run_script_in_process, train_lines,
                      train_on_a_tiny_copy, write_corpus, write_jsonl)

ARGS = [*FAST, "--checkpoint-interval", "1000", "--eval-steps", "1000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), train=24, val=8)


def assert_no_traceback(result):
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


# ------------------------------------------------------------ a stalled output, then a signal


def _blocked_writing_to_a_pipe(pid: int) -> bool:
    try:
        return "pipe_write" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux's /proc/PID/wchan to see the "
                                                                    "run blocked in its write")
@pytest.mark.parametrize("sig", [signal.SIGHUP])  # SIGTERM and SIGINT: the same handler
def test_a_signal_while_stderr_is_stalled_commits_the_step_and_exits_by_the_signal(data, tmp_path, sig):
    """`train ... 2>&1 | tee log` in an ssh session that stalls: the pipe fills and the run blocks
    writing to stderr (buffered, as users run it: no PYTHONUNBUFFERED); the session drops: the
    signal, then tee is gone (the pipe's reader closed)."""
    out = tmp_path / "out"
    reader, writer = os.pipe()
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)  # a page
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *ARGS, "--eval-steps", "1", "--max-steps", "400",
                                "--data-dir", str(data), "--output-dir", str(out)],
                               cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer,
                               preexec_fn=default_stop_signals)
    os.close(writer)
    os.set_blocking(reader, False)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the terminal keeps up for a few steps
            try:
                os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.01)
            if (out / "metrics.jsonl").exists() and len(train_lines(out)) >= 3:
                break
        # The terminal stalls: nothing is read any more (the pipe filled up to its last byte here, through
        # a second, non-blocking write end), and the run blocks in its next write to stderr.
        filler = os.open(f"/proc/self/fd/{reader}", os.O_WRONLY | os.O_NONBLOCK)
        for chunk in (4096, 256, 16, 1):
            try:
                while True:
                    os.write(filler, b"." * chunk)
            except BlockingIOError:
                pass
        os.close(filler)
        while time.monotonic() < deadline and not _blocked_writing_to_a_pipe(process.pid):
            time.sleep(0.01)
        assert _blocked_writing_to_a_pipe(process.pid), "the run never blocked writing to its stalled stderr"
        step = train_lines(out)[-1]["step"]  # done; its validation line is what is blocked
        process.send_signal(sig)
        time.sleep(0.5)
    finally:
        os.close(reader)  # the session is gone, and tee with it
    code = process.wait(timeout=90)
    assert code == {signal.SIGHUP: 129, signal.SIGTERM: 143}[sig]
    end = read_metrics(out)[-1]
    assert end["event"] == "end" and sig.name in end["reason"], end
    assert (out / "checkpoints" / "final").read_text().strip() == f"step-{step:08d}"


# ------------------------------------------------------------ standard streams closed by the launcher


@pytest.mark.parametrize("closed", [1, 2])
def test_a_run_with_a_standard_stream_closed_trains_to_the_end(data, tmp_path, closed):
    """`train ... >&-`, `2>&-`, `<&-`: a closed stream is a place where nothing is shown, not a fault;
    and no file the run writes may take the closed descriptor's number (C libraries write to 2)."""
    out = tmp_path / "out"
    log = tmp_path / "log"
    with open(log, "w") as handle:
        streams = {"stdin": subprocess.DEVNULL, "stdout": handle, "stderr": handle}
        done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *ARGS, "--max-steps", "4", "--data-dir", str(data),
                               "--output-dir", str(out)], cwd=REPO, timeout=120, **streams,
                              preexec_fn=lambda: os.close(closed))
    text = log.read_text()
    assert done.returncode == 0, text
    assert "Traceback" not in text and "Exception ignored" not in text, text
    assert (out / "checkpoints" / "final").read_text().strip() == "step-00000004"
    assert all(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


# ------------------------------------------------------------ FIFOs and dangling links among the files read


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """8 steps on a local copy of the tiny model, used as it is (--quantize-bits 0): the base a run
    exports, generates and evaluates with is that very folder."""
    root = tmp_path_factory.mktemp("round3")
    base, out = train_on_a_tiny_copy(root, 8, 8, "--quantize-bits", "0")
    return root, base, out


def data_copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


@pytest.mark.parametrize("name", ["probes.jsonl", "val.jsonl"])
def test_a_fifo_in_the_data_folder_is_refused_before_the_run_starts(data, tmp_path, name):
    folder = data_copy(data, tmp_path / "data")
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    result = run_in_process(*ARGS, "--max-steps", "2", "--data-dir", folder, "--output-dir", tmp_path / "out",
                            timeout=30)
    assert_one_line_error(result, str(folder / name), "not a regular file")
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["probes.jsonl", "general.jsonl", "test.jsonl"])
def test_a_fifo_evaluate_would_read_is_refused(tiny_run, tmp_path, name):
    root, _, out = tiny_run
    folder = data_copy(root / "data", tmp_path / "data")
    os.mkfifo(folder / name)
    result = run_script_in_process("evaluate", "--output-dir", out, "--data-dir", folder, "--json",
                                   tmp_path / "figures.json", timeout=30)
    assert_one_line_error(result, str(folder / name), "not a regular file")
    assert not (tmp_path / "figures.json").exists()


def test_generate_does_not_hang_on_a_training_file_that_became_a_fifo(tiny_run, tmp_path):
    root, _, out = tiny_run
    train = root / "data" / "train.jsonl"
    kept = tmp_path / "train.jsonl"
    shutil.move(train, kept)
    os.mkfifo(train)
    try:
        result = run_script_in_process("generate", "--output-dir", out, "--prompt", "the field log",
                                       "--max-tokens", "3", timeout=30)
    finally:
        train.unlink()
        shutil.move(kept, train)
    assert result.returncode == 0, result.stderr
    # The training data cannot be looked at: the model's own template is used, no word of plain text.
    assert "chat template (the model has one" in result.stderr and "plain text records" not in result.stderr


@pytest.mark.parametrize("name", ["val.jsonl", "probes.jsonl", "train.jsonl"])
def test_a_dangling_link_in_the_data_folder_names_the_link_and_its_target(data, tmp_path, name):
    """val.jsonl on a disk that is not mounted: not "no val.jsonl", and not a night without validation."""
    folder = data_copy(data, tmp_path / "data")
    target = tmp_path / "unmounted" / name
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(target)
    result = run_in_process(*ARGS, "--max-steps", "2", "--data-dir", folder, "--output-dir", tmp_path / "out",
                            timeout=60)
    assert_one_line_error(result, str(folder / name), str(target), "does not exist")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_evaluate_refuses_a_dangling_test_file_instead_of_taking_another(tiny_run, tmp_path):
    root, _, out = tiny_run
    folder = data_copy(root / "data", tmp_path / "data")
    (folder / "test.jsonl").symlink_to(tmp_path / "gone.jsonl")
    result = run_script_in_process("evaluate", "--output-dir", out, "--data-dir", folder, "--json",
                                   tmp_path / "figures.json", timeout=60)
    assert_one_line_error(result, str(folder / "test.jsonl"), str(tmp_path / "gone.jsonl"))


# ------------------------------------------------------------ a base changed since training


def flip_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01
    path.write_bytes(bytes(blob))


def test_export_generate_and_evaluate_refuse_a_base_changed_since_training(tiny_run, tmp_path):
    root, base, out = tiny_run
    changed = tmp_path / "base-as-trained"
    shutil.copytree(base, changed)  # kept, to put back
    flip_last_byte(base / "model.safetensors")
    try:
        commands = {
            "export": ["--save-path", tmp_path / "fused"],
            "generate": ["--prompt", "the field log", "--max-tokens", "3"],
            "evaluate": ["--json", tmp_path / "figures.json", "--max-batches", "1"],
        }
        for name, args in commands.items():
            result = run_script_in_process(name, "--output-dir", out, *args)
            assert_one_line_error(result, str(base), "changed since", "model.safetensors", "--allow-changed-base")
        assert not (tmp_path / "fused").exists() and not (tmp_path / "figures.json").exists()
        # Knowingly: the flag goes on, and says what it goes on with.
        result = run_script_in_process("export", "--output-dir", out, "--save-path", tmp_path / "fused",
                                       "--allow-changed-base")
        assert result.returncode == 0, result.stderr
        assert "note:" in result.stderr and "model.safetensors" in result.stderr
    finally:
        shutil.rmtree(base)
        shutil.copytree(changed, base)
    result = run_script_in_process("export", "--output-dir", out, "--save-path", tmp_path / "again")
    assert result.returncode == 0, result.stderr


def test_a_base_whose_config_json_was_only_reindented_resumes_and_exports(tiny_run, tmp_path):
    root, base, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    config = base / "config.json"
    original = config.read_bytes()
    try:
        config.write_text(json.dumps(json.loads(original), indent=7) + "\n")
        result = run_in_process(*FAST, "--model", base, "--quantize-bits", "0", "--data-dir", root / "data",
                                "--output-dir", run, "--max-steps", "10", "--auto-resume")
        assert result.returncode == 0, result.stderr
        assert "resumed from" in result.stderr
        result = run_script_in_process("export", "--output-dir", run, "--save-path", tmp_path / "fused")
        assert result.returncode == 0, result.stderr
        # A value that differs is still a difference.
        changed = json.loads(original)
        changed["rms_norm_eps"] = changed.get("rms_norm_eps", 1e-5) * 2
        config.write_text(json.dumps(changed))
        result = run_in_process(*FAST, "--model", base, "--quantize-bits", "0", "--data-dir", root / "data",
                                "--output-dir", run, "--max-steps", "12", "--auto-resume")
        assert_one_line_error(result, "base model content differs", "config.json")
    finally:
        config.write_bytes(original)


# ------------------------------------------------------------ full disks outside training


@pytest.fixture(scope="module")
def export_pages(tiny_run, tmp_path_factory) -> dict:
    """{file name: 4 KiB pages} of the tiny run's export with --gguf: what a disk must hold."""
    _, _, out = tiny_run
    save = tmp_path_factory.mktemp("measured") / "fused"
    result = run_script_in_process("export", "--output-dir", out, "--save-path", save, "--gguf")
    assert result.returncode == 0, result.stderr
    return {path.name: -(-path.stat().st_size // 4096) for path in save.iterdir()}


@pytest.mark.parametrize("failing", ["tokenizer", "gguf"])
def test_a_disk_filling_during_export_is_one_line_exit_1_and_nothing_left(tiny_run, export_pages, tmp_path, failing):
    """The tokenizer's save (the Rust tokenizers library: "No space left on device (os error 28)") and
    the GGUF's tensor data (numpy: "4096 requested and 1616 written", no errno) fail on a full disk."""
    _, _, out = tiny_run
    if failing == "tokenizer":  # the weights and config.json fit, tokenizer.json does not
        pages = sum(n for name, n in export_pages.items() if name.startswith(("model", "config"))) + 2
        assert export_pages["tokenizer.json"] > 2
    else:  # all but the GGUF fits, and half of it: its header, not its tensor data
        gguf = sum(n for name, n in export_pages.items() if name.endswith(".gguf"))
        pages = sum(n for name, n in export_pages.items() if not name.endswith(".gguf")) + gguf // 2
    with mounted_tmpfs(tmp_path / "disk", f"{pages * 4}k") as disk:
        result = run_script_in_process("export", "--output-dir", out, "--save-path", disk / "fused", "--gguf")
        assert result.returncode == 1, result.stderr
        assert_no_traceback(result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: could not write the fused model"), result.stderr
        assert ("os error 28" if failing == "tokenizer" else "short write") in lines[0], lines[0]
        assert "MB free" in lines[0] and "nothing was left" in lines[0], lines[0]
        assert os.listdir(disk) == []


def records(count: int) -> list[dict]:
    return [{"text": f"record {i}: the pump house was roofed with slate, says the field log of 1921, page {i}",
             "source_type": "primary"} for i in range(count)]


def test_prepare_data_onto_a_disk_that_fills_is_one_line_exit_1_and_nothing_left(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", records(2000))
    with mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        result = run_script_in_process("prepare_data", "--input", raw, "--output", disk / "data")
        assert result.returncode == 1, result.stderr
        assert_no_traceback(result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
        assert os.listdir(disk) == []


def test_a_killed_prepare_data_leaves_a_staging_copy_that_the_next_run_removes(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", records(20000))
    output = tmp_path / "data"
    output.mkdir()
    process = subprocess.Popen([sys.executable, str(REPO / "src" / "prepare_data.py"), "--input", str(raw),
                                "--output", str(output)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(name.startswith(".staging") for name in os.listdir(output)):
        time.sleep(0.005)
    process.kill()
    process.wait()
    left = [name for name in os.listdir(output) if name.startswith(".staging")]
    assert left, "prepare_data finished before it could be killed"
    # A live writer's staging copy is left alone: it may be writing it right now.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = output / f"{left[0].rsplit('-', 1)[0]}-{alive.pid}"
        live.write_text("")
        result = run_script_in_process("prepare_data", "--input", write_jsonl(tmp_path / "small.jsonl", records(20)),
                                       "--output", output)
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(output)) == sorted(["train.jsonl", "val.jsonl", live.name])
    finally:
        alive.kill()
        alive.wait()


def test_a_disk_filling_while_a_gguf_import_writes_its_tokenizer_is_one_line(data, tmp_path, monkeypatch):
    """The model cache fills while a GGUF base's mlx-lm folder is built: its tokenizer's save raises a
    bare Exception (the Rust tokenizers library), not an OSError."""
    from test_gguf_import import family_gguf

    _, _, gguf, _ = family_gguf(tmp_path, "llama")
    args = [*ARGS, "--model", gguf, "--max-steps", "1", "--data-dir", data]
    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "measured"))
    result = run_in_process(*args, "--output-dir", tmp_path / "first")
    assert result.returncode == 0, result.stderr
    pages = {path.name: -(-path.stat().st_size // 4096) for path in (tmp_path / "measured").rglob("*")
             if path.is_file()}
    # The import writes the tokenizer first: room for its small files and half of tokenizer.json. The
    # sums of the files read go elsewhere (a link there is never written through), whatever their timing.
    room = pages["tokenizer_config.json"] + pages.get("chat_template.jinja", 0) + pages["tokenizer.json"] // 2
    with mounted_tmpfs(tmp_path / "cache", f"{room * 4}k") as cache:
        (cache / "file-hashes").symlink_to(tmp_path / "measured" / "file-hashes")
        monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(cache))
        result = run_in_process(*args, "--output-dir", tmp_path / "second")
        assert result.returncode == 1, result.stderr
        assert_no_traceback(result)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "cannot build" in errors[0] and "os error 28" in errors[0], result.stderr
        assert not [path for path in cache.rglob("*") if ".build-" in path.name or "tmp" in path.name]


def test_ctrl_c_during_prepare_data_is_one_line_and_the_output_folder_as_it_was(tmp_path):
    output = tmp_path / "data"
    result = run_script_in_process("prepare_data", "--input", write_jsonl(tmp_path / "small.jsonl", records(20)),
                                   "--output", output)
    assert result.returncode == 0, result.stderr
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    raw = write_jsonl(tmp_path / "raw.jsonl", records(20000))
    process = subprocess.Popen([sys.executable, str(REPO / "src" / "prepare_data.py"), "--input", str(raw),
                                "--output", str(output), "--force"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_stop_signals)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(name.startswith(".staging") for name in os.listdir(output)):
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted; nothing was written, the output folder is as it was"]
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before


# ------------------------------------------------------------ found trying further faults of these kinds


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_base_file_that_is_a_dangling_link_names_the_link_and_its_target(data, tmp_path, name):
    """A base in the Hugging Face cache layout (its files links into blobs/) whose blob is gone."""
    from base_model import tiny

    base = tmp_path / "base"
    shutil.copytree(tiny.ensure_tiny_model(), base)
    (base / name).unlink()
    (base / name).symlink_to(tmp_path / "blobs" / "gone")
    result = run_in_process(*ARGS, "--model", base, "--max-steps", "1", "--data-dir", data,
                            "--output-dir", tmp_path / "out")
    assert_one_line_error(result, str(base / name), str(tmp_path / "blobs" / "gone"), "does not exist")


def test_export_builds_again_a_quantized_copy_edited_in_the_cache_instead_of_fusing_into_it(data, tmp_path,
                                                                                            monkeypatch):
    """The run trained on the base's 4-bit copy in the model cache; that copy was edited since (a disk
    error, a tool): the export is the trained model all the same, as a training start would build it."""
    from base_model import tiny

    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    shutil.copytree(tiny.ensure_tiny_model(), base)
    out = tmp_path / "run"
    result = run_in_process(*ARGS, "--model", base, "--max-steps", "3", "--data-dir", data, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    result = run_script_in_process("export", "--output-dir", out, "--save-path", tmp_path / "before")
    assert result.returncode == 0, result.stderr
    copy = Path(json.loads((out / "adapter_config.json").read_text())["model"])
    assert copy.is_relative_to(tmp_path / "cache")
    flip_last_byte(copy / "model.safetensors")
    result = run_script_in_process("export", "--output-dir", out, "--save-path", tmp_path / "after")
    assert result.returncode == 0, result.stderr
    assert "building it again" in result.stderr
    assert (tmp_path / "after" / "model.safetensors").read_bytes() == \
        (tmp_path / "before" / "model.safetensors").read_bytes()


def test_a_data_or_model_folder_that_is_a_dangling_link_is_named_with_its_target(tiny_run, tmp_path, monkeypatch):
    """The data folder, or a folder of models, on a disk that is not mounted: each command says which
    link points where, not only "not found" (and ORG/NAME under such a link is no HF id to download)."""
    root, _, out = tiny_run
    gone = tmp_path / "unmounted"
    (tmp_path / "data").symlink_to(gone / "data")
    (tmp_path / "models").symlink_to(gone / "models")
    said = f"is a link to {gone}"
    train = run_in_process(*ARGS, "--max-steps", "1", "--data-dir", tmp_path / "data", "--output-dir",
                           tmp_path / "out")
    assert_one_line_error(train, str(tmp_path / "data"), said)
    model = run_script_in_process("train_qlora", *ARGS, "--model", "models/qwen", "--max-steps", "1", "--data-dir",
                                  root / "data", "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(model, "models/qwen: model not found", said)
    evaluate = run_script_in_process("evaluate", "--output-dir", out, "--data-dir", tmp_path / "data")
    assert_one_line_error(evaluate, str(tmp_path / "data"), said)
    prepare = run_script_in_process("prepare_data", "--input", tmp_path / "data" / "raw.jsonl",
                                    "--output", tmp_path / "prepared")
    assert_one_line_error(prepare, str(tmp_path / "data"), said)
    (tmp_path / "cache").symlink_to(gone / "cache")  # the model cache, the same
    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))
    cache = run_in_process(*ARGS, "--max-steps", "1", "--data-dir", root / "data", "--output-dir", tmp_path / "out")
    assert_one_line_error(cache, str(tmp_path / "cache"), said)


def test_generate_into_a_file_on_a_full_disk_says_the_text_could_not_be_written(tiny_run, tmp_path):
    _, _, out = tiny_run
    with mounted_tmpfs(tmp_path / "disk", "4k") as disk:
        (disk / "ballast").write_bytes(b"\0" * 4096)
        with open(disk / "text", "w") as text:
            done = subprocess.run([sys.executable, str(REPO / "src" / "generate.py"), "--output-dir", str(out),
                                   "--prompt", "the field log", "--max-tokens", "40"], cwd=REPO, stdout=text,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: could not write the generated text to standard output (No space left on device)"]


def test_a_listing_of_checkpoints_that_cannot_be_written_is_not_lost_with_exit_0(tiny_run, tmp_path):
    """--list-checkpoints > FILE on a full disk: the listing is what was asked for (the run's own
    output goes on quietly when its terminal is gone; a listing must not)."""
    _, _, out = tiny_run
    with mounted_tmpfs(tmp_path / "disk", "4k") as disk:
        (disk / "ballast").write_bytes(b"\0" * 4096)
        with open(disk / "listing", "w") as listing:
            done = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--output-dir", str(out), "--list-checkpoints"],
                                  cwd=REPO, stdout=listing, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "No space left on device" in done.stderr, done.stderr
