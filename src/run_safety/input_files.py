"""Opening the files a command reads (data, probes, general text, a settings file): a
regular file only, found in one line when it is not one.

A FIFO would block open() for ever with nothing said, a device never end, a folder fail
with a word about something else; a link whose target is gone (its disk not mounted)
would read as "no such file" and, for an optional file such as val.jsonl, quietly as no
file at all. Each is a UserError naming the file (and the link's target), before any
work. Links to regular files are followed: a data folder of links is an ordinary setup.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from run_safety.durable import open_regular_file
from run_safety.errors import UserError


def open_input_file(path: Path, what: str, mode: str = "rb"):
    """`path` open for reading, or UserError naming it: not there, a dangling link, not a
    regular file, unreadable. `what` names it in the message ("the probe file")."""
    try:
        return open_regular_file(path, mode, follow_links=True)
    except OSError as exc:
        raise UserError(why_unreadable(Path(path), what, exc)) from None


def refuse_if_not_regular(path: Path, what: str) -> None:
    """UserError when something is at `path` (a link counts, even one whose target is gone)
    that is not a readable regular file; nothing when nothing is there, or a regular file is."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(why_unreadable(path, what, exc)) from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(why_unreadable(path, what, OSError(errno.EINVAL, "not a regular file")))


def why_unreadable(path: Path, what: str, exc: OSError) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return (f"{path}: {what} is a link to {os.readlink(path)}, which does not exist (on a disk not mounted, "
                f"or moved?): mount or restore it, or remove the link")
    if isinstance(exc, FileNotFoundError):
        return f"{path}: {what.removeprefix('the ')} not found{dangling_link_above(path)}"
    if exc.errno == errno.EINVAL or isinstance(exc, IsADirectoryError):
        return (f"{path}: {what} is not a regular file (a FIFO, a device or a folder: it cannot be read as "
                f"data); put the file itself there")
    return f"{path}: cannot read {what} ({exc.strerror or exc})"



def dangling_link_above(path: Path) -> str:
    """' (FOLDER is a link to TARGET, which does not exist)' when a folder on the way to `path` is a
    link whose target is gone (a data folder on a disk not mounted); "" otherwise."""
    for folder in [Path(path), *Path(path).parents]:
        if os.path.islink(folder) and not os.path.exists(folder):
            return f" ({folder} is a link to {os.readlink(folder)}, which does not exist: a disk not mounted?)"
    return ""
