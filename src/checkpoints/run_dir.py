"""What a run folder (--output-dir) may contain, checked before a run writes to it.

The run writes only these names, each created without following links and
replaced by rename:

    adapters.safetensors, adapter_config.json, metrics.jsonl   files
    checkpoints/, logs/, cache/, evaluations/                   folders
    .run.lock                                                   the lock of the run going on
    .tmp-*                                                      work in progress (removed when left over)

A symbolic link at any of these names (or at checkpoints/best, checkpoints/final)
would make the run write or read outside the folder, so the run refuses to
start and names it: a folder received from elsewhere or shared with others
cannot redirect the trainer. Anything else in the folder is left alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from durable import TEMP_PREFIX, left_by_a_dead_process
from errors import UserError

RUN_FILES = ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", ".run.lock")
RUN_FOLDERS = ("checkpoints", "logs", "cache", "evaluations")
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


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove `.tmp-*` files of processes no longer running (an atomic replace cut short)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
            continue
        if not left_by_a_dead_process(entry.name):
            continue
        try:
            os.unlink(entry.path)  # a link is removed itself, never followed
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed
