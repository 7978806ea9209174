"""Durability helpers: flush to stable storage, write a small file atomically.

A rename is atomic, but it is only durable once the directory holding the new
name has been flushed too; and a file's bytes are only durable once the file
itself has been flushed. These helpers do both, portably.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

try:  # fcntl does not exist on Windows
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def flush_fd(fd: int) -> None:
    """Push a file's data to stable storage.

    On macOS a plain fsync only hands the data to the drive, whose own cache
    may still lose it on power loss; F_FULLFSYNC asks the drive to flush too.
    Some file systems (network, FUSE) refuse F_FULLFSYNC: fall back to fsync.
    """
    if fcntl is not None and hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def flush_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flush_fd(fd)
    finally:
        os.close(fd)


def flush_dir(path: Path) -> None:
    """Make the names in a directory (a rename, a new file) durable.

    Windows cannot open a directory for flushing and needs no such step.
    """
    if sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        flush_fd(fd)
    finally:
        os.close(fd)


def write_text_atomically(path: Path, text: str, *, temp_name: str, fsync: bool = True) -> None:
    """Replace `path` with `text` so that a reader sees the old or the new file, never half of one.

    `temp_name` is the name of the temporary file in the same directory (a
    rename is only atomic within one file system).
    """
    temp = path.parent / temp_name
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                flush_fd(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if fsync:
        flush_dir(path.parent)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
