"""The run's identity covers what it reads by content: its base model (as given: a folder,
a .gguf file, an HF snapshot) and its training and validation files. A resume on a base or
data whose content changed, even keeping sizes and times, is refused with the difference
listed (exit 2); a file changed under a running run stops it after the steps done are
committed; the corpus index cache and the base's quantized copy are never reused for
content they were not made from. Every run here is in the test's process (run_in_process);
edits "while the run is going" are made by a thread of the test, at a logged step."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from checkpoints.manifest import write_manifest
from conftest import (FAST, assert_one_line_error, read_metrics, run_in_process, train_lines, train_on_a_tiny_copy,
                      write_corpus, write_jsonl)

from run_safety import file_identity


def times_of(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_atime_ns, info.st_mtime_ns


def rewrite_keeping_size_and_times(path: Path, change) -> None:
    """`path`'s bytes replaced in place by change(bytes) (same length), its times put back: `touch -r`."""
    times, before = times_of(path), path.read_bytes()
    after = change(before)
    assert len(after) == len(before) and after != before
    with open(path, "r+b") as handle:
        handle.write(after)
    os.utime(path, ns=times)


def scale_one_weight(path: Path) -> None:
    """The first floating-point array of a safetensors file times 1.5, its bytes written in place:
    the same size, the same header, other values; the times put back."""
    import mlx.core as mx
    import numpy as np

    blob = path.read_bytes()
    header_size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_size])
    arrays = mx.load(str(path))
    name = next(name for name in sorted(arrays) if mx.issubdtype(arrays[name].dtype, mx.floating))
    scaled = (arrays[name] * 1.5).astype(arrays[name].dtype)
    start, end = header[name]["data_offsets"]
    new = np.array(scaled.view(mx.uint8)).tobytes()
    assert len(new) == end - start
    rewrite_keeping_size_and_times(path, lambda old: old[:8 + header_size + start] + new + old[8 + header_size + end:])


def same_length_other_scores(blob: bytes) -> bytes:
    """Every auth_weight with each decimal digit moved up by one (0.389 -> 0.490): still in [0, 0.99]."""
    def bump(match):
        return match[1] + match[2].translate(str.maketrans("0123456789", "1234567890"))
    return re.sub(r'("auth_weight": 0\.)(\d+)', bump, blob.decode()).encode()


def resume(base, data, out, steps: int = 6, *extra):
    return run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", out, "--max-steps", steps,
                          "--auto-resume", *extra)


def checkpoint_files(out: Path) -> dict:
    return {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}


def at_step(out: Path, step: int, action) -> threading.Thread:
    """Run `action` in a thread of the test as soon as the run has logged `step` steps."""
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(train_lines(out)) >= step:
                    action()
                    return
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------ the base


def edit_weights(base: Path, tmp_path: Path) -> None:
    scale_one_weight(base / "model.safetensors")


def edit_config(base: Path, tmp_path: Path) -> None:
    rewrite_keeping_size_and_times(base / "config.json",
                                   lambda blob: blob.replace(b'"rope_theta": 10000.0', b'"rope_theta": 20000.0'))


def edit_tokenizer(base: Path, tmp_path: Path) -> None:
    rewrite_keeping_size_and_times(base / "tokenizer.json", lambda blob: blob.replace(b"<|user|>", b"<|User|>"))


def link_weights_elsewhere(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    shutil.copy2(base / "model.safetensors", other)
    scale_one_weight(other)
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(other)


def add_a_tokenizer_file(base: Path, tmp_path: Path) -> None:
    (base / "special_tokens_map.json").write_text('{"eos_token": "<eos>"}\n')


BASE_EDITS = {
    "a weight scaled by 1.5, size and times kept": (edit_weights, "changed: model.safetensors"),
    "config.json edited, size and times kept": (edit_config, "changed: config.json"),
    "tokenizer.json edited, size and times kept": (edit_tokenizer, "changed: tokenizer.json"),
    "the weights a link to another file": (link_weights_elsewhere, "changed: model.safetensors"),
    "a tokenizer file added": (add_a_tokenizer_file, "added: special_tokens_map.json"),
}


@pytest.mark.parametrize("case", sorted(BASE_EDITS))
def test_a_base_changed_while_the_run_was_stopped_is_listed_on_resume(tmp_path, case):
    base, out = train_on_a_tiny_copy(tmp_path, 8, 3)
    edit, listed = BASE_EDITS[case]
    edit(base, tmp_path)
    before = checkpoint_files(out)
    result = resume(base, tmp_path / "data", out)
    assert_one_line_error(result, "cannot resume from", "base model content differs", listed)
    assert checkpoint_files(out) == before


def test_a_resume_on_the_unchanged_base_reads_none_of_it_again(tmp_path, monkeypatch):
    """The tiny model's files were hashed by an earlier run (or are now, once): a resume only
    stats them. A sum taken within 2 s of a file's last change is not kept: wait that long."""
    from base_model import tiny

    base = tiny.ensure_tiny_model()
    newest = max(max(info.st_mtime_ns, info.st_ctime_ns) for info in map(os.stat, base.iterdir()))
    time.sleep(max(0.0, (newest + file_identity.RACY_NS - time.time_ns()) / 1e9 + 0.05))
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    first = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        entry = file_identity._read_entry(file_identity.hash_cache(), os.path.realpath(base / name))
        assert entry is not None and entry["stat"] == file_identity.stat_key(os.stat(base / name)), name

    read = []
    hash_file = file_identity._hash
    monkeypatch.setattr(file_identity, "_hash", lambda real, shown: read.append(real) or hash_file(real, shown))
    file_identity._known.clear()  # what this process remembers: the resume must find it in the cache
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "5", "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert not [path for path in read if Path(path).parent == base.resolve()], read


def test_a_hash_cache_that_cannot_be_written_is_no_fault(tmp_path, monkeypatch):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"x" * 1000)
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(file_identity, "RACY_NS", 0)  # a sum taken now is kept (here: would be, if it could)
    file_identity._known.clear()
    expected = {"size": 1000, "sha256": hashlib.sha256(b"x" * 1000).hexdigest()}
    assert file_identity.file_sha256(target, blocked / "file-hashes") == expected
    assert blocked.read_text() == "not a folder"


def test_a_single_model_file_is_an_identity_too(tmp_path):
    """A base given as one file (a .gguf): its name, size and SHA-256; an edit keeping size and times shows."""
    from checkpoints.resume import input_differences

    model = tmp_path / "model.gguf"
    model.write_bytes(bytes(range(256)) * 40)
    before = file_identity.base_identity(str(model), cache=tmp_path / "hashes")
    assert list(before["files"]) == ["model.gguf"] and before["files"]["model.gguf"]["size"] == 10240
    rewrite_keeping_size_and_times(model, lambda blob: blob[:5000] + b"\xff" + blob[5001:])
    after = file_identity.base_identity(str(model), cache=tmp_path / "hashes")
    differences, _, _ = input_differences({"base": before}, {"base": after})
    assert differences == ["base model content differs (changed: model.gguf)"]


def test_a_checkpoint_from_before_the_base_was_recorded_resumes_with_a_note(tmp_path):
    base, out = train_on_a_tiny_copy(tmp_path, 8, 3)
    checkpoint = out / "checkpoints" / "step-00000003"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("base", "train_content", "val_content"):
        del state["trainer"]["inputs"][key]
    state_file.write_text(json.dumps(state))
    write_manifest(checkpoint, 3, state["trainer"], fsync=False)  # as that version wrote it
    result = resume(base, tmp_path / "data", out)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "earlier version" in line]
    assert len(notes) == 1 and "base model, whole training file, validation file" in notes[0], result.stderr
    assert "not checked on this resume" in notes[0]
    saved = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert set(saved["trainer"]["inputs"]) >= {"base", "train_content", "val_content"}


def test_a_base_edited_keeping_sizes_and_times_gets_a_quantized_copy_of_its_own(tmp_path):
    base, out = train_on_a_tiny_copy(tmp_path, 8, 2)
    trained_on = json.loads((out / "adapter_config.json").read_text())["model"]
    scale_one_weight(base / "model.safetensors")
    again = run_in_process(*FAST, "--model", base, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "new",
                           "--max-steps", "2")
    assert again.returncode == 0, again.stderr
    now = json.loads((tmp_path / "new" / "adapter_config.json").read_text())["model"]
    assert now != trained_on  # built for this content (now, or by an earlier run of this test: content-keyed)


def test_a_quantized_copy_changed_in_the_cache_is_built_again_not_trained_on(tmp_path, monkeypatch):
    """The copy a run trains on is derived: it records its own files' sums when written."""
    from base_model import tiny

    base = tmp_path / "base"
    shutil.copytree(tiny.ensure_tiny_model(), base)
    monkeypatch.setenv("DISTRUST_QLORA_CACHE", str(tmp_path / "cache"))  # a copy of its own, shared with no test
    data = write_corpus(tmp_path / "data")
    first = run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", tmp_path / "a", "--max-steps", 2)
    assert first.returncode == 0, first.stderr
    copy = Path(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["model"])
    assert copy.parent == tmp_path / "cache" / "quantized"
    written = (copy / "model.safetensors").read_bytes()
    scale_one_weight(copy / "model.safetensors")
    again = run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", tmp_path / "b", "--max-steps", 2)
    assert again.returncode == 0, again.stderr
    assert f"note: {copy} is not as it was written (changed: model.safetensors); building it again" in again.stderr
    assert (copy / "model.safetensors").read_bytes() == written
    assert not [path for path in copy.parent.iterdir() if path.name.startswith(".")]
    # An intact copy is checked by its files' stat alone: none of it is read again.
    read = []
    hash_file = file_identity._hash
    monkeypatch.setattr(file_identity, "_hash", lambda real, shown: read.append(real) or hash_file(real, shown))
    third = run_in_process(*FAST, "--model", base, "--data-dir", data, "--output-dir", tmp_path / "c", "--max-steps", 2)
    assert third.returncode == 0 and "is not as it was written" not in third.stderr, third.stderr
    assert not [path for path in read if Path(path).parent == copy], read


# ------------------------------------------------------------ the training file


def sed_in_place(path: Path) -> None:
    """sed -i: a new file, the same size, renamed over the name."""
    subprocess.run(["sed", "-i", "s/ the / THE /g", str(path)], check=True)


def in_place_keeping_times(path: Path) -> None:
    rewrite_keeping_size_and_times(path, lambda blob: blob.replace(b" the ", b" THE "))


@pytest.mark.parametrize("edit,said", [(sed_in_place, "same size, other content, another file at its name"),
                                       (in_place_keeping_times, "same size, other content")])
def test_a_same_size_rewrite_of_the_training_file_stops_a_streaming_run_after_committing(tmp_path, edit, said):
    data = write_corpus(tmp_path / "data", train=200)
    train = data / "train.jsonl"
    size = train.stat().st_size
    out = tmp_path / "out"
    thread = at_step(out, 4, lambda: edit(train))
    result = run_in_process(*FAST, "--max-steps", "2000", "--checkpoint-interval", "1000", "--eval-steps", "1000",
                            "--data-dir", data, "--output-dir", out)
    thread.join()
    assert train.stat().st_size == size and b" THE " in train.read_bytes()
    assert_one_line_error(result, str(train), "changed during the run", said)
    step = train_lines(out)[-1]["step"]
    assert 4 <= step < 2000
    assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert read_metrics(out)[-1]["event"] == "end"
    # And the resume says what differs.
    again = run_in_process(*FAST, "--max-steps", "2000", "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert_one_line_error(again, "training file train.jsonl: content differs (same size")


def test_a_training_file_deleted_under_a_streaming_run_stops_it_after_committing(tmp_path):
    data = write_corpus(tmp_path / "data", train=200)
    out = tmp_path / "out"
    thread = at_step(out, 4, lambda: (data / "train.jsonl").unlink())
    result = run_in_process(*FAST, "--max-steps", "2000", "--checkpoint-interval", "1000", "--eval-steps", "1000",
                            "--data-dir", data, "--output-dir", out)
    thread.join()
    assert_one_line_error(result, "changed during the run", "cannot be read now (No such file or directory)")
    step = train_lines(out)[-1]["step"]
    assert (out / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


def test_a_training_file_touched_chmodded_or_copied_over_with_its_own_bytes_does_not_stop_the_run(tmp_path):
    """Its times, mode or inode move, its bytes do not: the run reads it once to compare, and goes on."""
    data = write_corpus(tmp_path / "data", train=200)
    train = data / "train.jsonl"
    out = tmp_path / "out"
    inode = train.stat().st_ino

    def metadata_only():
        os.chmod(train, 0o600)
        os.utime(train)  # touch
        copy = train.with_name("copy.jsonl")
        shutil.copyfile(train, copy)
        os.replace(copy, train)  # the same bytes, another inode

    thread = at_step(out, 4, metadata_only)
    result = run_in_process(*FAST, "--max-steps", "30", "--checkpoint-interval", "1000", "--eval-steps", "1000",
                            "--data-dir", data, "--output-dir", out)
    thread.join()
    assert result.returncode == 0, result.stderr
    assert read_metrics(out)[-1]["reason"] == "finished: reached --max-steps 30"
    assert train.stat().st_ino != inode  # it did happen while the run went on


def test_a_training_file_edited_while_the_model_loads_is_found_before_the_first_step(tmp_path, monkeypatch):
    """Loading a 7B base takes minutes; the identity was taken before it, the index after."""
    from base_model import loading

    data = write_corpus(tmp_path / "data")
    load_model = loading.load_model

    def load_then_edit(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        rewrite_keeping_size_and_times(data / "train.jsonl", same_length_other_scores)
        return loaded

    monkeypatch.setattr(loading, "load_model", load_then_edit)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out", "--max-steps", "3")
    assert_one_line_error(result, "train.jsonl", "training file changed since this run started", "same size")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_files_that_loading_does_not_read_are_not_part_of_the_base(tmp_path):
    """A README, a .DS_Store, weights in another format: adding or editing them is no other base."""
    from base_model import tiny

    base = tmp_path / "base"
    shutil.copytree(tiny.ensure_tiny_model(), base)
    before = file_identity.base_identity(str(base), cache=tmp_path / "hashes")
    for name in ("README.md", ".DS_Store", "pytorch_model.bin"):
        (base / name).write_bytes(b"anything")
    assert file_identity.base_identity(str(base), cache=tmp_path / "hashes") == before
    assert sorted(before["files"]) == ["chat_template.jinja", "config.json", "model.safetensors",
                                       "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


def test_a_same_size_edit_in_the_middle_of_a_large_training_file_is_refused_on_resume(tmp_path):
    """More than 2 MiB: the ends alone (the older signature's first and last MiB) do not see the middle."""
    records = [json.loads(line) for line in (write_corpus(tmp_path / "made") / "train.jsonl").read_text().splitlines()]
    padding = "\n" * (1 << 20) + " " * 1000 + "\n"  # blank lines: skipped by the reader
    middle = json.dumps({"text": "the middle record of the corpus", "auth_weight": 0.25, "prov_entropy": 4.0})
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [*records[:24], padding, middle, padding, *records[24:]])
    write_jsonl(data / "val.jsonl", records[:8])
    out = tmp_path / "out"
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "3").returncode == 0
    rewrite_keeping_size_and_times(data / "train.jsonl", lambda blob: blob.replace(b'"auth_weight": 0.25,',
                                                                                   b'"auth_weight": 0.75,'))
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "6", "--auto-resume")
    assert_one_line_error(result, "training file train.jsonl: content differs (same size")


def keep_times_touch_r(train: Path, other: bytes) -> None:
    times = times_of(train)
    train.write_bytes(other)
    os.utime(train, ns=times)


def keep_times_cp_p(train: Path, other: bytes) -> None:
    source = train.with_name("other.jsonl")
    source.write_bytes(other)
    os.utime(source, ns=times_of(train))
    subprocess.run(["cp", "-p", str(source), str(train)], check=True)
    source.unlink()


def keep_times_like_rsync_a(train: Path, other: bytes) -> None:
    """What rsync -a does: a temporary file, the source's times, renamed over the name."""
    temp = train.with_name(".train.jsonl.rsync")
    temp.write_bytes(other)
    os.utime(temp, ns=times_of(train))
    os.replace(temp, train)


@pytest.mark.parametrize("how", [keep_times_touch_r, keep_times_cp_p, keep_times_like_rsync_a],
                         ids=["touch -r", "cp -p", "rsync -a"])
def test_the_index_cache_is_not_reused_after_an_edit_keeping_size_and_mtime(tmp_path, how):
    data = write_corpus(tmp_path / "data")
    train = data / "train.jsonl"
    out = tmp_path / "out"
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "1").returncode == 0
    before = train.stat()
    how(train, same_length_other_scores(train.read_bytes()))
    assert (train.stat().st_size, train.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "1", "--fresh")
    assert result.returncode == 0, result.stderr
    from safetensors.numpy import load_file

    newest = max((out / "cache").glob("index-*.safetensors"), key=lambda path: path.stat().st_mtime_ns)
    expected = [json.loads(line)["auth_weight"] for line in train.read_text().splitlines()]
    assert load_file(str(newest))["auth_weight"].tolist() == pytest.approx(expected)


def test_the_index_cache_is_reused_after_a_touch_a_chmod_or_a_copy_of_the_same_bytes(tmp_path):
    """Keyed by content: what moves only the times, the mode or the inode does not rebuild an index
    (minutes for a million records)."""
    data = write_corpus(tmp_path / "data")
    train = data / "train.jsonl"
    out = tmp_path / "out"
    assert run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "1").returncode == 0
    (cache,) = (out / "cache").glob("index-*.safetensors")
    written = cache.stat().st_mtime_ns
    os.chmod(train, 0o600)
    os.utime(train)
    copy = train.with_name("copy.jsonl")
    shutil.copyfile(train, copy)
    os.replace(copy, train)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "2", "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert list((out / "cache").glob("index-*.safetensors")) == [cache] and cache.stat().st_mtime_ns == written


# ------------------------------------------------------------ the validation file


def test_the_validation_file_edited_before_the_first_validation_stops_the_run_after_committing(tmp_path):
    data = write_corpus(tmp_path / "data", train=200)
    val = data / "val.jsonl"
    out = tmp_path / "out"
    thread = at_step(out, 3, lambda: rewrite_keeping_size_and_times(val, same_length_other_scores))
    result = run_in_process(*FAST, "--max-steps", "2000", "--checkpoint-interval", "1000", "--eval-steps", "40",
                            "--data-dir", data, "--output-dir", out)
    thread.join()
    assert_one_line_error(result, str(val), "validation file changed since this run started", "same size")
    step = train_lines(out)[-1]["step"]
    assert step == 40 and (out / "checkpoints" / "step-00000040" / "manifest.json").is_file()
    assert not [line for line in read_metrics(out) if "val_ce" in line]  # never validated on the new one
    # Another validation file changes nothing that is learned: the resume goes on, saying so.
    again = run_in_process(*FAST, "--max-steps", "42", "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert again.returncode == 0, again.stderr
    assert "note: validation file val.jsonl: content differs (same size" in again.stderr
    assert "validation losses before and after this resume do not compare" in again.stderr
