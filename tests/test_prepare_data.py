"""Data preparation: reading, checks, duplicates, split, atomic output, and the command line.

The command line runs in a process of its own for determinism across runs, usage
errors and another working directory; in the test's process for the rest."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corpus import prepare as prep
from run_safety.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "src" / "prepare_data.py"


def run_cli(*args, cwd=None):
    """The command in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=120)


def run_in_process(*args):
    """The command's main() in the test's process, with the same result (conftest.run_script_in_process)."""
    from conftest import run_script_in_process

    return run_script_in_process("prepare_data", *args, timeout=120)


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def corpus(n_primary=60, n_consensus=40):
    """Distinct records of two source types, every text different."""
    records = []
    for i in range(n_primary):
        records.append({"text": f"Notebook entry {i}: measured the spring at {i} inches, then {i * 7 % 13} again.",
                        "source_type": "lab_notebook", "year": 1900 + i % 50,
                        "evidence": ["lab_notebook", "measurement", "photograph"][: 1 + i % 3]})
    for i in range(n_consensus):
        records.append({"text": f"Guidance number {i}: experts recommend item {i} and rule {i * 3}.",
                        "source_type": "official_guidance", "year": 2000 + i % 24, "citation_count": i * 10})
    return records


def texts_of(path: Path) -> set[str]:
    return {r["text"] for r in read_jsonl(path)} if path.exists() else set()


# ---------------------------------------------------------------- the library


def test_output_records_carry_scores_and_metadata(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus())
    result = prep.prepare(raw, tmp_path / "out")
    rows = read_jsonl(result.train_path) + read_jsonl(result.val_path)
    assert len(rows) == 100 == result.train_count + result.val_count
    for row in rows:
        assert 0.0 <= row["auth_weight"] <= 0.99 and row["prov_entropy"] >= 0.0
        assert row["source_type"] in ("lab_notebook", "official_guidance") and "year" in row
    by_type = result.by_source_type
    assert by_type["lab_notebook"].auth[2] < by_type["official_guidance"].auth[2]  # means


def test_split_is_stratified_disjoint_and_sized(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus())
    result = prep.prepare(raw, tmp_path / "out", val_fraction=0.2, seed=3)
    train, val = texts_of(result.train_path), texts_of(result.val_path)
    assert not train & val
    assert len(train) + len(val) == 100 and len(val) == 20
    assert result.by_source_type["lab_notebook"].val == 12
    assert result.by_source_type["official_guidance"].val == 8


def test_another_seed_gives_another_split(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus())
    first = prep.prepare(raw, tmp_path / "a", seed=0)
    second = prep.prepare(raw, tmp_path / "b", seed=1)
    assert texts_of(first.val_path) != texts_of(second.val_path)


def test_val_counts_per_stratum_use_largest_remainder():
    counts = prep.val_counts_per_stratum({"a": 4, "b": 4, "c": 4}, 0.1)
    assert sum(counts.values()) == 1  # round(12 * 0.1), not 0 from three strata of 0.4 each
    assert prep.val_counts_per_stratum({"a": 1}, 0.5) == {"a": 0}  # never empties training


def test_exact_and_near_duplicates_are_removed(tmp_path):
    original = {"text": "Dear Sir, the well ran dry on the 3rd of May.", "source_type": "letter", "year": 1890}
    exact = dict(original)
    near = {**original, "text": "dear sir -- the WELL ran dry on the 3rd of May!!"}
    other = {"text": "A different letter altogether.", "source_type": "letter"}
    raw = write_jsonl(tmp_path / "raw.jsonl", [original, exact, near, other])
    result = prep.prepare(raw, tmp_path / "out", val_fraction=0.0)
    assert result.exact_duplicates == 1 and result.near_duplicates == 1
    assert [r["text"] for r in read_jsonl(result.train_path)] == [original["text"], other["text"]]
    assert result.val_path is None and not (tmp_path / "out" / "val.jsonl").exists()


def test_normalize_text():
    assert prep.normalize_text("  Hello,\tWORLD!!  it's  ") == "hello world its"


def test_given_scores_are_kept_unless_rescore(tmp_path):
    records = [{"text": "Officials recommend rest.", "auth_weight": 0.123, "prov_entropy": 2.5},
               {"text": "Only one score here.", "auth_weight": 0.5}]
    raw = write_jsonl(tmp_path / "raw.jsonl", records)
    kept = read_jsonl(prep.prepare(raw, tmp_path / "a", val_fraction=0).train_path)
    assert (kept[0]["auth_weight"], kept[0]["prov_entropy"]) == (0.123, 2.5)
    assert kept[1]["auth_weight"] == round(prep.scoring.auth_weight({"text": "Only one score here."}), 4)
    rescored = read_jsonl(prep.prepare(raw, tmp_path / "b", val_fraction=0, rescore=True).train_path)
    assert rescored[0]["auth_weight"] != 0.123


def test_chat_and_prompt_completion_pass_through(tmp_path):
    chat = {"messages": [{"role": "user", "content": "What did you measure?"},
                         {"role": "assistant", "content": "I measured 12 inches of rain."}], "source_type": "letter"}
    pair = {"prompt": "Summarize.", "completion": "Experts recommend the guidance.", "auth_weight": 0.9,
            "prov_entropy": 0.0}
    raw = write_jsonl(tmp_path / "raw.jsonl", [chat, pair])
    rows = read_jsonl(prep.prepare(raw, tmp_path / "out", val_fraction=0).train_path)
    assert rows[0]["messages"] == chat["messages"] and "auth_weight" in rows[0]
    assert rows[1]["prompt"] == "Summarize." and rows[1]["auth_weight"] == 0.9


def test_folder_of_jsonl_and_txt_is_read_in_sorted_order(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "b.jsonl", [{"text": "second file"}])
    (raw / "a").mkdir()
    (raw / "a" / "doc.txt").write_text("A field log entry.\nWind north; we observed three herons.", encoding="utf-8")
    (raw / "notes.md").write_text("ignored", encoding="utf-8")
    result = prep.prepare(raw, tmp_path / "out", val_fraction=0)
    assert [r["text"][:8] for r in read_jsonl(result.train_path)] == ["A field ", "second f"]
    assert result.ignored_files == [str(raw / "notes.md")]


def test_dominant_source_type_is_warned_about(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus(n_primary=90, n_consensus=5))
    report = prep.format_report(prep.prepare(raw, tmp_path / "out"))
    assert "warning: source type 'lab_notebook'" in report
    assert "auth_weight min/median/mean/max" in report


def test_strict_error_leaves_no_trace(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus()[:5] + ["{not json"])
    with pytest.raises(UserError, match=r"raw\.jsonl:6: invalid JSON"):
        prep.prepare(raw, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UserError):
        prep.prepare(raw, existing, strict=True)
    assert list(existing.iterdir()) == []


# ---------------------------------------------------------------- the command line


def test_cli_runs_are_byte_for_byte_deterministic(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus())
    for out in ("a", "b"):
        done = run_cli("--input", raw, "--output", tmp_path / out, "--seed", 7)
        assert done.returncode == 0, done.stderr
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "lab_notebook" in done.stdout  # the report's table
    leftovers = [p.name for p in (tmp_path / "a").iterdir()]
    assert sorted(leftovers) == ["train.jsonl", "val.jsonl"]  # no temporary files left behind


BAD_LINES = {
    "invalid JSON": '{"text": "unfinished',
    "no text": '{"source_type": "letter", "year": 1900}',
    "empty text": '{"text": "   "}',
    "year in the future": '{"text": "from the future", "year": 2999}',
    "negative citation_count": '{"text": "cited less than never", "citation_count": -3}',
    "not an object": '["a", "list"]',
    "score out of range": '{"text": "too sure", "auth_weight": 1.5, "prov_entropy": 0}',
}


@pytest.mark.parametrize("problem", sorted(BAD_LINES))
def test_bad_record_is_skipped_with_a_warning_and_strict_stops(tmp_path, problem):
    good = [json.dumps(r) for r in corpus(3, 2)]
    raw = write_jsonl(tmp_path / "raw.jsonl", good[:2] + [BAD_LINES[problem]] + good[2:])
    done = run_in_process("--input", raw, "--output", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"{raw}:3:" in done.stderr
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) + len(read_jsonl(tmp_path / "out" / "val.jsonl")) == 5
    assert "skipped: 1 " in done.stdout

    strict = run_in_process("--input", raw, "--output", tmp_path / "strict", "--strict")
    assert strict.returncode == 2
    assert strict.stderr.count("\n") == 1 and f"{raw}:3:" in strict.stderr
    assert "Traceback" not in strict.stderr
    assert not (tmp_path / "strict").exists()


def test_unreadable_and_empty_files_are_skipped_with_a_warning(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", corpus(3, 2))
    (raw / "broken.jsonl").symlink_to(raw / "missing-target.jsonl")  # unreadable even for root
    (raw / "empty.jsonl").write_text("", encoding="utf-8")
    (raw / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    done = run_in_process("--input", raw, "--output", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert f"{raw / 'broken.jsonl'}: cannot read file" in done.stderr
    assert f"{raw / 'empty.jsonl'}: empty file" in done.stderr
    assert f"{raw / 'latin1.txt'}:1: not valid UTF-8" in done.stderr
    strict = run_in_process("--input", raw, "--output", tmp_path / "strict", "--strict")
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1


def test_no_usable_record_exits_2_with_one_line(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", ['{"text": ""}', "nonsense"])
    done = run_in_process("--input", raw, "--output", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no usable record" in done.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_untouched_without_force(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus())
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old train\n")
    (out / "val.jsonl").write_text("old val\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    done = run_in_process("--input", raw, "--output", out)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--force" in done.stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    forced = run_in_process("--input", raw, "--output", out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(read_jsonl(out / "train.jsonl")) == 90


def test_usage_errors_exit_2_with_one_line(tmp_path):
    for args in ([], ["--input", tmp_path / "nothing-here", "--output", tmp_path / "out"],
                 ["--input", tmp_path, "--output", tmp_path / "out", "--val-fraction", "1.5"],
                 ["--input", tmp_path, "--output", tmp_path / "out", "--seed", "x"]):
        done = run_cli(*args)
        assert done.returncode == 2, args
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_explain_prints_what_made_each_score(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", corpus(2, 1))
    done = run_in_process("--input", raw, "--output", tmp_path / "out", "--explain", "--val-fraction", "0")
    assert done.returncode == 0, done.stderr
    assert f"{raw}:1 (train)" in done.stdout
    assert "prior for source type lab_notebook" in done.stdout
    assert "prov_entropy: evidence" in done.stdout


def test_runs_from_another_working_directory(tmp_path):
    write_jsonl(tmp_path / "raw.jsonl", corpus(3, 2))
    done = run_cli("--input", "raw.jsonl", "--output", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "train.jsonl").exists()
    assert os.path.exists(tmp_path / "out" / "val.jsonl")


def test_a_txt_document_gets_the_source_type_inferred_from_its_text_written_and_reported(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_text("Measured the spring at 4 inches with the gauge; the barometer reading was "
                                   "29 inches, and I weighed the sample at 12 grains.\n")
    (raw / "other.txt").write_text("Nothing here says what this is.\n")
    result = run_in_process("--input", raw, "--output", tmp_path / "out", "--val-fraction", "0", "--explain")
    assert result.returncode == 0, result.stderr
    rows = {row["text"].split()[0]: row for row in read_jsonl(tmp_path / "out" / "train.jsonl")}
    measured = rows["Measured"]
    assert (measured["source_type"], measured["source_type_inferred"]) == ("measurement", True)
    assert "source_type" not in rows["Nothing"]  # nothing to infer from: not made up
    table = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line[:1].isalpha()}
    assert table["measurement"][1] == "1" and table["unknown"][1] == "1", result.stdout
    # --explain still says it was inferred, and the written scores are what the scorer gives the text.
    assert "source type measurement (inferred from text)" in result.stdout
    from corpus import scoring

    expected = scoring.score({"text": measured["text"]})
    assert (measured["auth_weight"], measured["prov_entropy"]) == (round(expected[0], 4), round(expected[1], 4))
