"""An index of a JSONL corpus by byte offset: a few bytes per record.

Building it reads the file once, line by line, checking and tokenizing each
record (so bad data stops the run before the first step, and the length of
every sample is known for batching). A record without scores (an mlx-lm
record) is scored here, as prepare_data.py would score it; the index keeps the
scores. Training then reads samples by offset; with `in_memory=True`
(`--no-streaming`) the encoded samples are kept instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from corpus.prepare import check_load_time_metadata, load_time_scores, scored_from_text_alone
from corpus.records import EncodedSample, encode_records, has_scores, parse_record
from corpus.scoring import current_year
from run_safety.durable import open_regular_file, replace_file
from run_safety.file_identity import stat_key
from run_safety.input_files import open_input_file
from run_safety.json_files import json_text
from run_safety.errors import UserError


ENCODE_CHUNK = 1024
INDEX_FORMAT = 4  # 3: scores computed at load for records without them (and how many were); 4: how many from text alone
SCORER_FILES = ("scoring.py", "prepare.py")  # what computes them: part of the cache key
LEARNED_SAMPLES = 256  # the first samples over which a corpus is said to learn what it reads (learned_tokens)
COLUMN_TYPES = {"offsets": np.int64, "line_numbers": np.int64, "lengths": np.int32,
                "auth_weight": np.float32, "prov_entropy": np.float32, "source_type": np.int16}
NO_SOURCE_TYPE = -1  # the code of a record without a `source_type` string


@dataclass
class CorpusIndex:
    path: Path
    offsets: np.ndarray  # int64, byte offset of each kept record's line
    line_numbers: np.ndarray  # int64, 1-based, for messages
    lengths: np.ndarray  # int32, tokens after truncation
    auth_weight: np.ndarray  # float32
    prov_entropy: np.ndarray  # float32
    source_type: np.ndarray  # int16 code into `source_type_names`; NO_SOURCE_TYPE when absent
    max_tokens: int
    tokenizer: object = field(repr=False)
    truncated: int = 0  # samples cut to max_tokens
    no_target: list = field(default_factory=list)  # line numbers left out: nothing to learn after truncation
    in_memory: list | None = field(default=None, repr=False)
    file_size: int = -1  # when indexed
    file_stat: list = field(default_factory=list)  # file_identity.stat_key when indexed: a change stops a streaming run
    content_sha256: str | None = None  # the file's content the run started from, when known (see check_unchanged)
    source_type_names: list = field(default_factory=list)  # code -> the record's `source_type`, for reports
    scored_at_load: int = 0  # records that brought no scores: scored here, as prepare_data.py scores
    scored_from_text: int = 0  # of those, the ones with no metadata either: scored from their wording alone
    turns: str = "all"  # the assistant turns of chat records that are learned (corpus.chat_turns)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def bytes_per_record(self) -> float:
        return sum(getattr(self, name).itemsize for name in COLUMN_TYPES)

    def source_type_of(self, positions) -> list[str | None]:
        """The `source_type` of the records at these positions (None where a record has none)."""
        return [self.source_type_names[c] if c >= 0 else None for c in self.source_type[positions]]

    @classmethod
    def build(cls, path: str | Path, tokenizer, max_tokens: int, *, in_memory: bool = False,
              limit: int | None = None, cache_dir: Path | None = None, tokenizer_key: str = "",
              turns: str = "all") -> "CorpusIndex":
        """Index `path`; with `limit`, stop after that many usable records.

        With `cache_dir`, the index of a whole file is kept there, keyed by the
        file's content (its SHA-256), the tokenizer, `max_tokens` and `turns`
        (which chat turns are learned): a corpus of millions of records is then
        opened again in a second.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        file_stat = stat_key(os.stat(path))
        file_size = file_stat[2]
        cache_file = None
        if cache_dir is not None and limit is None:
            cache_file = Path(cache_dir) / f"index-{_cache_key(path, max_tokens, tokenizer_key, turns)}.safetensors"
            cached = _read_cache(cache_file)
            if cached is not None:
                index = cls(path=path, max_tokens=max_tokens, tokenizer=tokenizer, file_size=file_size,
                            file_stat=file_stat, turns=turns, **cached)
                if in_memory:
                    index.in_memory = index.samples(range(len(index)))
                return index
        # array.array keeps a column at its item size while it grows (a list of
        # Python numbers would cost ~40 bytes per value on a corpus of millions).
        columns = {name: array(np.dtype(kind).char) for name, kind in COLUMN_TYPES.items()}
        samples = [] if in_memory else None
        type_codes: dict[str, int] = {}  # source_type -> code, in order of first appearance
        truncated, no_target, scored_at_load, scored_from_text = 0, [], 0, 0
        pending = []  # (byte offset, line number, record), encoded a chunk at a time
        this_year = current_year()

        def flush():
            nonlocal truncated, scored_at_load, scored_from_text
            encoded = encode_records([record for _, _, record in pending], tokenizer, max_tokens, turns)
            for (start, line_number, record), sample in zip(pending, encoded):
                if limit is not None and len(columns["offsets"]) >= limit:
                    break
                if sample.learned_targets < 1:
                    no_target.append(line_number)
                    continue
                truncated += sample.truncated
                kind = record.get("source_type")
                code = type_codes.setdefault(kind, len(type_codes)) if isinstance(kind, str) else NO_SOURCE_TYPE
                if has_scores(record):
                    authority, entropy = record["auth_weight"], record["prov_entropy"]
                else:
                    authority, entropy = load_time_scores(record, f"{path}:{line_number}", this_year)
                    scored_at_load += 1
                    scored_from_text += scored_from_text_alone(record)
                for name, value in (("offsets", start), ("line_numbers", line_number), ("lengths", len(sample.tokens)),
                                    ("auth_weight", authority), ("prov_entropy", entropy),
                                    ("source_type", code)):
                    columns[name].append(value)
                if samples is not None:
                    samples.append(sample)
            pending.clear()

        for start, line_number, record in checked_records(path, tokenizer):
            pending.append((start, line_number, record))
            if len(pending) == ENCODE_CHUNK:
                flush()
                if limit is not None and len(columns["offsets"]) >= limit:
                    break
        flush()
        if not columns["offsets"]:
            if not no_target:  # not one record: empty, or blank lines only
                raise UserError(f"{path}: no records ({'the file is empty' if file_size == 0 else 'blank lines only'})")
            answers = "last answer" if turns == "last" else "answers"
            raise UserError(f"{path}: no usable sample: in every record what is learned (a chat's {answers}, a "
                            f"completion) lies past the first {max_tokens - 1} tokens, and truncation to "
                            f"--max-seq-length {max_tokens - 1} cut it off; raise --max-seq-length")
        arrays = {name: np.frombuffer(values, dtype=COLUMN_TYPES[name]).copy() for name, values in columns.items()}
        names = list(type_codes)
        index = cls(path=path, max_tokens=max_tokens, tokenizer=tokenizer, truncated=truncated,
                    no_target=no_target, in_memory=samples, file_size=file_size, file_stat=file_stat,
                    source_type_names=names, scored_at_load=scored_at_load, scored_from_text=scored_from_text,
                    turns=turns, **arrays)
        index.check_unchanged("while it was being indexed")  # else the index (and its cache) mixes two versions
        if cache_file is not None:
            _write_cache(cache_file, arrays, truncated, no_target, names, (scored_at_load, scored_from_text))
        return index

    def learned_tokens(self, first: int = LEARNED_SAMPLES) -> tuple[int, int, int]:
        """(tokens learned, tokens processed, samples counted) over the first `first` samples: what
        a corpus of chat or prompt + completion records learns of what it reads (text records: all)."""
        samples = self.samples(range(min(len(self), first)))
        return (sum(sample.learned_targets for sample in samples), sum(len(sample.tokens) - 1 for sample in samples),
                len(samples))

    def samples(self, indices) -> list[EncodedSample]:
        """Encoded samples at these positions of the index (one file open)."""
        if self.in_memory is not None:
            return [self.in_memory[i] for i in indices]
        # Streaming reads by offset: a file rewritten under a run would feed it other lines.
        self.check_unchanged("during the run (it is read by offset)")
        records = []
        with open(self.path, "rb") as handle:
            for i in indices:
                handle.seek(int(self.offsets[i]))
                records.append(parse_record(handle.readline(), str(self.path), int(self.line_numbers[i])))
        return encode_records(records, self.tokenizer, self.max_tokens, self.turns)


    def check_unchanged(self, when: str) -> None:
        """UserError when the file is no longer the version indexed. One stat per batch read
        (about a microsecond beside the milliseconds of reading and tokenizing it): any change
        of device, inode, size, modification or change time shows (a same-size rewrite,
        `sed -i`, `touch -r`, a file renamed over it). When only those moved and the size did
        not, and the content the run started from is known (`content_sha256`), the file is
        read once to compare: a `touch`, a `chmod`, a tool setting an extended attribute or
        the same bytes copied over it do not stop an overnight run."""
        try:
            now = stat_key(os.stat(self.path))
        except OSError as exc:
            now = [exc.strerror]
        if now == self.file_stat:
            return
        if len(now) < 5:
            what = f"it cannot be read now ({now[0]})"
        elif now[2] != self.file_stat[2]:
            what = f"{self.file_stat[2]:,} bytes then, {now[2]:,} now"
        elif self.content_sha256 is not None:
            from run_safety.file_identity import file_sha256, hash_cache

            if file_sha256(self.path, hash_cache())["sha256"] == self.content_sha256:
                self.file_stat = now  # the same bytes: the offsets still hold
                return
            what = "same size, other content" + (", another file at its name" if now[:2] != self.file_stat[:2] else "")
        elif now[:2] != self.file_stat[:2]:
            what = "another file is at its name now"
        else:
            what = "rewritten in place, same size" if now[3] != self.file_stat[3] else \
                "its change time moved (an edit that kept its modification time, or only a chmod)"
        raise UserError(f"{self.path}: the file changed {when}: {what}; restore it, or start anew with --fresh")


def checked_records(path: str | Path, tokenizer):
    """(byte offset, line number, record) for each non-blank line, checked: the one reading
    loop of the index and of the start-of-run check. UserError naming FILE:LINE at the first
    bad line, or a chat record for a tokenizer without a chat template."""
    path = Path(path)
    template = bool(getattr(tokenizer, "chat_template", None))
    handle = open_input_file(path, "the data file")
    offset = 0
    with handle:
        for line_number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            record = parse_record(line, str(path), line_number)
            if "messages" in record and not template:
                raise UserError(f"{path}:{line_number}: chat 'messages' need a model with a chat template, "
                                f"and this model's tokenizer has none (use 'text' or 'prompt' + 'completion')")
            yield start, line_number, record


def check_records(path: str | Path, tokenizer) -> tuple[int, int]:
    """Check every record of a JSONL file as the index will read it, in one streaming
    pass that keeps nothing (memory stays flat whatever the file's size): UserError at
    the first bad line, naming FILE:LINE. Returns (records, records without scores)."""
    path = Path(path)
    records = unscored = 0
    this_year = current_year()
    for _, line_number, record in checked_records(path, tokenizer):
        if not has_scores(record):
            check_load_time_metadata(record, f"{path}:{line_number}", this_year)
            unscored += 1
        records += 1
    if not records:
        raise UserError(f"{path}: empty file (no samples)")
    return records, unscored


def content_signature(path: Path, edge_bytes: int = 1 << 20) -> dict:
    """Size and SHA-256 of the first and last MiB: what a resume compares to tell
    the same corpus from another (hashing a corpus of many GB at each start
    would cost more than it could catch)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(edge_bytes))
        if size > edge_bytes:
            handle.seek(max(size - edge_bytes, edge_bytes))
            digest.update(handle.read())
    return {"size": size, "sha256_of_ends": digest.hexdigest()}


def _cache_key(path: Path, max_tokens: int, tokenizer_key: str, turns: str) -> str:
    # The file's content (SHA-256, read once per version of the file: file_identity), not its
    # size and times: an edit that keeps those (touch -r, cp -p, rsync -a) is another index,
    # a chmod or a touch is not (rebuilding a million records' index takes minutes).
    from run_safety.file_identity import file_sha256, hash_cache

    blob = json.dumps([INDEX_FORMAT, str(path.resolve()), file_sha256(path, hash_cache())["sha256"], max_tokens,
                       tokenizer_key, _scorer_key(), turns])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scorer_key() -> str:
    """The scorer's own source: scores computed at load are cached, so a changed scorer
    must not reuse them."""
    digest = hashlib.sha256()
    for name in SCORER_FILES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def _checksum(columns: dict, truncated: int, no_target: list, source_type_names: list, scored: tuple) -> str:
    """SHA-256 of everything the cache holds, so that a flipped bit is found, not trained on."""
    digest = hashlib.sha256()
    for name, kind in COLUMN_TYPES.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(columns[name], dtype=kind).tobytes())
    digest.update(json.dumps([int(truncated), [int(n) for n in no_target], source_type_names,
                              [int(n) for n in scored]]).encode())
    return digest.hexdigest()


def _read_cache(cache_file: Path) -> dict | None:
    """The cached columns, or None when absent, unreadable or failing its checksum (then it is rebuilt)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        with open_regular_file(cache_file) as handle:  # never through a link
            blob = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _rejected(cache_file, f"cannot be read ({exc.strerror or exc})")
    try:
        arrays = load(blob)
        metadata = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")]).get("__metadata__") or {}
        names = json.loads(metadata.get("source_type_names", "null"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return _rejected(cache_file, "has no list of source types")
        columns = {name: arrays[name].astype(kind, copy=False) for name, kind in COLUMN_TYPES.items()}
        truncated, no_target = int(arrays["truncated"][0]), arrays["no_target"].tolist()
        scored = (int(metadata["scored_at_load"]), int(metadata["scored_from_text"]))
    except (KeyError, ValueError, IndexError, TypeError, SafetensorError, RecursionError) as exc:
        return _rejected(cache_file, f"is not a valid index ({type(exc).__name__})")
    if metadata.get("sha256") != _checksum(columns, truncated, no_target, names, scored):
        return _rejected(cache_file, "fails its checksum (changed since it was written)")
    # The checksum is no signature: a file rewritten with a matching one must still be usable.
    codes = columns["source_type"]
    if len(codes) and int(codes.max()) >= len(names):
        return _rejected(cache_file, "names a source type it does not list")
    return {**columns, "truncated": truncated, "no_target": no_target, "source_type_names": names,
            "scored_at_load": scored[0], "scored_from_text": scored[1]}


def _rejected(cache_file: Path, why: str) -> None:
    print(f"note: index cache {cache_file} {why}; rebuilding it from the data", file=sys.stderr)
    return None


def _write_cache(cache_file: Path, columns: dict, truncated: int, no_target: list, source_type_names: list,
                 scored: tuple) -> None:
    """Best effort: a cache that cannot be written only costs the next start its time.
    Replaced atomically under a fresh name (never through a link), nothing left half-written.
    `scored`: (records scored at load, of them scored from their text alone)."""
    from safetensors.numpy import save

    arrays = dict(columns, truncated=np.asarray([truncated], dtype=np.int64),
                  no_target=np.asarray(no_target, dtype=np.int64))
    metadata = {"source_type_names": json_text(source_type_names), "scored_at_load": str(int(scored[0])),
                "scored_from_text": str(int(scored[1])),
                "sha256": _checksum(columns, truncated, no_target, source_type_names, scored)}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        blob = save(arrays, metadata=metadata)
        replace_file(cache_file, lambda handle: handle.write(blob))
    except OSError:
        pass
