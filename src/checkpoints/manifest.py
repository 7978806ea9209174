"""manifest.json: written last, it is what makes a checkpoint directory whole.

It records the SHA-256 and size of every other file, so that a flipped byte,
a truncated or a missing file is found before anything is loaded, and says
what wrote the checkpoint (step, losses, library versions, time).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import platform
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from run_safety.durable import flush_fd, open_regular_file, sha256_of_file
from run_safety.json_files import json_text
from .state import STATE_FILES

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "distrust-qlora-checkpoint"
MANIFEST_VERSION = 1


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions from package metadata: importing mlx_lm just to ask would cost a second."""
    versions = {"python": platform.python_version()}
    for name, distribution in (("mlx", "mlx"), ("mlx_lm", "mlx-lm"), ("numpy", "numpy")):
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def write_manifest(directory: Path, step: int, trainer: dict, *, fsync: bool = True) -> dict:
    """Hash the files already in `directory` and write manifest.json beside them."""
    files = {}
    for name in STATE_FILES:
        path = directory / name
        files[name] = {"sha256": sha256_of_file(path), "size": path.stat().st_size}
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "step": step,
        "loss": as_float_or_none(trainer.get("loss")),
        "val_loss": as_float_or_none(trainer.get("val_loss")),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "versions": library_versions(),
        "files": files,
    }
    # The manifest guards itself too: a changed loss or step would otherwise pass.
    manifest["manifest_sha256"] = canonical_sha256(manifest)
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as f:
        f.write(json_text(manifest, indent=2) + "\n")
        f.flush()
        if fsync:
            flush_fd(f.fileno())
    return manifest


def canonical_sha256(manifest: dict) -> str:
    """SHA-256 of the manifest's content without its own sum, independent of formatting.

    Plain json.dumps, not json_text: a manifest written by an earlier version may hold
    a NaN loss, and its sum must still verify."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def as_float_or_none(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, problem): whether it exists and is well formed, not the file sums."""
    path = directory / MANIFEST_FILE
    try:
        with open_regular_file(path) as handle:  # not a link out of the checkpoint, not a FIFO
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        return None, f"{MANIFEST_FILE} is missing (not a checkpoint, or its save did not finish)"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{MANIFEST_FILE} cannot be read: {error}"
    try:
        manifest = json.loads(text)
    except ValueError as error:
        return None, f"{MANIFEST_FILE} is not valid JSON ({error})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"{MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest"
    if manifest.get("format_version") != MANIFEST_VERSION:
        return None, f"{MANIFEST_FILE} has format_version {manifest.get('format_version')!r}, expected {MANIFEST_VERSION}"
    if manifest.get("manifest_sha256") != canonical_sha256(manifest):
        return None, f"{MANIFEST_FILE} does not match its own SHA-256 (its content changed)"
    files = manifest.get("files")
    step = manifest.get("step")
    if not isinstance(files, dict) or isinstance(step, bool) or not isinstance(step, int):
        return None, f"{MANIFEST_FILE} lacks its file list or step"
    for name in STATE_FILES:
        entry = files.get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
            return None, f"{MANIFEST_FILE} has no valid entry for {name}"
    for key in ("loss", "val_loss"):
        if manifest.get(key) is not None and not isinstance(manifest[key], (int, float)):
            return None, f"{MANIFEST_FILE}: {key} is not a number"
    return manifest, None


def verify_checkpoint(directory: Path, expected_step: int | None = None,
                      hash_contents: bool = True) -> tuple[dict | None, str | None]:
    """(manifest, problem): problem is None when every file matches its size and SHA-256.

    `hash_contents=False` checks the manifest and the sizes only: cheap enough
    to run over every kept checkpoint at each save (retention), where reading
    gigabytes of optimizer state back would not be.
    """
    manifest, problem = read_manifest(directory)
    if problem:
        return None, problem
    if expected_step is not None and manifest["step"] != expected_step:
        return manifest, f"{MANIFEST_FILE} says step {manifest['step']}, the directory name says {expected_step}"
    for name, entry in manifest["files"].items():
        # A manifest naming a file outside its directory is not ours to follow.
        if Path(name).name != name or name in (MANIFEST_FILE, "", ".", ".."):
            return manifest, f"{MANIFEST_FILE} lists a bad file name {name!r}"
        path = directory / name
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            return manifest, f"{name} is missing"
        except OSError as error:
            return manifest, f"{name} cannot be read: {error}"
        if not stat.S_ISREG(status.st_mode):
            # A link could lead out of the checkpoint; a FIFO would block every read.
            return manifest, f"{name} is not a regular file (a link, a FIFO or a device)"
        size = status.st_size
        if size != entry["size"]:
            return manifest, f"{name} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if not hash_contents:
            continue
        try:
            digest = sha256_of_file(path)
        except OSError as error:
            return manifest, f"{name} cannot be read: {error}"
        if digest != entry["sha256"]:
            return manifest, f"{name} does not match its SHA-256 in the manifest (its content changed)"
    return manifest, None

