"""A first look at the data, before the model is loaded (minutes for a big base) and before
anything of an earlier run is moved aside: each file exists, is a readable regular file,
holds at least one record, and its first records parse and pass the record checks. The
whole file is checked again as it is indexed (corpus/index.py), with the tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

from config import VAL_FILES, probe_interval
from corpus.prepare import check_load_time_metadata
from corpus.records import has_scores, parse_record
from corpus.scoring import current_year
from run_safety.errors import UserError
from run_safety.input_files import dangling_link_above, open_input_file, refuse_if_not_regular
from monitoring.evaluation import file_in
from monitoring.probes import PROBE_FILE, read_probes

FIRST_RECORDS = 200  # the records looked at before loading; cheap even for a 7B run's corpus


def check_data_files(config) -> tuple[Path | None, list]:
    """UserError, naming file and line, for what would otherwise be found only after the model
    has loaded: no training file, an unreadable one, no records, a bad record among the first,
    a bad line in the data folder's probes.jsonl. Returns (that probe file, its probes as read):
    the run tokenizes them once the model has loaded, without reading the file again."""
    train = config.train_file
    if not os.path.lexists(train):
        raise UserError(f"{train}: training file not found (--data-dir {config.paths.data_dir} must hold train.jsonl)"
                        f"{dangling_link_above(train)}")
    first_records(train, "training")
    data = Path(config.paths.data_dir)
    for name in VAL_FILES:  # val.jsonl on a disk not mounted is not "no validation file"
        refuse_if_not_regular(data / name, "the validation file")
    val = config.val_file
    if val.is_file():
        first_records(val, "validation")
    probes = file_in(data, PROBE_FILE)
    if probe_interval(config.training.probes) == 0:
        return probes, []  # --probes off: the file is not read, and not scored
    # A few lines: the whole file, all but the length check (that needs the tokenizer).
    return probes, read_probes(probes) if probes else []


def first_records(path: Path, what: str, count: int = FIRST_RECORDS) -> int:
    """Parse and check up to `count` records of `path`; how many there were. UserError for a
    file that cannot be read, holds none (empty, or only blank lines), or a bad one."""
    this_year = current_year()
    records = lines = 0
    try:
        with open_input_file(path, f"the {what} file") as handle:
            for lines, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = parse_record(line, str(path), lines)
                if not has_scores(record):
                    check_load_time_metadata(record, f"{path}:{lines}", this_year)
                records += 1
                if records >= count:
                    _check_unfinished_last_line(handle, path, this_year)
                    break
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    if not records:
        why = "the file is empty" if not lines else f"its {lines:,} line{'s are' if lines > 1 else ' is'} blank"
        raise UserError(f"{path}: no records ({why}); a {what} file holds one JSON object per line")
    return records


TAIL_BYTES = 1 << 20  # how far back from the end a last line is looked for


def _check_unfinished_last_line(handle, path: Path, this_year: int) -> None:
    """A file whose writer was killed ends in a line cut short, with no newline after it: that
    line, beyond the first records, would otherwise be found only once the model has loaded.
    Only a file that does not end with a newline is looked at (the tail, then the lines counted
    to name the line); one that does costs one seek."""
    size = handle.seek(0, 2)
    handle.seek(max(size - 1, 0))
    if size == 0 or handle.read(1) == b"\n":
        return
    start = max(size - TAIL_BYTES, 0)
    handle.seek(start)
    tail = handle.read()
    last = tail.rsplit(b"\n", 1)[-1]
    if not last.strip() or (start > 0 and b"\n" not in tail):
        return
    handle.seek(0)
    number = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b"")) + 1
    record = parse_record(last, str(path), number)
    if not has_scores(record):
        check_load_time_metadata(record, f"{path}:{number}", this_year)
