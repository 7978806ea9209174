"""The processes of one run: one, or several started by `mlx.launch`.

MLX's own distributed layer does the transport (`mx.distributed`: the ring
backend over Ethernet, Thunderbolt or loopback; MPI; NCCL on CUDA). This module
is the little the training loop needs on top of it:

- `rank` and `size`, and whether this process writes (rank 0 alone does);
- `average` of a gradient tree inside the compiled step (mlx.nn's
  `average_gradients`, which packs small arrays into few all-sums) and `sum`
  of a small vector of step figures;
- `broadcast_*` from rank 0 (the resume point, whether a save worked), done
  as an all-sum to which the other ranks add zeros, so every rank holds the
  same bytes and takes the same decision.

Every collective must be called by every rank in the same order, or the ranks
wait on each other for ever: the trainer calls them at points that follow
from the step alone (each step, each validation, each checkpoint), never from
a rank's own state.

A rank that dies closes its connections: the others' next collective raises
(measured on loopback with the ring backend: within a second), and
`mlx.launch` terminates the rest when one exits with an error.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from run_safety.errors import UserError, error_line


class PeerLost(Exception):
    """A collective failed: another process of the group has died or cannot be reached."""

    def __init__(self, cause: str):
        super().__init__(f"lost contact with the other processes ({cause}); the newest committed checkpoint is "
                         f"intact: run the same mlx.launch command with --auto-resume to continue")
        # Said already (by the trainer, while its signal guard still holds: mlx.launch
        # terminates the survivors soon after one process dies).
        self.reported = False


class ReportedByRankZero(UserError):
    """The error rank 0 met and has printed; every rank stops with it (exit 2), saying nothing more."""


class ProcessGroup:
    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @classmethod
    def from_environment(cls) -> "ProcessGroup":
        """The group `mlx.launch` (or mpirun) started this process in; one process without.

        mlx.launch sets MLX_RANK for each process (and the backend's own settings:
        MLX_HOSTFILE for the ring, empty when it starts a single process); mpirun
        sets its own world size. A plain `python src/train_qlora.py` has none of
        them. Once launched, MLX's layer must start: silently training alone in
        each process would give N runs that overwrite each other's files.
        """
        launched = os.environ.get("MLX_RANK") is not None or \
            any(_whole_number(os.environ.get(name)) > 1 for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
        if not launched or _names_no_hosts(os.environ.get("MLX_HOSTFILE")):
            return cls()
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as exc:
            raise UserError(f"this process was started as one of several (MLX_RANK={os.environ.get('MLX_RANK')}) "
                            f"but MLX's distributed layer could not start: {exc}") from None
        return cls(group) if group.size() > 1 else cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes to the output dir and the terminal."""
        return self.rank == 0

    # -- inside the compiled step ---------------------------------------------

    def average(self, tree):
        """The mean of a tree of arrays over the ranks (the tree itself for one process)."""
        return nn.average_gradients(tree, self.group) if self.distributed else tree

    def sum(self, array: mx.array) -> mx.array:
        return mx.distributed.all_sum(array, group=self.group) if self.distributed else array

    # -- from rank 0 to all ---------------------------------------------------

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (the others pass None)."""
        if not self.distributed:
            return data
        length = self._broadcast_array(mx.array([len(data) if self.is_writer else 0], dtype=mx.int32))
        size = int(length.item())
        mine = np.frombuffer(data, dtype=np.uint8) if self.is_writer else np.zeros(size, dtype=np.uint8)
        # uint8 would overflow nothing (the others add zeros), but int32 is what every backend sums.
        received = self._broadcast_array(mx.array(mine.astype(np.int32)))
        return np.asarray(received).astype(np.uint8).tobytes()

    def broadcast_json(self, value=None):
        """Rank 0's JSON-able `value` on every rank."""
        if not self.distributed:
            return value
        data = json.dumps(value).encode("utf-8") if self.is_writer else None
        return json.loads(self.broadcast_bytes(data).decode("utf-8"))

    def broadcast_arrays(self, arrays: dict[str, mx.array], like: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rank 0's `arrays` on every rank; the others pass `like` (same names, shapes and dtypes)."""
        if not self.distributed:
            return arrays
        received = {name: self.sum(arrays[name] if self.is_writer else mx.zeros_like(like[name]))
                    for name in sorted(like)}
        self._collect(list(received.values()))  # one evaluation for them all
        return received

    def _broadcast_array(self, array: mx.array) -> mx.array:
        return self._collect(self.sum(array if self.is_writer else mx.zeros_like(array)))

    @staticmethod
    def _collect(result):
        try:
            mx.eval(result)
        except RuntimeError as exc:
            raise PeerLost(str(exc)) from None
        return result

    def on_writer(self, work):
        """`work()` on rank 0 alone (its result stays there); a UserError it raises stops
        every rank: rank 0 prints it first, so that no other rank's exit makes mlx.launch
        terminate rank 0 before it has said why."""
        if not self.distributed:
            return work()
        result = error = None
        if self.is_writer:
            try:
                result = work()
            except UserError as exc:
                error = str(exc)
                print(error_line(exc), file=sys.stderr, flush=True)
        error = self.broadcast_json(error)
        if error is not None:
            raise ReportedByRankZero(error)
        return result

    def gather_rows(self, values: np.ndarray, positions: np.ndarray, count: int) -> np.ndarray:
        """Every rank's `values` at their `positions` in an array of `count` (each position
        is filled by one rank, the others add zeros: the values arrive exactly)."""
        full = np.zeros(count, dtype=np.float32)
        full[positions] = values
        return np.asarray(self._collect(self.sum(mx.array(full)))) if self.distributed else full

    def check_same(self, what: str, value: str) -> None:
        """Raise UserError on every rank unless `value` is the same on all of them
        (a hostfile run whose machines hold different data or settings)."""
        if not self.distributed:
            return
        digest = np.frombuffer(_sha256(value), dtype=np.uint8).astype(np.int32)
        mine = mx.array(digest)
        total = self._collect(self.sum(mine))
        # If every rank sees the sum as `size` times its own digest, all digests are equal.
        differs = self._collect(self.sum(mx.array([0 if bool(mx.all(total == self.size * mine).item()) else 1])))
        if int(differs.item()):
            raise UserError(f"the {self.size} processes do not agree on {what}: every machine of an mlx.launch "
                            f"run needs the same files and settings")


def _whole_number(text: str | None) -> int:
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return 0


def _names_no_hosts(hostfile: str | None) -> bool:
    """mlx.launch -n 1 hands the ring an empty hostfile: one process, nothing to connect."""
    if not hostfile:
        return False
    try:
        with open(hostfile, encoding="utf-8") as handle:
            return not handle.read().strip()
    except OSError:
        return False


def _sha256(text: str) -> bytes:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).digest()
