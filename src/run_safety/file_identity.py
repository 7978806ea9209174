"""What a run reads, by content: the SHA-256 of the base model's files and of the data files.

A checkpoint records them (train_qlora.run_inputs); a resume from a base or a corpus whose
content differs is refused with the difference listed, like a changed setting; export,
generate and evaluate refuse a base changed since training the same way (base_changed).
A JSON file of the base (config.json, tokenizer.json) also records the SHA-256 of its
parsed content, and is the same file when that is: re-indented or its keys reordered,
it loads as the same model. Weights and other files are compared by their bytes.

Hashing a 7B base (4 to 15 GB) at every start would cost more than the check is worth, so
each file's sum is kept in the model cache (`<cache>/file-hashes/`, one small JSON per
file) and reused while the file's device, inode, size, modification time and change time
are what they were when it was hashed. The change time (ctime) is not the user's to set:
`touch -r`, `cp -p` and `rsync -a` carry a modification time over, but any write (or
`touch`, `chmod`) sets ctime to now, and a file replaced by a rename has another inode.
A sum taken less than 2 s after the file last changed is not reused: on a file system
with coarse timestamps (FAT: 2 s) the next edit could get the very same times.

Not seen: an edit that keeps size, modification time and inode on a file system that
keeps no change time of its own (FAT and exFAT report the modification time, or the
creation time, for it). A cache that cannot be written costs the next start its time,
never the run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import time
from pathlib import Path

from run_safety.durable import CLOSE_ON_EXEC, open_regular_file, replace_file
from run_safety.errors import UserError
from run_safety.json_files import json_text
from run_safety.paths import cache_dir

HASHES_FOLDER = "file-hashes"  # in the model cache
RACY_NS = 2_000_000_000  # a sum taken this soon after the file's last change is not reused
PRUNE_ABOVE = 512  # cache entries; beyond it, those of files that are gone are removed
# What a base model folder holds that loading it may read: mlx-lm's own list of what it
# downloads for a model (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS), used when it has none.
MODEL_FILE_PATTERNS = ("*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                       "*.txt", "*.jsonl", "*.jinja")
NEWER_INPUTS = ("base", "train_content", "val_content")  # what checkpoints of older versions lack

_known: dict[str, dict] = {}  # this process's sums: real path -> cache entry
_known_json: dict[str, tuple] = {}  # this process's parsed-content sums: real path -> (stat key, sum)


def stat_key(info: os.stat_result) -> list[int]:
    """What tells one version of a file from another without reading it."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _trusted(entry: dict | None, key: list[int]) -> bool:
    return (entry is not None and entry.get("stat") == key
            and entry.get("hashed_at_ns", 0) - max(key[3], key[4]) >= RACY_NS)


def file_sha256(path: str | Path, cache: Path | None = None) -> dict:
    """{"size", "sha256"} of the regular file at `path` (links followed: what a reader gets),
    from `cache` or this process's memory while the file is unchanged, else read in full.
    UserError, one line, when it cannot be read or is not a regular file."""
    real = os.path.realpath(path)
    try:
        key = stat_key(os.stat(real))
    except OSError as exc:
        from run_safety.input_files import why_unreadable

        raise UserError(why_unreadable(Path(path), "the file", exc)) from None
    entry = _known.get(real)
    if not _trusted(entry, key):
        entry = _read_entry(cache, real)
    if not _trusted(entry, key):
        entry = _hash(real, path)
        if entry["hashed_at_ns"] - max(entry["stat"][3], entry["stat"][4]) >= RACY_NS:
            _known[real] = entry
            _write_entry(cache, real, entry)
    return {"size": entry["stat"][2], "sha256": entry["sha256"]}


def _hash(real: str, shown) -> dict:
    """Read the file in full; again if it changed while being read (a sum of neither version)."""
    for _ in range(3):
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | CLOSE_ON_EXEC)
        except OSError as exc:
            raise UserError(f"{shown}: cannot read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):  # a FIFO would block, a device never end
                raise UserError(f"{shown}: not a regular file")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            started = time.time_ns()
            try:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            except OSError as exc:
                raise UserError(f"{shown}: cannot read ({exc.strerror})") from None
            after = os.fstat(fd)
        if stat_key(before) == stat_key(after):
            return {"path": real, "stat": stat_key(after), "hashed_at_ns": started, "sha256": digest}
    raise UserError(f"{shown}: it kept changing while it was being read; run again once it is written")


def _entry_file(cache: Path, real: str) -> Path:
    return cache / f"{hashlib.sha256(real.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"


def _read_entry(cache: Path | None, real: str) -> dict | None:
    if cache is None:
        return None
    try:
        with open_regular_file(_entry_file(cache, real)) as handle:  # never through a link
            entry = json.loads(handle.read(4096))
    except (OSError, ValueError):
        return None
    valid = (isinstance(entry, dict) and entry.get("path") == real and isinstance(entry.get("sha256"), str)
             and len(entry["sha256"]) == 64 and isinstance(entry.get("hashed_at_ns"), int)
             and isinstance(entry.get("stat"), list) and len(entry["stat"]) == 5
             and all(isinstance(n, int) for n in entry["stat"]))
    return entry if valid else None


def _write_entry(cache: Path | None, real: str, entry: dict) -> None:
    """Best effort: a cache that cannot be written only costs the next start a read."""
    if cache is None or os.path.islink(cache):  # a planted link: never written through
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        text = json_text(entry)
        replace_file(_entry_file(cache, real), lambda handle: handle.write(text.encode("utf-8")), fsync=False)
        _prune(cache)
    except (OSError, ValueError):
        pass


def _prune(cache: Path) -> None:
    """Past PRUNE_ABOVE entries, drop those whose file is gone (tests and one-off data leave many)."""
    names = [entry.name for entry in os.scandir(cache) if entry.name.endswith(".json")]
    if len(names) <= PRUNE_ABOVE:
        return
    for name in names:
        try:
            with open_regular_file(cache / name) as handle:
                path = json.loads(handle.read(4096)).get("path")
            if isinstance(path, str) and not os.path.exists(path):
                os.unlink(cache / name)
        except (OSError, ValueError, AttributeError):
            continue


def hash_cache() -> Path:
    """Where the sums are kept: the model cache (DISTRUST_QLORA_CACHE, else the project's .cache/)."""
    return cache_dir() / HASHES_FOLDER


# ---------------------------------------------------------------------------
# the base model


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that loading it may read (mlx-lm's download patterns),
    hidden ones aside; links followed. A README, a .DS_Store or weights in another format
    change nothing that is trained."""
    try:
        from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS as patterns
    except ImportError:  # an mlx-lm without the list
        patterns = MODEL_FILE_PATTERNS
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise UserError(f"{folder}: cannot read the model folder ({exc.strerror})") from None
    chosen = []
    for name in names:
        if name.startswith(".") or not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        path = folder / name
        if not path.is_dir():  # a file, a link to one, or something that is refused when read
            chosen.append(path)
    return chosen


def base_identity(local: str | Path, cache: Path | None = None) -> dict:
    """{"files": {name: {"size", "sha256"}}} of the base a run trains on, on this machine: a model
    folder (its files that loading reads) or a single model file (.gguf). An HF id is first made
    its snapshot folder (base_model.builds.local_model_dir)."""
    path = Path(local)
    if path.is_file():
        return {"files": {path.name: file_sha256(path, hash_cache() if cache is None else cache)}}
    return {"files": folder_sums(path, cache=cache)}


def folder_sums(folder: Path, leave_out: tuple[str, ...] = (), cache: Path | None = None) -> dict:
    """{name: {"size", "sha256"}} of a model folder's files (model_files), some left out; a JSON
    file's also with "json", the sum of its parsed content (json_sha256)."""
    cache = hash_cache() if cache is None else cache
    sums = {}
    for path in model_files(folder):
        if path.name not in leave_out:
            sums[path.name] = file_sha256(path, cache)
            if path.name.endswith(".json"):
                sums[path.name]["json"] = json_sha256(path)
    return sums


def json_sha256(path: Path) -> str | None:
    """SHA-256 of a JSON file's parsed content, written canonically (keys sorted, no spaces): the
    same for a file only re-indented or with its keys reordered. None when it is not JSON."""
    real = os.path.realpath(path)
    try:
        key = stat_key(os.stat(real))
        if _known_json.get(real, (None,))[0] == key:
            return _known_json[real][1]
        with open_regular_file(real) as handle:
            content = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()
    _known_json[real] = (key, digest)
    return digest


def base_changed(saved_inputs, source: str) -> str | None:
    """What differs between the base a checkpoint recorded (its inputs' "base") and the files of
    `source` now ("changed: model.safetensors"); None when they agree or nothing was recorded."""
    saved = saved_inputs.get("base") if isinstance(saved_inputs, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("files"), dict):
        return None  # a checkpoint of an older version: its base was not recorded
    try:
        now = base_identity(source)
    except UserError as exc:
        return str(exc)
    return file_differences(saved["files"], now["files"])


def written_sums(folder: Path) -> dict:
    """{name: {"size", "sha256", "stat"}} of the model files a process has just written to `folder`
    (a quantized copy): what folder_differs checks them against later. A file whose stat_key is
    still the one recorded is unchanged since its writer read it, and is not read again."""
    return {path.name: {**file_sha256(path), "stat": stat_key(os.stat(path))} for path in model_files(folder)}


def folder_differs(folder: Path, recorded: dict, leave_out: tuple[str, ...] = ()) -> str | None:
    """What differs between a folder's files and the sums recorded when it was written
    (written_sums): None when they agree."""
    now = {}
    try:
        for path in model_files(folder):
            if path.name in leave_out:
                continue
            mark = recorded.get(path.name)
            try:
                unchanged = isinstance(mark, dict) and mark.get("stat") == stat_key(os.stat(path))
            except OSError:
                unchanged = False
            now[path.name] = mark if unchanged else file_sha256(path, hash_cache())
    except UserError as exc:
        return str(exc)
    return file_differences(recorded, now)


# ---------------------------------------------------------------------------
# comparing what a checkpoint recorded with what the run reads now


def data_identity(path: Path | None, cache: Path | None = None) -> dict | None:
    """{"name", "size", "sha256"} of a data file, None for no file."""
    if path is None:
        return None
    return {"name": Path(path).name, **file_sha256(path, hash_cache() if cache is None else cache)}


def check_unchanged(path: Path, recorded: dict | None, what: str) -> None:
    """UserError when the file no longer has the content recorded at the start of the run
    (it was edited while the run started: the model loading can take minutes)."""
    if recorded is None:
        return
    now = file_sha256(path, hash_cache())
    if now["sha256"] != recorded["sha256"]:
        raise UserError(f"{path}: the {what} changed since this run started ({size_change(recorded, now)}); "
                        f"run the same command again to start from what it holds now")


def content_key(record) -> tuple | None:
    """(size, sha256) of a file's record, the part that says whether its content changed."""
    return (record.get("size"), record.get("sha256")) if isinstance(record, dict) else None


def _same_file(before, now) -> bool:
    """The same bytes; or, for a JSON file whose parsed content both records hold, the same content."""
    if content_key(before) == content_key(now):
        return True
    parsed = [record.get("json") if isinstance(record, dict) else None for record in (before, now)]
    return parsed[0] is not None and parsed[0] == parsed[1]


def size_change(before: dict, now: dict) -> str:
    if before.get("size") == now.get("size"):
        return f"same size, {now.get('size'):,} bytes, other content"
    return f"{before.get('size'):,} bytes then, {now.get('size'):,} now"


def file_differences(before: dict, now: dict) -> str | None:
    """'changed: a, b; added: c; gone: d' between two {name: {"size", "sha256"}}, None when equal."""
    changed = [name for name in sorted(set(before) & set(now)) if not _same_file(before[name], now[name])]
    parts = [f"{label} {_names(names)}" for label, names in (
        ("changed:", changed), ("added:", sorted(set(now) - set(before))), ("gone:", sorted(set(before) - set(now))))
        if names]
    return "; ".join(parts) or None


def _names(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

