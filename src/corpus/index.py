"""An index of a JSONL corpus by byte offset: a few bytes per record.

Building it reads the file once, line by line, checking and tokenizing each
record (so bad data stops the run before the first step, and the length of
every sample is known for batching). Training then reads samples by offset;
with `in_memory=True` (`--no-streaming`) the encoded samples are kept instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corpus.records import EncodedSample, encode_record, parse_record
from errors import UserError


@dataclass
class CorpusIndex:
    path: Path
    offsets: np.ndarray  # int64, byte offset of each kept record's line
    line_numbers: np.ndarray  # int64, 1-based, for messages
    lengths: np.ndarray  # int32, tokens after truncation
    auth_weight: np.ndarray  # float32
    prov_entropy: np.ndarray  # float32
    max_tokens: int
    tokenizer: object = field(repr=False)
    truncated: int = 0  # samples cut to max_tokens
    no_target: list = field(default_factory=list)  # line numbers left out: nothing to learn after truncation
    in_memory: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def bytes_per_record(self) -> float:
        arrays = (self.offsets, self.line_numbers, self.lengths, self.auth_weight, self.prov_entropy)
        return sum(a.itemsize for a in arrays)

    @classmethod
    def build(cls, path: str | Path, tokenizer, max_tokens: int, *, in_memory: bool = False,
              limit: int | None = None) -> "CorpusIndex":
        """Index `path`; with `limit`, stop after that many usable records."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        offsets, line_numbers, lengths, auth, entropy = [], [], [], [], []
        samples = [] if in_memory else None
        truncated = 0
        no_target = []
        offset = 0
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror})") from None
        with handle:
            for line_number, line in enumerate(handle, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                record = parse_record(line, str(path), line_number)
                sample = encode_record(record, tokenizer, max_tokens)
                if len(sample.tokens) - max(sample.prompt_length, 1) < 1:
                    no_target.append(line_number)
                    continue
                truncated += sample.truncated
                offsets.append(start)
                line_numbers.append(line_number)
                lengths.append(len(sample.tokens))
                auth.append(record["auth_weight"])
                entropy.append(record["prov_entropy"])
                if samples is not None:
                    samples.append(sample)
                if limit is not None and len(offsets) >= limit:
                    break
        if not offsets:
            if offset == 0:
                raise UserError(f"{path}: empty file (no samples)")
            raise UserError(f"{path}: no usable sample (every record was empty after truncation to {max_tokens} tokens)")
        return cls(
            path=path,
            offsets=np.asarray(offsets, dtype=np.int64),
            line_numbers=np.asarray(line_numbers, dtype=np.int64),
            lengths=np.asarray(lengths, dtype=np.int32),
            auth_weight=np.asarray(auth, dtype=np.float32),
            prov_entropy=np.asarray(entropy, dtype=np.float32),
            max_tokens=max_tokens,
            tokenizer=tokenizer,
            truncated=truncated,
            no_target=no_target,
            in_memory=samples,
        )

    def samples(self, indices) -> list[EncodedSample]:
        """Encoded samples at these positions of the index (one file open)."""
        if self.in_memory is not None:
            return [self.in_memory[i] for i in indices]
        out = []
        with open(self.path, "rb") as handle:
            for i in indices:
                handle.seek(int(self.offsets[i]))
                line = handle.readline()
                record = parse_record(line, str(self.path), int(self.line_numbers[i]))
                out.append(encode_record(record, self.tokenizer, self.max_tokens))
        return out


def file_signature(path: Path) -> dict:
    """Size and modification time: enough to notice a corpus replaced between runs."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
