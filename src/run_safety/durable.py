"""Durability helpers: flush to stable storage, replace a file or commit a directory
atomically, open files without following links planted in a run folder, and say how
much room is left when a write fails.

A rename is atomic, but it is only durable once the directory holding the new
name has been flushed too; and a file's bytes are only durable once the file
itself has been flushed. These helpers do both, portably.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
from datetime import datetime, timezone
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


def flush_tree(directory: Path) -> None:
    """Every file and folder under `directory` (itself included) to stable storage."""
    for root, _, names in os.walk(directory):
        for name in names:
            flush_file(Path(root) / name)
        flush_dir(Path(root))


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


def make_dirs(path: Path, *, fsync: bool = True) -> list[Path]:
    """`mkdir -p path`, each folder it creates made durable in its parent (the parent flushed)
    before anything is put inside it: a checkpoint committed in a folder whose own name a
    power loss can still take is not committed. Returns the folders created.

    A parent that cannot be flushed (a folder one may enter but not read, a file system
    refusing to flush folders) is left so: the folder is there, only its durability is
    in doubt, as before this was done.
    """
    path = Path(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made meanwhile by another process, which flushes it
        created.append(folder)
        if fsync:
            try:
                flush_dir(folder.parent)
            except OSError:
                pass
    return created


# Flags that make open() refuse a symbolic link where a file is expected, and
# (for new files) refuse any existing name: a link planted in a run folder
# must never make the trainer write outside it.
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
TEMP_PREFIX = ".tmp-"
CLOSE_ON_EXEC = getattr(os, "O_CLOEXEC", 0)


def open_new_file(path: Path, mode: str = "wb"):
    """A file object for a name that must not exist yet (O_EXCL), never through a link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW | CLOSE_ON_EXEC, 0o666)
    return os.fdopen(fd, mode)


def open_for_append(path: Path):
    """Append to a log file, creating it; refuses a symbolic link (ELOOP) instead of writing through it,
    and a hard link (EMLINK), whose other name would grow too."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW | CLOSE_ON_EXEC, 0o666)
    if os.fstat(fd).st_nlink > 1:
        os.close(fd)
        raise OSError(errno.EMLINK, "it is a hard link (the file has other names); remove it", str(path))
    return os.fdopen(fd, "a", encoding="utf-8")


def open_regular_file(path: Path, mode: str = "rb", *, follow_links: bool = False):
    """Open for reading a regular file only: not a FIFO (which would block), a device or a folder;
    not a link either, unless `follow_links` (then the file it points to must be a regular one)."""
    no_follow = 0 if follow_links else NO_FOLLOW
    fd = os.open(path, os.O_RDONLY | no_follow | getattr(os, "O_NONBLOCK", 0) | CLOSE_ON_EXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (same file system, so the rename is atomic)."""
    # ".tmp-<name>-<random>-<pid>": the pid at the end tells a leftover of a dead
    # process (removed at the next start) from the work of one still running.
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}-{os.getpid()}")


def replace_file(path: Path, write, *, binary: bool = True, fsync: bool = True) -> None:
    """Replace `path` with what `write(file)` writes, atomically: a reader sees the old
    or the new file, never half of one, and a link at `path` is replaced, not followed.

    The new bytes go to a fresh temporary name (created with O_EXCL, so no planted
    link is followed), are flushed, then renamed over `path`; on any failure the
    temporary is removed and `path` is untouched.
    """
    temp = temporary_name(path)
    try:
        with open_new_file(temp, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            if fsync:
                flush_fd(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            temp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        flush_dir(path.parent)


def write_text_atomically(path: Path, text: str, *, fsync: bool = True) -> None:
    """Replace `path` with `text` (UTF-8), atomically; see replace_file."""
    replace_file(path, lambda handle: handle.write(text.encode("utf-8")), fsync=fsync)


def copy_file_atomically(source: Path, target: Path, *, fsync: bool = True) -> None:
    """Replace `target` with a copy of the regular file `source`, atomically."""
    with open_regular_file(source) as reader:
        replace_file(target, lambda handle: shutil.copyfileobj(reader, handle, 1 << 20), fsync=fsync)


def commit_directory(temp: Path, target: Path, *, aside: Path | None = None, fsync: bool = True,
                     on_unflushed=None) -> bool:
    """Put the directory `temp`, built whole under a temporary name beside `target`, in
    place as `target`: a reader sees the old directory or the new one, never half of one.

    Every file and folder under `temp` is flushed, then `temp` is renamed to `target`
    and the parent is flushed, so the new name survives a power loss. A directory cannot
    be renamed over a non-empty one: with `aside`, an existing `target` is renamed there
    first, put back if the rename fails, and removed only once the new one is in place
    (a caller's clean-up puts back an `aside` whose replacement never arrived). Without
    `aside`, the rename of a `temp` onto an existing `target` raises, for the caller to
    judge. If only the flush of the parent fails, `on_unflushed(error)` is called instead
    of raising, when given: the directory is in place, only its durability is in doubt.
    Returns whether an existing `target` was replaced.
    """
    if fsync:
        flush_tree(temp)
    moved = aside is not None and target.exists()
    if moved:
        if aside.is_dir() and not aside.is_symlink():  # a leftover of this process's own earlier attempt
            shutil.rmtree(aside)
        elif os.path.lexists(aside):
            aside.unlink()
        os.rename(target, aside)
    try:
        os.rename(temp, target)
    except BaseException:
        if moved:
            os.rename(aside, target)
        raise
    if fsync:
        try:
            flush_dir(target.parent)
        except OSError as error:
            if on_unflushed is None:
                raise
            on_unflushed(error)
    if moved:
        remove_leftover(aside, f"earlier {target.name} just replaced")
    return moved


def free_space(folder: Path) -> str:
    """'N MB free there' on the file system holding `folder`: what messages about a
    failed write add, since a full disk is so often the cause."""
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB free there"
    except OSError:
        return "free space unknown"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular_file(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# The time in the name of everything a run moves aside (checkpoints, metrics.jsonl,
# logs/), one format for all: UTC, e.g. 20260125T140306Z.
ASIDE_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def aside_stamp() -> str:
    return datetime.now(timezone.utc).strftime(ASIDE_STAMP_FORMAT)


def aside_name(path: Path, word: str, stamp: str | None = None) -> Path:
    """A free name beside `path` for moving it aside (never deleting it): `<name>.<word>-<stamp>`."""
    stamp = stamp or aside_stamp()
    aside, n = path.with_name(f"{path.name}.{word}-{stamp}"), 1
    while os.path.lexists(aside):
        aside, n = path.with_name(f"{path.name}.{word}-{stamp}-{n}"), n + 1
    return aside


TEMP_PID_PATTERN = re.compile(r"-(\d+)$")  # a temporary name ends with its writer's pid


def process_is_alive(pid: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - os.kill(pid, 0) would terminate it there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_tree(path: Path) -> None:
    """Remove a file, a link (never followed) or a folder and all under it; OSError if any of it stays."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_leftover(path: Path, what: str = "leftover", warn=None) -> bool:
    """Remove the `what` at `path` (a file or a whole folder); False, after one warning line naming
    it and why, when it cannot be (chattr +i, a permission error, a read-only file system): a
    leftover that stays costs room, never the run."""
    try:
        remove_tree(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        message = (f"could not remove the {what} {path} ({exc.strerror or exc}"
                   f"{f': {exc.filename}' if exc.filename and str(exc.filename) != str(path) else ''}); "
                   f"remove it by hand to get its room back")
        if warn is not None:
            warn(message)
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        return False


def left_by_a_dead_process(name: str) -> bool:
    """Whether the temporary `name` (ending in its writer's pid) is a leftover: its writer is
    this process or gone. Another live process's temporaries are left alone: it may be
    writing them right now."""
    pid = TEMP_PID_PATTERN.search(name)
    return not (pid and int(pid[1]) != os.getpid() and process_is_alive(int(pid[1])))
