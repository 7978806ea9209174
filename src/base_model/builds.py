"""The model cache: folders built once under a scratch name and renamed into place (quantized
copies, GGUF folders, the tiny model), what a quantized base is, and the local folder of a base."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


from run_safety.durable import commit_directory, free_space, left_by_a_dead_process, remove_leftover
from run_safety.errors import UserError


QUANT_GROUP_SIZE = 64


QUANT_MODE = "affine"  # mlx-lm's default: what `mlx_lm convert -q` writes


QUANTIZED_FORMAT = 1  # part of the quantized copies' cache key: bump if how they are made changes


BASE_RECORD_FILE = "distrust_qlora_base.json"  # in a quantized copy: what it was made from


@dataclass
class BaseModel:
    """The base a run trains on: where it comes from and what is loaded."""

    source: str  # what the user named, resolved: an HF id or an absolute local path
    path: str  # what mlx_lm.load takes: the source itself, or its quantized copy in the cache
    quantization: dict | None  # {"group_size", "bits", "mode"} applied on load; None: loaded as it is


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def local_model_dir(resolved: str, shown: str | None = None) -> Path:
    """The local folder (or single .gguf file) of a resolved model: itself, or the HF snapshot
    (downloaded by mlx-lm if not yet there, as loading it would)."""
    path = Path(resolved)
    if path.exists():
        return path
    from mlx_lm.utils import _download

    try:
        return Path(_download(resolved))
    except Exception as exc:
        raise UserError(f"{shown or resolved}: cannot load model ({first_line(exc)})") from None


def read_model_config(local: Path, shown: str | None = None) -> dict:
    from mlx_lm.utils import load_config

    try:
        return load_config(local)
    except (OSError, ValueError) as exc:
        raise UserError(f"{shown or local}: cannot load model (config.json: {first_line(exc)})") from None


def remove_if_changed(copy: Path) -> None:
    """A quantized copy whose files are no longer those it recorded when written (changed in the
    cache) is removed, to be built again; one from before copies recorded their files is kept."""
    from run_safety.file_identity import folder_differs

    try:
        recorded = json.loads((copy / BASE_RECORD_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return  # not there (built next), or not ours to judge
    if not isinstance(recorded, dict):
        return
    problem = folder_differs(copy, recorded, leave_out=(BASE_RECORD_FILE,))
    if problem is None:
        return
    print(f"note: {copy} is not as it was written ({problem}); building it again", file=sys.stderr)
    aside = copy.with_name(f".{copy.name}-changed-{os.getpid()}")
    try:
        os.rename(copy, aside)
    except OSError as exc:
        raise UserError(f"{copy}: changed since it was written, and cannot be moved away to build it again "
                        f"({exc.strerror}); remove it") from None
    shutil.rmtree(aside, ignore_errors=True)


BUILD_MARK = "-build-"  # a model is built as .<name>-build-<random>-<pid> beside where it goes


BUILD_SCRATCH = re.compile(r"^\..+" + re.escape(BUILD_MARK) + r"[0-9a-f]{8}-(\d+)$")


NAME_MAX = 255


def build_model_dir_once(target: Path, build, what: str) -> Path:
    """`target`, built by `build(scratch_dir)` the first time it is asked for.

    Built beside the target, flushed and renamed, so a concurrent or killed
    build never leaves a half-written model that a later run would take; the
    scratch folder of a build that was killed (its name ends with its pid) is
    removed by the next call. A cache that cannot be written is one line: exit 2
    for a folder that is read-only or not allowed, exit 1 for a full disk or an
    I/O error (machine.MachineFault).
    """
    remove_dead_builds(target.parent)
    if (target / "config.json").is_file():
        return target
    suffix = f"{BUILD_MARK}{secrets.token_hex(4)}-{os.getpid()}"
    scratch = target.with_name(f".{target.name[:NAME_MAX - len(suffix) - 1]}{suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"Building {what} in {target} (once) ...", file=sys.stderr)
        scratch.mkdir()
        build(scratch)
        try:
            commit_directory(scratch, target)
        except OSError:
            # Ours not renamed, because another process's build came first: take that one.
            if not (scratch.exists() and (target / "config.json").is_file()):
                raise
    except Exception as exc:
        from run_safety.machine import unsaid_write_fault

        if not isinstance(exc, (OSError, RuntimeError)) and unsaid_write_fault(exc) is None:
            raise
        raise cache_fault(exc, target, what) from None
    finally:
        if os.path.lexists(scratch):
            remove_leftover(scratch, f"scratch folder of {what}")
    return target


def remove_dead_builds(folder: Path) -> None:
    """The scratch folders of builds whose process is gone (killed during a build: gigabytes
    for a big base); one that cannot be removed is a warning."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if BUILD_SCRATCH.match(entry.name) and left_by_a_dead_process(entry.name):
            if remove_leftover(Path(entry.path), "scratch folder of a build that was killed"):
                print(f"removed the scratch folder of a build that was killed: {entry.path}", file=sys.stderr)


def cache_fault(exc: BaseException, target: Path, what: str) -> Exception:
    """One line for a build that could not be written: UserError where the folder is the
    problem, machine.MachineFault where the disk is."""
    from run_safety.machine import MachineFault, unsaid_write_fault, write_fault

    unsaid = unsaid_write_fault(exc)  # the tokenizer's save, numpy's short write: no errno
    if unsaid is None and not isinstance(exc, OSError) and "write" not in str(exc).lower():
        return exc  # not a failed write: a bug, with its traceback
    reason = unsaid or (exc.strerror or str(exc) if isinstance(exc, OSError) else first_line(exc))
    blocking = next((p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir's "File exists" says nothing useful here
        reason = f"{blocking} is a file, not a folder"
    from run_safety.input_files import dangling_link_above

    if dangling := dangling_link_above(target.parent):  # the cache on a disk not mounted: "File exists" too
        reason = dangling.strip(" ()")
    where = f"{target.parent}{'' if 'DISTRUST_QLORA_CACHE' in os.environ else ' (the default cache)'}"
    message = (f"cannot build {what} in {where}: {reason} ({free_space(target.parent)}); free some space or set "
               f"DISTRUST_QLORA_CACHE to a writable folder with room")
    return write_fault(exc, message) if isinstance(exc, OSError) and unsaid is None else MachineFault(message)
