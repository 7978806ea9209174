"""Where a run starts: fresh, or from which checkpoint, and whether it may.

`--auto-resume` takes the newest checkpoint that verifies and loads;
`--resume latest|best|PATH` that one; `--fresh` moves old checkpoints aside.
With none of these and checkpoints present, a terminal is asked and anything
else is told how to choose (exit 2): an unattended job must never hang on a
prompt, nor silently throw away a night of training.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from config import differing_fields
from checkpoints.manager import CheckpointCorruptError, CheckpointManager
from checkpoints.run_dir import check_run_dir, refuse_hard_link, remove_leftovers
from checkpoints.state import TrainingState
from run_safety.durable import CLOSE_ON_EXEC, NO_FOLLOW, aside_name, aside_stamp, flush_dir, make_dirs
from run_safety.errors import UserError
from run_safety.sizes import size_text
from run_safety.file_identity import NEWER_INPUTS, content_key, file_differences, size_change

UNRECORDED_NAMES = {"base": "base model", "train_content": "whole training file", "val_content": "validation file"}


@dataclass
class ResumePoint:
    path: Path
    state: TrainingState
    explicit: bool = False  # named by --resume: if it cannot be used, stop rather than take another
    foreign: list = field(default_factory=list)  # newer checkpoints skipped as another run's (their paths)


class ConfigMismatch(UserError):
    """A checkpoint made with settings or inputs other than this run's."""


def choose_start(manager: CheckpointManager, config, args, inputs: dict, *, stdin=None,
                 out=None, later: list | None = None) -> ResumePoint | None:
    """Decide from the flags (and, at a terminal, the user) where the run starts.

    `inputs` names what the run reads (the training file's identity, the
    resolved model): a checkpoint made from other inputs is not resumed.
    What the choice moves aside (--fresh: the earlier run; a resume from an older
    checkpoint: the newer ones) is moved at once, or, given a list `later`, appended
    to it as calls for the caller to make once the data is checked and the model
    loaded: a run that stops before then has moved nothing.
    """
    stdin = stdin or sys.stdin
    out = out or sys.stderr
    for leftover in manager.clean_temporaries():
        print(f"removed the leftover of an interrupted save: {leftover}", file=out)

    def move(action) -> None:
        if later is None:
            action()
        else:
            later.append(action)

    if args.fresh:
        def fresh() -> None:
            moved = move_run_aside(manager)
            if moved:
                print(f"--fresh: the earlier run moved aside to {', '.join(map(str, moved))} (nothing was deleted)",
                      file=out)
        move(fresh)
        return None
    if args.resume:
        info = manager.resolve(args.resume)
        point = _load_checked(manager, info.path, config, inputs)
        point.explicit = True
        if info.path.resolve().parent == manager.directory.resolve():
            move(lambda: set_aside_newer(manager, point, out))
        return point
    if args.auto_resume:
        point = _newest_loadable(manager, config, inputs)
        if point is None:
            print("--auto-resume: no checkpoint yet, starting a new run", file=out)
        elif point.foreign:
            move(lambda: set_aside_foreign(manager, point, out))
        return point

    newest = manager.latest_valid()
    if newest is None:
        _refuse_if_only_invalid(manager)
        return None
    if _is_terminal(stdin):
        print(f"Found checkpoints in {manager.directory} (newest valid: step {newest.step}).", file=out)
        print(f"  y (or Enter): resume from step {newest.step}, with everything as it was then", file=out)
        print("  n: start anew from step 0; the checkpoints, metrics.jsonl and logs/ are moved aside "
              "(renamed *.old-<time>, nothing is deleted)", file=out)
        print("  (next time, --auto-resume or --fresh chooses without asking)", file=out)
        out.write(f"Resume from step {newest.step}? [Y/n] ")
        out.flush()
        answer = stdin.readline().strip().lower()
        if answer in ("", "y", "yes"):
            point = _newest_loadable(manager, config, inputs)
            if point is not None and point.foreign:
                move(lambda: set_aside_foreign(manager, point, out))
            return point
        if answer in ("n", "no"):
            def anew() -> None:
                moved = move_run_aside(manager)
                print(f"starting anew; the earlier run moved aside to {', '.join(map(str, moved))} "
                      f"(nothing was deleted)", file=out)
            move(anew)
            return None
        raise UserError(f"answer {answer!r} is neither yes nor no; nothing was changed")
    raise UserError(
        f"{manager.directory} holds checkpoints (newest valid: step {newest.step}); choose: "
        f"--auto-resume or --resume latest|best|PATH to continue, or --fresh to start anew "
        f"(the old ones are moved aside, not deleted)")


def move_run_aside(manager: CheckpointManager) -> list[Path]:
    """A fresh start over an earlier run: its checkpoints, metrics.jsonl and TensorBoard
    logs are renamed `<name>.old-<time>`, with one time for the three; nothing is deleted.
    Returns where they went."""
    from monitoring.metrics_log import METRICS_FILE, TENSORBOARD_DIR

    stamp = aside_stamp()
    moved = []
    checkpoints = manager.move_aside(stamp=stamp)
    if checkpoints is not None:
        moved.append(checkpoints)
    run = manager.directory.parent
    for name in (METRICS_FILE, TENSORBOARD_DIR):
        path = run / name
        if not os.path.lexists(path) or path.is_symlink():
            continue  # a link is refused by check_run_dir before anything is moved
        if path.is_dir() and not any(path.iterdir()) or path.is_file() and path.stat().st_size == 0:
            continue
        target = aside_name(path, "old", stamp)
        os.rename(path, target)
        moved.append(target)
    if moved and manager.fsync:  # before the new run writes its first line there
        flush_dir(run)
    return moved


def set_aside_newer(manager: CheckpointManager, point: ResumePoint, out=None) -> Path | None:
    """Resuming from an older checkpoint (say `best`) abandons the newer ones:
    move them aside, so that after a crash `latest` cannot pick them up."""
    newer = [info.path for info in manager.checkpoints(deep=False) if info.step > point.state.step]
    return set_aside(manager, newer, "superseded", f"resuming from step {point.state.step}: the {{}} newer "
                                                   f"checkpoint(s)", out)


def set_aside_foreign(manager: CheckpointManager, point: ResumePoint, out=None) -> Path | None:
    """Checkpoints skipped as another run's (copied in, made with other settings) are moved aside,
    never deleted: `latest` (an export, the next resume) must not take them for this run's."""
    foreign = [path for path in point.foreign if path.is_dir()]
    return set_aside(manager, foreign, "foreign", "the {} checkpoint(s) of another run", out)


def set_aside(manager: CheckpointManager, paths: list[Path], word: str, what: str, out=None) -> Path | None:
    """Move `paths` into a new `checkpoints.<word>-<time>/` beside the checkpoints; say so ("{}" in
    `what` is their count). None when there is nothing to move."""
    if not paths:
        return None
    target = aside_name(manager.directory, word)
    make_dirs(target, fsync=manager.fsync)
    for path in paths:
        os.rename(path, target / path.name)
    if manager.fsync:  # else a power loss could bring them back, for `latest` to take again
        flush_dir(target)
        flush_dir(manager.directory)
    print(f"{what.format(len(paths))} were moved to {target} (nothing was deleted)", file=out or sys.stderr)
    return target


class RunLock:
    """One run per output directory: two writers would interleave checkpoints."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / ".run.lock"
        self.handle = None

    def __enter__(self) -> "RunLock":
        check_run_dir(self.path.parent)  # before anything is written there
        self.created = not os.path.lexists(self.path.parent)  # removed again if the run leaves it empty
        try:
            make_dirs(self.path.parent)  # the run folder's name in its parent made durable once, at creation
        except OSError as exc:
            raise UserError(f"{self.path.parent}: cannot use as --output-dir ({exc.strerror})") from None
        # The file is removed when the run ends: a lock taken on a file another run has
        # just removed would lock nothing, so it is taken again until the locked file is
        # the one at the path.
        while not self._lock_once():
            pass
        try:  # who holds it, for the message above; the lock itself is the flock
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(f"pid {os.getpid()}")
            self.handle.flush()
        except OSError:
            pass
        remove_leftovers(self.path.parent)  # ours alone now: a dead run's half-replaced files go
        return self

    def _lock_once(self) -> bool:
        """Open and lock the file at the path; False when it was removed or replaced meanwhile."""
        import fcntl

        try:
            # Never through a link: a planted .run.lock must not make us write "pid N" elsewhere.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NO_FOLLOW | CLOSE_ON_EXEC, 0o666)
            self.handle = os.fdopen(fd, "r+")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a symbolic link; remove it") from None
            raise UserError(f"{self.path.parent}: cannot use as --output-dir ({exc.strerror})") from None
        try:  # before a byte is written: a hard link's other name would be rewritten
            refuse_hard_link(self.path, os.fstat(self.handle.fileno()).st_nlink)
        except UserError:
            self.handle.close()
            raise
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "another process"
            self.handle.close()
            raise UserError(f"{self.path.parent} is in use by a run still going ({holder}); "
                            f"wait for it, or use another --output-dir") from None
        try:
            same = os.fstat(self.handle.fileno()).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            self.handle.close()
        return same

    def __exit__(self, *exc) -> None:
        # Removed while still locked, then released: a run that ends leaves no .run.lock.
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.handle.close()
        if self.created:  # a run stopped before writing anything (bad data, say) leaves no empty folder
            try:
                os.rmdir(self.path.parent)
            except OSError:
                pass  # not empty: the run wrote there


def restore_with_fallback(manager: CheckpointManager, point: ResumePoint, restore, config,
                          inputs: dict) -> ResumePoint:
    """`restore(point)`; when the trainer rejects the checkpoint's content, take the
    next older one that loads (warning about each), as for a damaged checkpoint.
    A checkpoint named with --resume PATH is not replaced by another: exit 2."""
    while True:
        try:
            restore(point)
            return point
        except CheckpointCorruptError as exc:
            if point.explicit:
                raise UserError(str(exc)) from None
            manager.warn(f"skipping checkpoint {point.path.name}: {exc}")
            older = _newest_loadable(manager, config, inputs, below_step=point.state.step)
            if older is None:
                raise UserError(f"{manager.directory}: no checkpoint older than {point.path.name} can be used; "
                                f"nothing was changed: --fresh moves them aside and starts anew") from None
            point = older


def _newest_loadable(manager: CheckpointManager, config, inputs: dict,
                     below_step: int | None = None) -> ResumePoint | None:
    """The newest checkpoint (before `below_step`, if given) that verifies, loads and was made
    with this run's settings and inputs; each one that does not is named. A newer one made with
    others (a folder copied in from another run) is skipped when an older one is this run's,
    and listed in the point's `foreign`; when none is, the settings changed: the newest one's
    differences are the error. None only when there is no checkpoint at all: starting anew
    over damaged ones would overwrite them."""
    mismatched: list[tuple[Path, ConfigMismatch]] = []
    for info in reversed(manager.checkpoints(deep=False)):  # load() verifies the SHA-256 sums
        if below_step is not None and info.step >= below_step:
            continue
        if not info.valid:
            manager.warn(f"skipping checkpoint {info.path.name} ({info.path}): {info.problem}")
            continue
        try:
            point = _load_checked(manager, info.path, config, inputs, corrupt_is_error=False)
        except CheckpointCorruptError as exc:
            manager.warn(f"skipping checkpoint {info.path.name}: {exc}")
            continue
        except ConfigMismatch as exc:
            mismatched.append((info.path, exc))
            continue
        for path, exc in mismatched:
            manager.warn(f"skipping checkpoint {path.name}: not this run's (copied in from another run?): "
                         f"{exc.differences}; resuming from this run's {point.path.name}")
        point.foreign = [path for path, _ in mismatched]
        return point
    if mismatched:
        raise mismatched[0][1]
    _refuse_if_only_invalid(manager)
    return None


def _refuse_if_only_invalid(manager: CheckpointManager) -> None:
    if manager.has_any():
        raise UserError(
            f"{manager.directory} holds checkpoints but none of them verifies (see --list-checkpoints); "
            f"nothing was changed: --fresh moves them aside and starts anew, or --resume PATH names one")


def _load_checked(manager: CheckpointManager, path: Path, config, inputs: dict,
                  corrupt_is_error: bool = True) -> ResumePoint:
    from config import AUTO_WARMUP, Config

    try:
        state = manager.load(path)
        try:
            saved = Config.from_saved(state.config, source=f"{path}/config.json")
            if not isinstance(state.trainer.get("inputs", {}), dict):
                raise UserError(f"{path}/trainer_state.json: 'inputs' is not an object")
        except UserError as exc:  # not a config this code wrote: damaged, like a failed manifest
            raise CheckpointCorruptError(f"checkpoint {path} is corrupt: {exc}") from None
    except (CheckpointCorruptError, FileNotFoundError) as exc:
        if not corrupt_is_error and isinstance(exc, CheckpointCorruptError):
            raise
        raise UserError(str(exc)) from None
    current = config.fingerprint_fields()
    if config.training.warmup_steps == AUTO_WARMUP and saved.training.warmup_steps == config.training.warmup():
        current["warmup_steps"] = saved.training.warmup_steps  # a checkpoint of before: that warmup, as a number
    differences = differing_fields(saved.fingerprint_fields(), current)
    from_inputs, unrecorded, notes = input_differences(state.trainer.get("inputs", {}), inputs)
    if differences or from_inputs:
        what = "the config differs in fields that change the result" if differences else \
            "what the run reads differs from what it was trained on"
        mismatch = ConfigMismatch(f"cannot resume from {path}: {what}: " + "; ".join(differences + from_inputs)
                                  + " (use the same settings and files, or --fresh to start anew)")
        mismatch.differences = "; ".join(differences + from_inputs)
        raise mismatch
    for note in notes:
        print(f"note: {note}, since {path.name} was saved: validation losses before and after this resume do not "
              f"compare (what is learned is the same; `best` was chosen on the earlier file)", file=sys.stderr)
    if unrecorded:
        print(f"note: {path.name} was saved by an earlier version, which did not record the content of the "
              f"{', '.join(UNRECORDED_NAMES[key] for key in unrecorded)}: not checked on this resume "
              f"(the checkpoints it saves record them)", file=sys.stderr)
    return ResumePoint(path=path, state=state)


def describe_checkpoints(manager: CheckpointManager) -> str:
    """The table printed by --list-checkpoints."""
    infos = manager.checkpoints()
    if not infos:
        return f"no checkpoints in {manager.directory}"
    rows = [("checkpoint", "step", "objective", "val_ce", "valid", "size", "")]
    for info in infos:
        marks = ", ".join(m for m, on in (("best", info.is_best), ("final", info.is_final)) if on)
        rows.append((
            info.path.name, str(info.step), _fmt(info.loss), _fmt(info.val_loss),
            "yes" if info.valid else f"NO: {info.problem}", size_text(info.size_bytes), marks,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return f"checkpoints in {manager.directory}:\n" + "\n".join(lines)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def input_differences(saved: dict, current: dict) -> tuple[list[str], list[str], list[str]]:
    """(differences, newer inputs the checkpoint does not record, notes) between the inputs a
    checkpoint recorded and the current ones. The base and the data are described by file, the rest
    as config.differing_fields lists settings. A checkpoint of an older version has no record of the base's
    and the data's full content: those are not compared, and named in the second list. Another
    validation file changes nothing that is learned (only what is measured): it is a note, not a
    difference, so that a val.jsonl added, fixed or removed between two nights does not strand a run."""
    unrecorded = [key for key in NEWER_INPUTS if key not in saved and current.get(key) is not None]
    rest = {key: value for key, value in saved.items() if key not in NEWER_INPUTS}
    differences = differing_fields(rest, {k: v for k, v in current.items() if k not in NEWER_INPUTS})
    if "base" in saved:
        differences += _base_differences(saved["base"], current.get("base"))
    if "train_content" in saved and content_key(saved["train_content"]) != content_key(current.get("train_content")):
        differences.append(_data_difference("training file", saved["train_content"], current.get("train_content")))
    notes = []
    if "val_content" in saved and content_key(saved["val_content"]) != content_key(current.get("val_content")):
        notes.append(_data_difference("validation file", saved["val_content"], current.get("val_content")))
    return differences, unrecorded, notes


def _data_difference(what: str, saved, current) -> str:
    if not isinstance(saved, dict):
        return f"{what}: none at the checkpoint, now {current.get('name')}"
    if not isinstance(current, dict):
        return f"{what}: {saved.get('name')} at the checkpoint, none now"
    return f"{what} {current.get('name')}: content differs ({size_change(saved, current)})"


def _base_differences(saved, current) -> list[str]:
    before = saved.get("files") if isinstance(saved, dict) else None
    now = current.get("files") if isinstance(current, dict) else None
    if not isinstance(before, dict) or not isinstance(now, dict):
        return [f"base model files: checkpoint {before!r}, now {now!r}"]
    differences = file_differences(before, now)
    return [f"base model content differs ({differences})"] if differences else []
