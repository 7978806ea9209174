"""The serialized training state and its files inside a checkpoint directory.

Everything a resumed run needs, as safetensors (arrays) and JSON (the rest):
nothing here can execute code when read back (no pickle anywhere).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from run_safety.durable import flush_fd, open_regular_file
from run_safety.json_files import json_text

# The files of a checkpoint. adapters.safetensors + adapter_config.json are the
# mlx-lm adapter format, so `mlx_lm.load(model, adapter_path=checkpoint_dir)`
# works on a checkpoint directly.
ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
STATE_FILES = (ADAPTERS_FILE, ADAPTER_CONFIG_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, CONFIG_FILE)


@dataclass
class TrainingState:
    step: int  # optimizer steps done
    adapters: dict[str, mx.array]  # flat mlx-lm adapter names -> arrays
    optimizer: dict[str, mx.array]  # dict(tree_flatten(optimizer.state))
    trainer: dict = field(default_factory=dict)  # JSON-able loop state (data position, early stopping, ...)
    config: dict = field(default_factory=dict)  # the run config, JSON-able
    fingerprint: str = ""  # hash of the result-changing config fields
    adapter_config: dict = field(default_factory=dict)  # mlx-lm adapter_config.json


class ArrayWriteError(Exception):
    """Writing a safetensors file failed; `parameter` names the array that fails alone, if one does."""

    def __init__(self, file_name: str, cause: BaseException, parameter: str | None = None):
        self.file_name = file_name
        self.cause = cause
        self.parameter = parameter
        where = f"parameter {parameter!r} in {file_name}" if parameter else file_name
        super().__init__(f"writing {where} failed: {describe_error(cause)}")


def describe_error(error: BaseException) -> str:
    """`[Errno 28] No space left on device` for OS errors, the message otherwise."""
    if isinstance(error, OSError) and error.errno is not None:
        return f"[Errno {error.errno}] {error.strerror or os.strerror(error.errno)}"
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------- validation
#
# A bad value is rejected before anything is written, with the key that holds
# it: a TypeError, because it is a bug in the caller that retrying at the next
# interval would not fix.


def check_state(state: TrainingState) -> None:
    if isinstance(state.step, bool) or not isinstance(state.step, int) or state.step < 0:
        raise TypeError(f"TrainingState.step must be an int >= 0, got {state.step!r}")
    for group in ("adapters", "optimizer"):
        arrays = getattr(state, group)
        if not isinstance(arrays, dict):
            raise TypeError(f"TrainingState.{group} must be a dict of name -> mx.array, got {type(arrays).__name__}")
        for name, value in arrays.items():
            if not isinstance(name, str):
                raise TypeError(f"TrainingState.{group}: key {name!r} is not a string")
            if not isinstance(value, mx.array):
                raise TypeError(
                    f"TrainingState.{group}[{name!r}] is a {type(value).__name__}, not an mx.array: "
                    "only arrays go into safetensors (put other values in TrainingState.trainer)"
                )
    if not isinstance(state.fingerprint, str):
        raise TypeError(f"TrainingState.fingerprint must be a str, got {type(state.fingerprint).__name__}")
    for group in ("trainer", "config", "adapter_config"):
        value = getattr(state, group)
        if not isinstance(value, dict):
            raise TypeError(f"TrainingState.{group} must be a dict, got {type(value).__name__}")
        check_json_value(value, f"TrainingState.{group}")


def check_json_value(value, where: str) -> None:
    """Accept only what JSON gives back unchanged: dict with str keys, list, str, int, finite
    float, bool, None.

    Tuples, numpy scalars and int keys would come back as something else (a
    list, an error, a str key), so a resumed run would differ; refuse them
    here, at the first save, rather than at a resume hours later. NaN and
    infinity are refused too (json_files' rule: standard JSON has no token for
    them): whoever owns a value that may be non-finite encodes it, as null.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError(f"{where} is {value}, which standard JSON cannot hold: its owner must encode it "
                        f"(null, saying what null means there)")
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; JSON keys must be strings")
            check_json_value(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_json_value(item, f"{where}[{i}]")
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    if isinstance(value, mx.array):
        hint = " (arrays belong in TrainingState.adapters or .optimizer)"
    elif type(value).__module__ == "numpy":
        hint = " (convert with int() / float() / .tolist())"
    raise TypeError(f"{where} is a {type(value).__name__}, which does not round-trip through JSON{hint}")


# ------------------------------------------------------------------- writing


def write_state_files(state: TrainingState, directory: Path, *, fsync: bool = True) -> None:
    """Write the state's files into `directory` (which exists and is empty).

    The caller has run check_state and evaluated every array. Raises
    ArrayWriteError for a failing safetensors file, OSError for the rest.
    """
    write_arrays(directory / ADAPTERS_FILE, state.adapters, fsync=fsync)
    write_arrays(directory / OPTIMIZER_FILE, state.optimizer, fsync=fsync)
    write_json(directory / ADAPTER_CONFIG_FILE, state.adapter_config, fsync=fsync)
    # Nested, so that a "step" key of the trainer's own cannot collide with ours.
    write_json(directory / TRAINER_STATE_FILE, {"step": state.step, "trainer": state.trainer}, fsync=fsync)
    write_json(directory / CONFIG_FILE, {"config": state.config, "fingerprint": state.fingerprint}, fsync=fsync)


def write_arrays(path: Path, arrays: dict[str, mx.array], *, fsync: bool = True) -> None:
    """One safetensors file in one write; if that fails, find the array that fails alone.

    Written through a Python file object: then an OS failure surfaces as an
    OSError with its errno ("No space left on device") rather than mlx's
    generic "Unable to write", and we hold the descriptor to flush.
    """
    try:
        save_safetensors_file(path, arrays, fsync=fsync)
    except OSError as error:
        if error.filename is not None:  # open() itself failed: no array is to blame
            raise ArrayWriteError(path.name, error) from error
        bulk_error = error
    except (RuntimeError, ValueError) as error:
        bulk_error = error
    else:
        return
    path.unlink(missing_ok=True)
    # Blame an array only if it fails alone while another one writes: when
    # every array fails (a full disk, a dead drive) none of them is the cause.
    probe = path.with_name(f".probe-{path.name}")
    first_failure, any_written = None, False
    for name, array in arrays.items():
        try:
            save_safetensors_file(probe, {name: array}, fsync=False)
            any_written = True
        except (OSError, RuntimeError, ValueError) as error:
            first_failure = first_failure or (name, error)
        finally:
            probe.unlink(missing_ok=True)
        if first_failure and any_written:
            break
    if first_failure and (any_written or len(arrays) == 1):
        name, error = first_failure
        raise ArrayWriteError(path.name, error, parameter=name) from bulk_error
    raise ArrayWriteError(path.name, bulk_error) from bulk_error


def save_safetensors_file(path: Path, arrays: dict[str, mx.array], *, fsync: bool) -> None:
    with open(path, "wb") as f:
        mx.save_safetensors(f, arrays)
        f.flush()
        if fsync:
            flush_fd(f.fileno())


def write_json(path: Path, value: dict, *, fsync: bool = True) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json_text(value, indent=2, sort_keys=True) + "\n")
        f.flush()
        if fsync:
            flush_fd(f.fileno())


# ------------------------------------------------------------------- reading


def read_state_files(directory: Path) -> TrainingState:
    """Read a checkpoint's files back (safetensors and JSON only). The caller verified them."""
    trainer_file = read_json(directory / TRAINER_STATE_FILE)
    config_file = read_json(directory / CONFIG_FILE)
    return TrainingState(
        step=trainer_file["step"],
        adapters=read_arrays(directory / ADAPTERS_FILE),
        optimizer=read_arrays(directory / OPTIMIZER_FILE),
        trainer=trainer_file["trainer"],
        config=config_file["config"],
        fingerprint=config_file["fingerprint"],
        adapter_config=read_json(directory / ADAPTER_CONFIG_FILE),
    )


def read_arrays(path: Path) -> dict[str, mx.array]:
    return mx.load(str(path), format="safetensors")


def read_json(path: Path) -> dict:
    """Lenient: the NaN / Infinity of checkpoints written by earlier versions read back as floats."""
    with open_regular_file(path) as f:
        value = json.loads(f.read().decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds a {type(value).__name__}, not an object")
    return value

