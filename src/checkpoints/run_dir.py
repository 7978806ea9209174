"""What a run folder (--output-dir) may contain, checked before a run writes to it.

The run writes only these names, each created without following links and
replaced by rename:

    adapters.safetensors, adapter_config.json, metrics.jsonl   files
    checkpoints/, logs/, cache/, evaluations/, wandb/           folders
    .run.lock                                                   the lock of the run going on
    .tmp-*                                                      work in progress (removed when left over)

A symbolic link at any of these names (or at checkpoints/best, checkpoints/final)
would make the run write or read outside the folder, so the run refuses to
start and names it: a folder received from elsewhere or shared with others
cannot redirect the trainer. So does a hard link (a second name of the same
file elsewhere) at the two files written in place, .run.lock and metrics.jsonl:
the other name would be rewritten too. The others are replaced by rename, which
leaves any other name as it was. Anything else in the folder is left alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from run_safety.durable import TEMP_PREFIX, left_by_a_dead_process, remove_leftover
from run_safety.errors import UserError

RUN_FILES = ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", ".run.lock")
WRITTEN_IN_PLACE = ("metrics.jsonl", ".run.lock")  # appended or rewritten, not replaced by rename
RUN_FOLDERS = ("checkpoints", "logs", "cache", "evaluations", "wandb")  # wandb/: W&B's own files (--report-to)
POINTERS = ("checkpoints/best", "checkpoints/final")


def check_run_dir(output_dir: Path) -> None:
    """UserError naming the first entry that is a link, or a file where a folder belongs (or back)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"{output_dir}: cannot use as --output-dir (it is not a folder)")
    for name in RUN_FILES + RUN_FOLDERS + POINTERS:
        path = Path(output_dir) / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UserError(f"{path}: cannot be checked ({exc.strerror})") from None
        if stat.S_ISLNK(mode):
            raise UserError(f"{path} is a symbolic link; a run folder may hold no link where the run writes "
                            f"(it would write outside the folder): remove it")
        wanted_dir = name in RUN_FOLDERS
        if wanted_dir != stat.S_ISDIR(mode) or (not wanted_dir and not stat.S_ISREG(mode)):
            kind = "a folder" if wanted_dir else "a regular file"
            raise UserError(f"{path} is not {kind}, which the run needs there: move it away")
        if name in WRITTEN_IN_PLACE:
            refuse_hard_link(path, os.lstat(path).st_nlink)


def refuse_hard_link(path: Path, links: int) -> None:
    """UserError when the file at `path` has other names (hard links), which writing it in place would change."""
    if links > 1:
        raise UserError(f"{path} is a hard link (the file has {links} names): the run writes it in place and would "
                        f"change the other name's file too: remove it (rm {path})")


LEFTOVER_FOLDERS = ("", "cache", "evaluations")  # where files are replaced by rename (checkpoints/: the manager's)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove `.tmp-*` files of processes no longer running (an atomic replace cut short: an index
    cache is 30 bytes a record), in the run folder and its cache/ and evaluations/; one that cannot
    be removed is a warning naming it."""
    removed = []
    entries = []
    for name in LEFTOVER_FOLDERS:
        place = Path(folder) / name
        if name and (place.is_symlink() or not place.is_dir()):
            continue  # a link is refused by check_run_dir, never followed
        try:
            entries += list(os.scandir(place))
        except OSError:
            continue
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
            continue
        if not left_by_a_dead_process(entry.name):
            continue
        if remove_leftover(Path(entry.path), "leftover of an interrupted write"):  # a link itself, never followed
            removed.append(Path(entry.path))
    return removed


# The longest names a run writes under its folder (checkpoints being replaced or deleted, the
# newer ones set aside by a resume, TensorBoard files set aside by a new start); the
# TensorBoard file name also holds the host name.
LONGEST_INSIDE = ("checkpoints.superseded-20260101T000000Z-99/step-000000000/optimizer.safetensors",
                  "checkpoints/.tmp-replaced-step-000000000-4194304/optimizer.safetensors",
                  "logs.before-20260101T000000Z-99/events.out.tfevents.1700000000.{host}.1700000000000000000.4194304")


def check_path_lengths(output_dir: Path) -> None:
    """UserError when a path the run will write under `output_dir` passes the file system's limits
    (NAME_MAX for one name, PATH_MAX for a whole path): found at start, not at every checkpoint."""
    import socket

    path = os.path.abspath(output_dir)
    existing = path
    while not os.path.exists(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        return
    for part in Path(path).parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"--output-dir {output_dir}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, "
                            f"over the file system's limit of {name_max}: use a shorter name")
    inside = max(len(os.fsencode(name.format(host=socket.gethostname()))) for name in LONGEST_INSIDE)
    longest = len(os.fsencode(path)) + 1 + inside
    if longest >= path_max:
        raise UserError(f"--output-dir {output_dir}: its path is {len(os.fsencode(path))} bytes long, and the files "
                        f"a run writes in it would reach {longest}, over the system's limit of {path_max - 1}: "
                        f"use a shorter path")
