"""CheckpointManager: save, list, verify, load and retire checkpoints in one directory.

Modelled on Orbax's CheckpointManager. A checkpoint is written under a
temporary name (`.tmp-...`, invisible to listing), flushed, then renamed into
place: it is whole or it is not there. Retention runs only after a commit and
is a value (RetentionPolicy). Leftovers of a killed save are removed by
clean_temporaries(), which a run calls at start.

Layout of the directory:

    step-00000250/        adapters.safetensors, adapter_config.json, optimizer.safetensors,
                          trainer_state.json, config.json, manifest.json (written last)
    best, final           pointer files: the name of a step directory
    .tmp-*                work in progress or leftovers of a killed save
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx

from run_safety.errors import UserError, one_line

from run_safety.durable import (TEMP_PREFIX, aside_name, left_by_a_dead_process, commit_directory, copy_file_atomically, flush_dir,
                     free_space, make_dirs, open_regular_file, remove_leftover, write_text_atomically)
from .manifest import verify_checkpoint, write_manifest
from .retention import RetentionPolicy
from .state import ArrayWriteError, TrainingState, check_state, describe_error, read_state_files, write_state_files

STEP_DIR_PATTERN = re.compile(r"^step-(\d{8,})$")
EXPORTED_FILES = ("adapters.safetensors", "adapter_config.json")  # what mlx_lm.load(adapter_path=...) reads
BEST_POINTER = "best"
FINAL_POINTER = "final"
# A temporary name ends with the pid of the process that made it, so that a
# leftover can be told from the work of another process still running.
REPLACED_PATTERN = re.compile(r"^\.tmp-replaced-(step-\d{8,})-(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def print_to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class CheckpointSaveError(Exception):
    """A save failed; the previous checkpoints are untouched and no partial one is visible.

    Attributes: checkpoint (the directory name), parameter (the array whose
    write fails alone, or None), cause (the underlying exception).
    """

    def __init__(self, message: str, *, checkpoint: str, cause: BaseException, parameter: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.cause = cause
        self.parameter = parameter


class CheckpointCorruptError(Exception):
    """A checkpoint failed verification or could not be read back."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    valid: bool
    problem: str | None  # why it is invalid, naming the file; None when valid
    loss: float | None
    val_loss: float | None
    size_bytes: int
    is_best: bool
    is_final: bool


class CheckpointManager:
    def __init__(
        self,
        directory: Path,
        keep: int = 3,
        *,
        fsync: bool = True,
        warn: Callable[[str], None] = print_to_stderr,
        run_inputs: dict | None = None,
    ):
        self.directory = Path(directory)
        # What the run reads, by identity (training file, resolved model, initial adapters):
        # when given, stamped on every checkpoint as trainer_state.json's "inputs" and
        # compared on resume (checkpoints/resume.py).
        self.run_inputs = run_inputs
        self.retention = RetentionPolicy(keep_last=keep)
        self.fsync = fsync
        self.warn = warn
        self._protected: set[str] = set()  # directory names retention must not delete

    # ------------------------------------------------------------------ save

    def save(self, state: TrainingState, *, is_best: bool = False, is_final: bool = False) -> Path:
        """Commit `state` as checkpoints/step-NNNNNNNN/ and return its path.

        Raises TypeError for a state that cannot be serialized, a NaN or an
        infinity included (a bug: retrying would not help), and
        CheckpointSaveError when the file system fails (full disk, I/O error,
        permission): then the previous checkpoints are untouched and no
        temporary directory is left behind.
        """
        if self.run_inputs is not None:
            state = dataclasses.replace(state, trainer={**state.trainer, "inputs": self.run_inputs})
        check_state(state)
        name = checkpoint_dir_name(state.step)
        # One bulk evaluation: the writer then copies memory and computes nothing.
        mx.eval(list(state.adapters.values()) + list(state.optimizer.values()))

        final = self.directory / name
        temp = self.directory / f"{TEMP_PREFIX}{name}-{os.getpid()}"
        try:
            # Its name in the run folder durable before a checkpoint, a pointer or the run's
            # top-level copy of the adapters can name what is inside it.
            make_dirs(self.directory, fsync=self.fsync)
            remove_path(temp)  # our own leftover of an earlier failed attempt
            temp.mkdir()
            # Flushed all at once by the commit, each file and the folder.
            write_state_files(state, temp, fsync=False)
            write_manifest(temp, state.step, state.trainer, fsync=False)
            replaced = self._commit(temp, final)
        except (ArrayWriteError, OSError) as error:
            remove_path(temp, quiet=True)
            raise self._save_error(name, error) from error
        except BaseException:  # KeyboardInterrupt included: leave nothing half-made
            remove_path(temp, quiet=True)
            raise

        # Committed. What follows only bookkeeps: its failures are warned
        # about, never reported as a failed save.
        self._update_pointers(name, is_best=is_best, is_final=is_final, replaced=replaced)
        try:
            self._apply_retention(just_saved=name)
        except OSError as error:
            self.warn(f"retention after saving {name} failed: {describe_error(error)}")
        return final

    def _commit(self, temp: Path, final: Path) -> bool:
        """Flush `temp` and rename it to `final`; returns whether an existing `final` was replaced.

        An existing one (a resumed run saving the same step again) is renamed aside
        first and removed only after the new one is in place (durable.commit_directory).
        If we die in between, clean_temporaries() puts it back.
        """
        def unflushed(error: OSError) -> None:
            self.warn(f"checkpoint {final.name} is in place but flushing {self.directory} failed: "
                      f"{describe_error(error)}; it may not survive a power loss")

        aside = self.directory / f"{TEMP_PREFIX}replaced-{final.name}-{os.getpid()}"
        return commit_directory(temp, final, aside=aside, fsync=self.fsync, on_unflushed=unflushed)

    def _save_error(self, name: str, error: BaseException) -> CheckpointSaveError:
        parameter = None
        cause: BaseException = error
        if isinstance(error, ArrayWriteError):
            parameter, cause = error.parameter, error.cause
        message = f"could not save checkpoint {name} in {self.directory}: {error}"
        if not (isinstance(cause, OSError) and cause.errno is not None):
            # mlx reports a failed write without its reason; the free space often is it.
            message += f" ({free_space(self.directory)})"
        message += "; the previous checkpoints are untouched"
        return CheckpointSaveError(message, checkpoint=name, cause=cause, parameter=parameter)

    def mark_final(self, path: str | os.PathLike | CheckpointInfo) -> None:
        """Point `final` at an already committed checkpoint (the run ended on its state)."""
        self._update_pointers(as_path(path).name, is_best=False, is_final=True, replaced=False)

    def mark_best_step(self, step: int) -> None:
        """Point `best` at the committed checkpoint of `step`, if it is there and `best` names another."""
        name = checkpoint_dir_name(step)
        if (self.directory / name).is_dir() and self._read_pointer(BEST_POINTER) != name:
            self._update_pointers(name, is_best=True, is_final=False, replaced=False)

    def _update_pointers(self, name: str, *, is_best: bool, is_final: bool, replaced: bool) -> None:
        for pointer, flagged in ((BEST_POINTER, is_best), (FINAL_POINTER, is_final)):
            try:
                if flagged:
                    write_text_atomically(self.directory / pointer, name + "\n", fsync=self.fsync)
                elif replaced and self._read_pointer(pointer) == name:
                    # The directory it named now holds a different state.
                    (self.directory / pointer).unlink(missing_ok=True)
            except OSError as error:
                self.warn(f"could not update the '{pointer}' pointer to {name}: {describe_error(error)}")

    def _apply_retention(self, just_saved: str) -> None:
        doomed = self.retention.to_delete(self.checkpoints(deep=False), protected=self._protected,
                                          just_saved=just_saved)
        for info in doomed:
            # Out of sight first: a deletion cut short leaves a hidden
            # leftover, not a visible half checkpoint.
            hidden = self.directory / f"{TEMP_PREFIX}deleting-{info.path.name}-{os.getpid()}"
            try:
                os.rename(info.path, hidden)
            except OSError as error:
                self.warn(f"retention could not remove checkpoint {info.path} ({describe_error(error)}); "
                          f"it stays")
                continue
            remove_leftover(hidden, f"checkpoint {info.path.name} being deleted by retention", self.warn)
        if doomed and self.fsync:
            flush_dir(self.directory)

    # --------------------------------------------------------------- listing

    def checkpoints(self, deep: bool = True) -> list[CheckpointInfo]:
        """The committed checkpoints, oldest first, each verified against its manifest
        (`deep=False`: sizes only, not the SHA-256 of every file)."""
        if not self.directory.is_dir():
            return []
        best, final = self._read_pointer(BEST_POINTER), self._read_pointer(FINAL_POINTER)
        infos = []
        for entry in os.scandir(self.directory):
            match = STEP_DIR_PATTERN.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                infos.append(self._inspect(Path(entry.path), int(match[1]), best=best, final=final, deep=deep))
        return sorted(infos, key=lambda info: info.step)

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest valid checkpoint; each newer invalid one is named in a warning.

        Listed cheaply, then hashed newest first until one verifies: the older
        ones (gigabytes, for a big model) are not read at all.
        """
        for info in reversed(self.checkpoints(deep=False)):
            if info.valid:
                info = self._inspect_path(info.path)
            if info.valid:
                return info
            self.warn(f"skipping checkpoint {info.path.name} ({info.path}): {info.problem}")
        return None

    def best(self) -> CheckpointInfo | None:
        return self._pointed(BEST_POINTER)

    def has_any(self) -> bool:
        """Whether any committed checkpoint directory exists, valid or not."""
        return bool(self.checkpoints(deep=False))

    def final(self) -> CheckpointInfo | None:
        return self._pointed(FINAL_POINTER)

    def _pointed(self, pointer: str) -> CheckpointInfo | None:
        """The checkpoint a pointer names, verified in full; the others are not read."""
        name = self._read_pointer(pointer)
        path = self.directory / name if name is not None else None
        if path is None or path.is_symlink() or not path.is_dir():
            return None
        return self._inspect_path(path)

    def resolve(self, spec: str) -> CheckpointInfo:
        """`latest`, `best`, `final` or a path (absolute, relative, or a name inside the directory).

        Raises UserError with a one-line message when there is none or it is invalid.
        """
        if spec == "latest":
            info = self.latest_valid()
            if info is None:
                found = self.checkpoints()
                if not found:
                    raise UserError(f"no checkpoint to resume from in {self.directory}")
                raise UserError(
                    f"no valid checkpoint in {self.directory}: all {len(found)} failed verification "
                    f"(newest, {found[-1].path.name}: {one_line(found[-1].problem)})"
                )
            return info
        if spec in (BEST_POINTER, FINAL_POINTER):
            info = self.best() if spec == BEST_POINTER else self.final()
            if info is None:
                why = "no validation has improved yet" if spec == BEST_POINTER else "no run has finished here"
                raise UserError(f"no {spec} checkpoint in {self.directory} ({why})")
            if not info.valid:
                raise UserError(f"the {spec} checkpoint {info.path} is invalid: {one_line(info.problem)}")
            return info
        path = Path(spec).expanduser()
        if not path.exists() and not path.is_absolute() and (self.directory / spec).exists():
            path = self.directory / spec
        if not path.exists():
            raise UserError(f"checkpoint {spec} does not exist (expected 'latest', 'best' or a checkpoint directory)")
        if not path.is_dir():
            raise UserError(f"checkpoint {spec} is not a directory")
        info = self._inspect_path(path)
        if not info.valid:
            raise UserError(f"checkpoint {path} is invalid: {one_line(info.problem)}")
        return info

    def _inspect_path(self, path: Path) -> CheckpointInfo:
        """Inspect any checkpoint directory, ours or elsewhere."""
        match = STEP_DIR_PATTERN.match(path.name)
        expected_step = int(match[1]) if match else None
        ours = path.resolve().parent == self.directory.resolve()
        best = self._read_pointer(BEST_POINTER) if ours else None
        final = self._read_pointer(FINAL_POINTER) if ours else None
        return self._inspect(path, expected_step, best=best, final=final)

    def _inspect(self, path: Path, expected_step: int | None, *, best: str | None, final: str | None,
                 deep: bool = True) -> CheckpointInfo:
        manifest, problem = verify_checkpoint(path, expected_step, hash_contents=deep)
        step = expected_step if expected_step is not None else (manifest or {}).get("step", -1)
        return CheckpointInfo(
            path=path,
            step=step,
            valid=problem is None,
            problem=problem,
            loss=(manifest or {}).get("loss"),
            val_loss=(manifest or {}).get("val_loss"),
            size_bytes=directory_size(path),
            is_best=path.name == best,
            is_final=path.name == final,
        )

    def _read_pointer(self, pointer: str) -> str | None:
        try:
            with open_regular_file(self.directory / pointer) as handle:  # never a link or a FIFO
                name = handle.read(256).decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        # Only a step directory's name: never a path leading elsewhere.
        return name if STEP_DIR_PATTERN.match(name) else None

    # ------------------------------------------------------------------ load

    def load(self, path: str | os.PathLike | CheckpointInfo) -> TrainingState:
        """Verify the manifest, then read the state (safetensors and JSON only)."""
        path = as_path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {path}")
        match = STEP_DIR_PATTERN.match(path.name)
        manifest, problem = verify_checkpoint(path, int(match[1]) if match else None)
        if problem:
            raise CheckpointCorruptError(f"checkpoint {path} is corrupt: {problem}")
        try:
            state = read_state_files(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise CheckpointCorruptError(f"checkpoint {path} cannot be read: {describe_error(error)}") from error
        if state.step != manifest["step"]:
            raise CheckpointCorruptError(
                f"checkpoint {path} is corrupt: trainer_state.json says step {state.step}, "
                f"the manifest says {manifest['step']}"
            )
        return state

    # ------------------------------------------------------- run life cycle

    def export_adapters(self, path: str | os.PathLike | CheckpointInfo, destination: Path) -> None:
        """Copy a committed checkpoint's adapters (the files mlx_lm loads) into `destination`,
        each replaced atomically (a fresh temporary name, never through a link planted
        there). Raises OSError; the checkpoint itself holds the same adapters."""
        checkpoint = Path(path.path if isinstance(path, CheckpointInfo) else path)
        for name in EXPORTED_FILES:
            copy_file_atomically(checkpoint / name, Path(destination) / name)

    def check_room_like(self, checkpoint: Path) -> None:
        """UserError unless the file system has room for another checkpoint as large as
        `checkpoint` (and its adapters' copy at the top of the run)."""
        needed = directory_size(checkpoint) + (checkpoint / "adapters.safetensors").stat().st_size
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if free < needed:
            raise UserError(f"{self.directory}: {free / 1e6:,.1f} MB free, and a checkpoint of this run "
                            f"needs about {needed / 1e6:,.1f} MB; free some space and run the same command again "
                            f"(nothing was changed)")

    def protect(self, path: str | os.PathLike | CheckpointInfo) -> None:
        """Retention will never delete this checkpoint (the one this run resumed from)."""
        path = as_path(path)
        if path.resolve().parent == self.directory.resolve():
            self._protected.add(path.name)

    def move_aside(self, stamp: str | None = None) -> Path | None:
        """For --fresh: rename the directory to `<name>.old-<UTC time>`, the time given as
        `stamp` (what a fresh start moves aside together has one time) or now, in the one
        format of everything moved aside (durable.ASIDE_STAMP_FORMAT);
        never deletes.

        Returns the new location, or None when there was nothing to move.
        """

        if not self.directory.is_dir() or not any(self.directory.iterdir()):
            return None
        target = aside_name(self.directory, "old", stamp)
        os.rename(self.directory, target)
        if self.fsync:
            flush_dir(target.parent)
        self._protected.clear()
        return target

    def clean_temporaries(self) -> list[Path]:
        """Remove the leftovers of killed saves and deletions; returns what was removed.

        A checkpoint renamed aside to be replaced is put back only when its replacement
        never arrived: the save was killed between the two renames, so the replacement is
        still there under its temporary name. An aside without one is what stayed of a
        replacement that did arrive (its removal failed, or was cut short; the new one may
        since have gone by retention): it is removed like any leftover, never put back.
        Temporaries of another process that is still alive are left alone: it may be saving
        right now. A leftover that cannot be removed (chattr +i, a permission error) is a
        warning naming it, each time.
        """
        if not self.directory.is_dir():
            return []
        names = {entry.name for entry in os.scandir(self.directory)}
        removed = []
        for name in sorted(names):
            if not name.startswith(TEMP_PREFIX) or not left_by_a_dead_process(name):
                continue
            path = self.directory / name
            replaced = REPLACED_PATTERN.match(name)
            if replaced and not (self.directory / replaced[1]).exists():
                replacement = f"{TEMP_PREFIX}{replaced[1]}-{replaced[2]}"
                if replacement in names:  # killed between the two renames of a commit
                    os.rename(path, self.directory / replaced[1])
                    self.warn(f"restored checkpoint {replaced[1]}: a save replacing it was interrupted")
                    continue
            if remove_leftover(path, "leftover of an interrupted save or deletion", self.warn):
                removed.append(path)
        if removed and self.fsync:
            flush_dir(self.directory)
        return removed


# ----------------------------------------------------------------- helpers


def as_path(ref) -> Path:
    return ref.path if isinstance(ref, CheckpointInfo) else Path(ref)


def remove_path(path: Path, *, quiet: bool = False) -> None:
    """Remove a file or a directory tree if it exists; `quiet` for cleanup after an error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        if not quiet:
            raise


def directory_size(path: Path) -> int:
    total = 0
    try:
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


