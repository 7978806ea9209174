"""Raw records -> scored, deduplicated, split `train.jsonl` / `val.jsonl`.

Input: a JSONL file, a `.txt` file (one document), or a folder of them (read
recursively, in sorted order so the output never depends on the file system).

Two passes keep memory small (a few dozen bytes per record, not the records):
pass 1 reads, checks, scores and writes each usable record as its final JSON
line to a staging file beside the output, keeping only two 64-bit text hashes,
the source type and the scores per record; duplicates and the split are then
decided on those arrays; pass 2 copies the kept lines into `train.jsonl` and
`val.jsonl`, each written to a temporary file, fsynced and renamed into place.
The staging file and the temporaries end in their writer's pid
(`.staging.XXXXXXXX.tmp-PID`): those of a run that was killed are removed by
the next run once their writer is gone, as the model builds' scratch is.

A bad record is skipped with a warning `FILE:LINE: problem`; with `strict` the
first one raises UserError with that line. Nothing already in the output folder
is touched unless the whole run succeeds (and, for existing files, `force`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from corpus import scoring
from corpus.records import SCORE_FIELDS, messages_problem, scores_problem, short_repr
from training.distrust import distrust_scores
from run_safety.durable import flush_dir, flush_fd, free_space, left_by_a_dead_process, open_regular_file, remove_leftover
from run_safety.errors import UserError
from run_safety.json_files import json_text

CONTENT_FIELDS = ("text", "messages", "prompt", "completion")
# The fields of a record the scorer reads besides its text (src/corpus/scoring.py).
SCORER_METADATA = ("source_type", "year", "publisher", "institution", "citation_count", "url", "evidence")
SCORE_DECIMALS = 4  # rounded so the bytes do not depend on the last bit of a libm
DOMINANT_SHARE = 0.8  # warn when one source type is more than this share of the records
WARNINGS_KEPT = 200  # warnings kept verbatim; the rest are only counted by reason
TRAIN_FILE, VAL_FILE = "train.jsonl", "val.jsonl"
EXPLAIN_ALPHA = 2.7  # --explain shows each record's distrust score d at the default alpha
INFERRED_MARK = "source_type_inferred"  # written beside a source_type the scorer inferred from the text
# The staging file and the temporaries of train.jsonl and val.jsonl: .<name>.<random>.tmp-<writer's pid>.
TEMPORARY_NAME = re.compile(r"\.(?:staging|train\.jsonl|val\.jsonl)\.[a-z0-9_]+\.tmp-\d+")


@dataclass(frozen=True)
class Skip:
    where: str  # "FILE:LINE" or "FILE"
    reason: str  # short, for the summary ("invalid JSON", "no text", ...)
    detail: str  # the full problem, for the warning line

    def message(self) -> str:
        return f"{self.where}: {self.detail}"


@dataclass(frozen=True)
class RawRecord:
    where: str
    fields: dict


@dataclass
class SourceTypeStats:
    count: int
    train: int
    val: int
    auth: tuple[float, float, float, float]  # min, median, mean, max
    entropy: tuple[float, float, float, float]


@dataclass
class PrepareResult:
    train_path: Path
    val_path: Path | None
    records_read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    warnings: list[str] = field(default_factory=list)  # the first WARNINGS_KEPT, verbatim
    exact_duplicates: int = 0
    near_duplicates: int = 0
    rescored: int = 0  # scored here (not carried over from the input)
    train_count: int = 0
    val_count: int = 0
    by_source_type: dict[str, SourceTypeStats] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


# ---------------------------------------------------------------- reading


def list_input_files(input_path: Path) -> tuple[list[Path], list[Path]]:
    """(files to read, files ignored): the file itself, or a folder's `.jsonl` / `.txt`
    files, recursively, in sorted order."""
    if input_path.is_file():
        return [input_path], []  # a file named on purpose is read as JSONL unless it ends in .txt
    if not input_path.exists():
        from run_safety.input_files import dangling_link_above

        raise UserError(f"{input_path}: no such file or folder{dangling_link_above(input_path)}")
    if not input_path.is_dir():
        raise UserError(f"{input_path}: not a file or folder")
    wanted, ignored = [], []
    for path in sorted(p for p in input_path.rglob("*") if p.is_file() or p.is_symlink()):
        if any(part.startswith(".") for part in path.relative_to(input_path).parts):
            continue  # hidden files and folders (.git, editor swap files)
        (wanted if path.suffix.lower() in (".jsonl", ".txt") else ignored).append(path)
    if not wanted:
        raise UserError(f"{input_path}: no .jsonl or .txt files in this folder")
    return wanted, ignored


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_raw_records(path: Path) -> Iterator[RawRecord | Skip]:
    """Each record of one file, or a Skip saying why a line (or the file) could not be used."""
    try:
        handle = open_regular_file(path, follow_links=True)  # a FIFO (or a link to one) would block
    except OSError as exc:
        yield Skip(str(path), "unreadable file", f"cannot read file ({exc.strerror or exc})")
        return
    with handle:
        if path.suffix.lower() == ".txt":
            yield from _read_text_document(path, handle)
            return
        empty = True
        try:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                empty = False
                yield _parse_json_line(line, f"{path}:{line_number}")
        except OSError as exc:
            yield Skip(str(path), "unreadable file", f"cannot read file ({exc.strerror or exc})")
            return
        if empty:
            yield Skip(str(path), "empty file", "empty file")


def _read_text_document(path: Path, handle) -> Iterator[RawRecord | Skip]:
    where = f"{path}:1"
    try:
        text = handle.read().decode("utf-8")
    except OSError as exc:
        yield Skip(str(path), "unreadable file", f"cannot read file ({exc.strerror or exc})")
        return
    except UnicodeDecodeError as exc:
        yield Skip(where, "not UTF-8", f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return
    yield RawRecord(where, {"text": text.lstrip("\ufeff")})


def _parse_json_line(line: bytes, where: str) -> RawRecord | Skip:
    try:
        fields = json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return Skip(where, "invalid JSON", f"invalid JSON ({exc.msg} at column {exc.colno})")
    except UnicodeDecodeError as exc:
        return Skip(where, "not UTF-8", f"not valid UTF-8 ({exc.reason})")
    except (ValueError, RecursionError) as exc:
        return Skip(where, "invalid JSON", f"invalid JSON ({exc})")
    if not isinstance(fields, dict):
        return Skip(where, "not an object", f"expected a JSON object, got {type(fields).__name__}")
    return RawRecord(where, fields)


# ---------------------------------------------------------------- checking


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_whole_number(value, name: str) -> int:
    """An int, an integral float, or a string of digits ("1923"); else BadRecord."""
    if _is_int(value):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", value):
        return int(value)
    raise BadRecord(f"bad {name}", f"'{name}' must be a whole number, got {short_repr(value)}")


def content_of(fields: dict) -> dict:
    """The content fields of a record in the form the training reader will use
    (messages, else prompt + completion, else text), checked. BadRecord if none."""
    if "messages" in fields:
        return {"messages": _checked_messages(fields["messages"], fields.get("tools"))}
    if "prompt" in fields or "completion" in fields:
        prompt, completion = fields.get("prompt"), fields.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadRecord("bad prompt/completion", "'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise BadRecord("no text", "empty 'completion' (nothing to learn from)")
        return {"prompt": prompt, "completion": completion}
    text = fields.get("text")
    if text is None:
        raise BadRecord("no text", "no 'text' (or 'messages', or 'prompt' + 'completion')")
    if not isinstance(text, str):
        raise BadRecord("no text", f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadRecord("no text", "empty 'text'")
    return {"text": text}


def _checked_messages(messages, tools) -> list:
    problem = messages_problem(messages, tools)
    if problem:
        raise BadRecord(*problem)
    return messages


def checked_metadata(fields: dict, this_year: int) -> dict:
    """Every field but content and scores, with `year` / `citation_count` checked and
    `source_type` normalized. BadRecord on a value that cannot be right."""
    metadata = {k: v for k, v in fields.items() if k not in CONTENT_FIELDS and k not in SCORE_FIELDS}
    if metadata.get("year") is not None:
        year = _as_whole_number(metadata["year"], "year")
        if year > this_year:
            raise BadRecord("year in the future", f"year {year} is in the future")
        metadata["year"] = year
    if metadata.get("citation_count") is not None:
        count = _as_whole_number(metadata["citation_count"], "citation_count")
        if count < 0:
            raise BadRecord("negative citation_count", f"negative citation_count {count}")
        metadata["citation_count"] = count
    if metadata.get("source_type") is not None:
        source_type = scoring.normalize_source_type(metadata["source_type"])
        if source_type is None:
            raise BadRecord("bad source_type", f"'source_type' must be a non-empty string, got {short_repr(metadata['source_type'])}")
        metadata["source_type"] = source_type
    evidence = metadata.get("evidence")
    if evidence is not None and not _valid_evidence(evidence):
        raise BadRecord("bad evidence", "'evidence' must be a list of kinds or an object {kind: count >= 0}")
    return metadata


def _valid_evidence(evidence) -> bool:
    if isinstance(evidence, list):
        return all(isinstance(kind, str) for kind in evidence)
    if isinstance(evidence, dict):
        return all(not isinstance(c, bool) and isinstance(c, (int, float)) and math.isfinite(c) and c >= 0
                   for c in evidence.values())
    return False


def given_scores(fields: dict) -> tuple[float, float] | None:
    """The record's own scores when it has both, checked; None when it lacks one."""
    if not all(name in fields for name in SCORE_FIELDS):
        return None
    problem = scores_problem(fields["auth_weight"], fields["prov_entropy"])
    if problem:
        raise BadRecord(*problem)
    return float(fields["auth_weight"]), float(fields["prov_entropy"])


def computed_scores(content: dict, metadata: dict) -> tuple[float, float]:
    """The scorer's (auth_weight, prov_entropy) of a checked record: the one call that
    prepare_data.py and the training reader (load_time_scores) both make."""
    return scoring.score({**metadata, **content})


def load_time_scores(record: dict, where: str, this_year: int | None = None) -> tuple[float, float]:
    """The scores of a record that brings none (an mlx-lm record), computed when the
    corpus is indexed exactly as prepare_data.py computes and writes them (rounded to
    SCORE_DECIMALS). UserError naming `where` for metadata that cannot be right."""
    try:
        content = content_of(record)
        metadata = checked_metadata(record, this_year if this_year is not None else scoring.current_year())
    except BadRecord as bad:
        raise UserError(f"{where}: {bad.detail}") from None
    authority, entropy = computed_scores(content, metadata)
    return round(authority, SCORE_DECIMALS), round(entropy, SCORE_DECIMALS)


def scored_from_text_alone(record: dict) -> bool:
    """Whether a record without scores has none of the metadata the scorer reads either:
    its scores are then a guess from its wording alone."""
    return all(record.get(name) is None for name in SCORER_METADATA)


def check_load_time_metadata(record: dict, where: str, this_year: int) -> None:
    """What load_time_scores would reject, without scoring (a quick check of a whole file)."""
    try:
        checked_metadata(record, this_year)
    except BadRecord as bad:
        raise UserError(f"{where}: {bad.detail}") from None


def _write_inferred_source_type(content: dict, metadata: dict) -> None:
    """A record without a source_type gets the one the scorer inferred from its text
    (the one --explain shows), marked as inferred, so the output and the report say it."""
    if metadata.get("source_type") is not None:
        return
    record = {**metadata, **content}
    source_type, inferred = scoring.resolve_source_type(record, scoring.match_text(scoring.record_text(record)))
    if inferred:
        metadata["source_type"] = source_type
        metadata[INFERRED_MARK] = True


# ---------------------------------------------------------------- dedup keys


_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]+")


def normalize_text(text: str) -> str:
    """For near-duplicate detection: case-folded, punctuation and symbols removed, whitespace collapsed."""
    return " ".join(_NOT_WORD_OR_SPACE.sub("", text.casefold()).split())


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def dedup_keys(content: dict) -> tuple[int, int]:
    """(exact key, near key): hash of the content as given, hash of its normalized words."""
    exact = json.dumps(content, ensure_ascii=False, sort_keys=True)
    return _hash64(exact), _hash64(normalize_text(scoring.record_text(content)))


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Boolean mask: True where a key is seen for the first time (in order)."""
    mask = np.zeros(len(keys), dtype=bool)
    if len(keys):
        _, first = np.unique(keys, return_index=True)
        mask[first] = True
    return mask


# ---------------------------------------------------------------- split


def _stratum_seed(seed: int, source_type: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{source_type}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def val_counts_per_stratum(sizes: dict[str, int], val_fraction: float) -> dict[str, int]:
    """How many of each source type go to validation: the total is round(N * fraction)
    (at most N - 1, so training is never empty), shared by largest remainder."""
    total = sum(sizes.values())
    target = min(int(total * val_fraction + 0.5), max(total - 1, 0))
    counts = {name: int(size * val_fraction) for name, size in sizes.items()}
    remainders = sorted(sizes, key=lambda name: (-(sizes[name] * val_fraction - counts[name]), name))
    for name in remainders[: max(0, target - sum(counts.values()))]:
        counts[name] += 1
    return counts


def split_mask(strata: np.ndarray, kept: np.ndarray, type_names: list[str],
               val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the records that go to validation, stratified by source type.
    Each stratum draws from its own seeded generator, so adding a source type does
    not reshuffle the others."""
    is_val = np.zeros(len(strata), dtype=bool)
    members = {i: np.flatnonzero(kept & (strata == i)) for i in range(len(type_names))}
    sizes = {type_names[i]: len(idx) for i, idx in members.items() if len(idx)}
    wanted = val_counts_per_stratum(sizes, val_fraction)
    for i, idx in members.items():
        count = wanted.get(type_names[i], 0)
        if count:
            # RandomState's stream is frozen by numpy: the split stays the same across versions.
            order = np.random.RandomState(_stratum_seed(seed, type_names[i])).permutation(len(idx))
            is_val[idx[order[:count]]] = True
    return is_val


# ---------------------------------------------------------------- writing


def _temp_file(folder: Path, name: str):
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp-{os.getpid()}", dir=folder)
    # mkstemp makes the file private (0600); the output is an ordinary file
    # the user's umask should decide about, as for any file they write.
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return os.fdopen(fd, "wb"), Path(temp)


def remove_leftovers(folder: Path) -> None:
    """The staging files and temporaries of runs into `folder` that were killed (their writer gone),
    and this process's own: a staging file holds a copy of every record read, hundreds of MB for a
    big corpus. Those of another run still going are left alone."""
    for entry in os.scandir(folder):
        if TEMPORARY_NAME.fullmatch(entry.name) and left_by_a_dead_process(entry.name):
            remove_leftover(Path(entry.path), "leftover of a prepare_data run that was killed")


def write_failure(exc: BaseException, output_dir: Path) -> Exception | None:
    """One line for outputs that could not be written (a full disk: exit 1; a folder that cannot be
    written: exit 2); None for anything else (a reader of --explain gone is no write failure here)."""
    from run_safety.machine import write_fault

    if not isinstance(exc, OSError) or isinstance(exc, BrokenPipeError) or exc.errno is None:
        return None
    return write_fault(exc, f"could not write {output_dir} ({exc.strerror}; {free_space(output_dir)}); nothing "
                            f"was left there and the input is untouched")


def _finish(handle, temp: Path, final: Path) -> None:
    handle.flush()
    flush_fd(handle.fileno())  # F_FULLFSYNC on macOS, as every durable write
    handle.close()
    os.replace(temp, final)


def output_line(content: dict, scores: tuple[float, float], metadata: dict) -> bytes:
    authority, entropy = scores
    record = {**content, "auth_weight": round(authority, SCORE_DECIMALS),
              "prov_entropy": round(entropy, SCORE_DECIMALS), **metadata}
    return (json_text(record, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------- the whole job


@dataclass
class _Staged:
    """Per usable record, in input order: what pass 2 and the report need."""
    exact: array = field(default_factory=lambda: array("Q"))
    near: array = field(default_factory=lambda: array("Q"))
    stratum: array = field(default_factory=lambda: array("I"))
    authority: array = field(default_factory=lambda: array("d"))
    entropy: array = field(default_factory=lambda: array("d"))
    scored_here: array = field(default_factory=lambda: array("b"))
    type_ids: dict = field(default_factory=dict)  # source type -> stratum id
    wheres: list | None = None  # "FILE:LINE" per record, only kept for --explain

    def add(self, where: str, keys: tuple[int, int], source_type: str, scores: tuple[float, float],
            scored_here: bool) -> None:
        if self.wheres is not None:
            self.wheres.append(where)
        self.exact.append(keys[0])
        self.near.append(keys[1])
        self.stratum.append(self.type_ids.setdefault(source_type, len(self.type_ids)))
        self.authority.append(round(scores[0], SCORE_DECIMALS))
        self.entropy.append(round(scores[1], SCORE_DECIMALS))
        self.scored_here.append(scored_here)

    def __len__(self) -> int:
        return len(self.exact)


def prepare(input_path: str | os.PathLike, output_dir: str | os.PathLike, *, val_fraction: float = 0.1,
            seed: int = 0, rescore: bool = False, strict: bool = False, force: bool = False,
            explain: Callable[[str], None] | None = None) -> PrepareResult:
    """Read, check, score, deduplicate and split; write OUTPUT/train.jsonl and OUTPUT/val.jsonl.

    `explain`, when given, receives lines saying what made each written record's scores.
    Raises UserError for bad usage, for the first bad record when `strict`, and when no
    usable record is left; the output folder is then as it was.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    train_path, val_path = output_dir / TRAIN_FILE, output_dir / VAL_FILE
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: exists and is not a folder")
    existing = [p for p in (train_path, val_path) if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; use --force to overwrite")
    files, ignored = list_input_files(input_path)

    result = PrepareResult(train_path=train_path, val_path=val_path,
                           ignored_files=[str(p) for p in ignored])
    created_dir = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(exc, output_dir) or exc from None
    remove_leftovers(output_dir)
    try:
        staging, staging_path = _temp_file(output_dir, "staging")
        with staging:
            staged = _read_and_stage(files, staging, result, rescore=rescore, strict=strict,
                                     keep_wheres=explain is not None)
        if not len(staged):
            raise UserError(_no_usable_record_message(input_path, result))
        is_val = _decide(staged, result, val_fraction, seed)
        _write_outputs(staging_path, staged, is_val, result, output_dir, explain)
    except BaseException as exc:
        failed = write_failure(exc, output_dir)  # before the clean-up: the free space it names is the failure's
        # By name, not by a list kept as they are made: a Ctrl+C between a file's creation and its
        # entry in a list would leave it.
        remove_leftovers(output_dir)
        if created_dir:
            try:
                output_dir.rmdir()  # only if we made it and it is still empty
            except OSError:
                pass
        if failed is not None:
            raise failed from None
        raise
    staging_path.unlink(missing_ok=True)
    return result


def _read_and_stage(files: list[Path], staging, result: PrepareResult, *, rescore: bool, strict: bool,
                    keep_wheres: bool) -> _Staged:
    staged = _Staged(wheres=[] if keep_wheres else None)
    this_year = scoring.current_year()
    for path in files:
        for item in read_raw_records(path):
            if isinstance(item, RawRecord):
                result.records_read += 1
                try:
                    content = content_of(item.fields)
                    metadata = checked_metadata(item.fields, this_year)
                    scores = None if rescore else given_scores(item.fields)
                except BadRecord as bad:
                    item = Skip(item.where, bad.reason, bad.detail)
                else:
                    scored_here = scores is None
                    if scored_here:
                        scores = computed_scores(content, metadata)
                        _write_inferred_source_type(content, metadata)
                    staging.write(output_line(content, scores, metadata))
                    source_type = metadata.get("source_type")
                    staged.add(item.where, dedup_keys(content), source_type if isinstance(source_type, str) else scoring.UNKNOWN_SOURCE_TYPE,
                               scores, scored_here)
                    continue
            if strict:
                raise UserError(item.message())
            result.skipped[item.reason] += 1
            if len(result.warnings) < WARNINGS_KEPT:
                result.warnings.append(item.message())
    return staged


def _no_usable_record_message(input_path: Path, result: PrepareResult) -> str:
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(result.skipped.items()))
    why = f": {result.skipped_total} skipped ({reasons}); first: {result.warnings[0]}" if result.warnings else ""
    return f"{input_path}: no usable record{why}"


def _decide(staged: _Staged, result: PrepareResult, val_fraction: float, seed: int) -> np.ndarray:
    """Mark duplicates and the split; fill the counts and per-type statistics. Returns 0/1/2 per
    staged record: 0 dropped, 1 train, 2 validation."""
    exact = np.frombuffer(staged.exact, dtype=np.uint64)
    near = np.frombuffer(staged.near, dtype=np.uint64)
    strata = np.frombuffer(staged.stratum, dtype=np.uint32)
    kept = first_occurrences(near)  # the first of each normalized text; exact copies are near copies too
    new_exact = first_occurrences(exact)
    result.exact_duplicates = int((~new_exact).sum())
    result.near_duplicates = int(len(near) - kept.sum() - result.exact_duplicates)
    result.rescored = int(np.frombuffer(staged.scored_here, dtype=np.int8)[kept].sum())

    type_names = [None] * len(staged.type_ids)
    for name, i in staged.type_ids.items():
        type_names[i] = name
    is_val = split_mask(strata, kept, type_names, val_fraction, seed)
    destination = np.where(kept, np.where(is_val, 2, 1), 0).astype(np.int8)
    result.train_count = int((destination == 1).sum())
    result.val_count = int((destination == 2).sum())

    authority = np.frombuffer(staged.authority, dtype=np.float64)
    entropy = np.frombuffer(staged.entropy, dtype=np.float64)
    for i, name in sorted(enumerate(type_names), key=lambda item: item[1]):
        members = kept & (strata == i)
        if members.any():
            result.by_source_type[name] = SourceTypeStats(
                count=int(members.sum()), train=int((members & ~is_val).sum()), val=int((members & is_val).sum()),
                auth=_summary(authority[members]), entropy=_summary(entropy[members]))
    return destination


def _summary(values: np.ndarray) -> tuple[float, float, float, float]:
    return float(values.min()), float(np.median(values)), float(values.mean()), float(values.max())


def _write_outputs(staging_path: Path, staged: _Staged, destination: np.ndarray, result: PrepareResult,
                   output_dir: Path, explain: Callable[[str], None] | None) -> None:
    train, train_temp = _temp_file(output_dir, TRAIN_FILE)
    val, val_temp = _temp_file(output_dir, VAL_FILE)
    scored_here = staged.scored_here
    with open(staging_path, "rb") as staging, train, val:
        for index, line in enumerate(staging):
            where = destination[index]
            if where == 0:
                continue
            (train if where == 1 else val).write(line)
            if explain is not None:
                _explain_record(explain, staged.wheres[index], line, bool(scored_here[index]),
                                "val" if where == 2 else "train")
        _finish(train, train_temp, result.train_path)
        if result.val_count:
            _finish(val, val_temp, result.val_path)
        else:
            val.close()
            val_temp.unlink()
            result.val_path.unlink(missing_ok=True)  # a stale one would not match this train.jsonl
            result.val_path = None
    flush_dir(output_dir)


def _explain_record(explain: Callable[[str], None], where: str, line: bytes, scored_here: bool, split: str) -> None:
    record = json.loads(line)
    head = scoring.record_text(record)[:60].replace("\n", " ")
    d = distrust_scores(record["auth_weight"], record["prov_entropy"], EXPLAIN_ALPHA)
    explain(f"{where} ({split}) auth_weight={record['auth_weight']} prov_entropy={record['prov_entropy']} "
            f"d={float(d):.1f} (alpha {EXPLAIN_ALPHA}): {head!r}")
    if not scored_here:
        explain("  scores taken from the input (use --rescore to recompute)")
        return
    if record.get(INFERRED_MARK) is True:
        record = {k: v for k, v in record.items() if k not in ("source_type", INFERRED_MARK)}  # as it was scored
    for what, amount in scoring.explain(record):
        explain(f"  {amount:+.4f}  {what}")


# ---------------------------------------------------------------- report


def format_report(result: PrepareResult) -> str:
    """Counts, a table of both scores per source type, warnings about the mix, skipped records by reason."""
    kept = result.train_count + result.val_count
    lines = [
        f"read {result.records_read} records; skipped {result.skipped_total}; "
        f"removed {result.exact_duplicates} exact and {result.near_duplicates} near duplicates; "
        f"scored {result.rescored}, kept the input's scores for {kept - result.rescored}",
        f"wrote {result.train_count} to {result.train_path}"
        + (f" and {result.val_count} to {result.val_path}" if result.val_path else " (no validation split)"),
        "",
        f"{'source type':<18} {'records':>8} {'share':>6} {'train':>7} {'val':>6}   "
        f"{'auth_weight min/median/mean/max':<32} {'prov_entropy min/median/mean/max':<32}",
    ]
    for name, stats in result.by_source_type.items():
        share = stats.count / kept if kept else 0.0
        lines.append(f"{name:<18} {stats.count:>8} {share:>6.1%} {stats.train:>7} {stats.val:>6}   "
                     f"{_four(stats.auth):<32} {_four(stats.entropy):<32}")
    for name, stats in result.by_source_type.items():
        if kept and stats.count / kept > DOMINANT_SHARE:
            lines.append(f"warning: source type '{name}' is {stats.count / kept:.0%} of the records; "
                         f"the corpus is dominated by one kind of source")
    if result.skipped:
        lines.append("")
        lines.append("skipped: " + ", ".join(f"{count} {reason}" for reason, count in sorted(result.skipped.items())))
    if result.ignored_files:
        lines.append(f"ignored {len(result.ignored_files)} files that are neither .jsonl nor .txt "
                     f"(first: {result.ignored_files[0]})")
    return "\n".join(lines)


def _four(values: tuple[float, float, float, float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)
