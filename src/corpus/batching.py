"""Batches that waste little on padding and can be resumed at any position.

Each epoch is a permutation drawn from (seed, epoch). The permutation is cut
into windows of 32 batches; each window is sorted by length and cut into
batches, and the batches of the epoch are shuffled. So samples of similar
length share a batch (little padding) while the order stays random.

Batches are padded to one of a small fixed ladder of lengths, so the compiled
step is traced a bounded number of times. The last batch of an epoch is
filled up with empty rows (mask 0) rather than dropped, so every sample is
seen exactly once per epoch and the batch shape stays fixed.

The position in the data is a plain value (epoch, batch within the epoch):
the order of an epoch is a function of the seed, so resuming needs nothing
else and never reads the data before its position.

With several processes (mlx.launch), `--batch-size` is the global batch: the
order and the positions are the same for every world size, and each rank
collates only its own share of each batch's rows (`share`), so any world size
can compute where a run is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from corpus.index import CorpusIndex
from corpus.records import EncodedSample

SORT_WINDOW_BATCHES = 32


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # the next batch to read within the epoch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DataPosition":
        return cls(epoch=int(values["epoch"]), batch=int(values["batch"]))


@dataclass
class Batch:
    inputs: np.ndarray  # int32 [B, L]
    targets: np.ndarray  # int32 [B, L]
    mask: np.ndarray  # float32 [B, L], 1 on real target tokens
    indices: np.ndarray  # int64 [B], position in the index; -1 for a fill row
    auth_weight: np.ndarray  # float32 [B]
    prov_entropy: np.ndarray  # float32 [B]
    # The samples of the whole global batch this share belongs to (one process: its own real rows).
    batch_indices: np.ndarray | None = None
    processed: int = 0  # the input tokens of its samples (padding not counted), learned or context

    @property
    def real_rows(self) -> np.ndarray:
        return self.indices >= 0

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def padded_length(positions: int, max_positions: int) -> int:
    """The smallest rung of 16, 24, 32, 48, 64, 96, ... that holds `positions`."""
    rung = 16
    while rung < positions:
        rung = rung * 3 // 2 if rung & (rung - 1) == 0 else rung * 4 // 3
    return min(rung, max_positions)


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch, as arrays of sample positions."""
    rng = np.random.default_rng([seed, epoch])
    permutation = rng.permutation(len(lengths))
    window = batch_size * SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(permutation), window):
        chunk = permutation[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(index: CorpusIndex, positions: np.ndarray, batch_size: int, pad_id: int) -> Batch:
    """Read, pad and mask the samples at `positions` into a batch of `batch_size` rows."""
    samples: list[EncodedSample] = index.samples(positions) if len(positions) else []
    inputs, targets, mask = padded_rows(samples, batch_size, index.max_tokens - 1, pad_id)
    indices = np.full(batch_size, -1, dtype=np.int64)
    auth = np.zeros(batch_size, dtype=np.float32)
    entropy = np.zeros(batch_size, dtype=np.float32)
    for row, position in enumerate(positions):
        indices[row] = position
        auth[row] = index.auth_weight[position]
        entropy[row] = index.prov_entropy[position]
    return Batch(inputs, targets, mask, indices, auth, entropy, processed=sum(len(s.tokens) - 1 for s in samples))


def padded_rows(samples: list[EncodedSample], rows: int, max_positions: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask) of `samples`, one a row, `rows` rows (the rest fill rows, mask 0),
    padded to the ladder rung that holds the longest; the mask is 1 on the learned targets only."""
    # A share of only fill rows (the end of an epoch, several processes) is one short empty batch.
    width = padded_length(max((len(s.tokens) - 1 for s in samples), default=1), max_positions)
    inputs = np.full((rows, width), pad_id, dtype=np.int32)
    targets = np.full((rows, width), pad_id, dtype=np.int32)
    mask = np.zeros((rows, width), dtype=np.float32)
    for row, sample in enumerate(samples):
        tokens = np.asarray(sample.tokens, dtype=np.int32)
        n = len(tokens) - 1
        inputs[row, :n] = tokens[:-1]
        targets[row, :n] = tokens[1:]
        # target j is token j + 1: it counts where that token is learned (corpus.records.encode_record)
        for start, end in sample.learned:
            mask[row, max(start - 1, 0):max(end - 1, 0)] = 1.0
    return inputs, targets, mask


@dataclass(frozen=True)
class Share:
    """Which rows of each global batch this process takes: `rank` of `size` processes."""
    rank: int = 0
    size: int = 1

    def rows(self, batch_rows: np.ndarray, batch_size: int) -> np.ndarray:
        per_process = batch_size // self.size
        return batch_rows[self.rank * per_process:(self.rank + 1) * per_process]


def shared_batch(index: CorpusIndex, rows: np.ndarray, batch_size: int, pad_id: int, share: Share) -> Batch:
    """This process's share of the global batch `rows` (contiguous, disjoint across processes),
    padded to `batch_size / share.size` rows."""
    batch = collate(index, share.rows(rows, batch_size), batch_size // share.size, pad_id)
    batch.batch_indices = rows
    return batch


def training_batches(index: CorpusIndex, batch_size: int, seed: int, start: DataPosition, pad_id: int,
                     share: Share = Share()) -> Iterator[tuple[DataPosition, Batch]]:
    """Batches forever from `start`; each comes with the position after it. With
    several processes, `share` picks this process's rows of each global batch."""
    epoch, batch = start.epoch, start.batch
    while True:
        order = epoch_order(index.lengths, batch_size, seed, epoch)
        for i in range(batch, len(order)):
            following = DataPosition(epoch, i + 1) if i + 1 < len(order) else DataPosition(epoch + 1, 0)
            yield following, shared_batch(index, order[i], batch_size, pad_id, share)
        epoch, batch = epoch + 1, 0


def fixed_batches(index: CorpusIndex, batch_size: int, count: int, pad_id: int,
                  share: Share = Share()) -> list[Batch]:
    """The first `count` batches' worth of samples in file order, the same every
    time (so validation losses compare), sorted by length to cut padding."""
    first = np.arange(min(len(index), batch_size * count))
    positions = first[np.argsort(index.lengths[first], kind="stable")]
    return [shared_batch(index, positions[i:i + batch_size], batch_size, pad_id, share)
            for i in range(0, len(positions), batch_size)]
