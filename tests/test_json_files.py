"""One rule for the JSON the toolkit writes: no NaN or Infinity, ever (json_files).

Every JSON file and line a real run writes (prepared data, checkpoints,
metrics.jsonl, adapter_config.json, evaluations, an export) is read back with
a strict parser; and a checkpoint written by the previous version, which had
`Infinity` and "inf" in its trainer_state.json, still resumes.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from checkpoints.manifest import write_manifest
from conftest import FAST, adapters_equal, load_adapters, make_record, run_cli, run_script, train_lines
from run_safety.json_files import finite_or_none, json_text

STEPS = 8
# A checkpoint before the first validation (step 2), so that one has no best validation loss yet.
ARGS = [*FAST, "--checkpoint-interval", "2", "--eval-steps", "4", "--max-steps", str(STEPS), "--keep-checkpoints", "100"]


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as jq or JavaScript's JSON.parse do."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def strictly_parsed(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [strict_loads(line) for line in text.splitlines() if line.strip()]
    return [strict_loads(text)]


def test_json_text_refuses_a_non_finite_number_and_finite_or_none_encodes_it():
    assert json_text({"a": [1.5, None]}) == '{"a": [1.5, null]}'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            json_text({"a": [1.0, bad]})
        assert finite_or_none(bad) is None
    assert [finite_or_none(x) for x in (1.5, 0, None, "nan")] == [1.5, 0, None, "nan"]


def test_the_strict_parser_of_these_tests_does_refuse_what_python_writes():
    with pytest.raises(ValueError):
        strict_loads(json.dumps({"best_val_loss": math.inf}))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """prepare_data, a run with checkpoints before and after validations, evaluate, export."""
    root = tmp_path_factory.mktemp("json")
    rng = random.Random(5)
    raw = root / "raw.jsonl"
    raw.write_text("".join(json.dumps(make_record(rng, source_type=rng.choice(["lab_notebook", "news"]))) + "\n"
                           for _ in range(80)), encoding="utf-8")
    prepared = run_script("prepare_data", "--input", raw, "--output", root / "data", "--val-fraction", "0.25",
                          "--rescore")
    assert prepared.returncode == 0, prepared.stderr
    out = root / "run"
    result = run_cli(*ARGS, "--data-dir", root / "data", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    evaluated = run_script("evaluate", "--output-dir", out, "--data-dir", root / "data")
    assert evaluated.returncode == 0, evaluated.stderr
    exported = run_script("export", "--output-dir", out, "--save-path", root / "fused")
    assert exported.returncode == 0, exported.stderr
    return out


def test_every_json_file_a_run_writes_parses_with_a_strict_parser(run):
    root = run.parent
    written = [path for folder in (root / "data", run, root / "fused")
               for path in sorted(folder.rglob("*.json*")) if path.suffix in (".json", ".jsonl")]
    base = json.loads((run / "adapter_config.json").read_text())["model"]
    written += [path for path in Path(base).glob("*.json")]  # the quantized copy of the base and its record
    names = {path.name for path in written}
    for name in ("train.jsonl", "val.jsonl", "metrics.jsonl", "adapter_config.json", "trainer_state.json",
                 "config.json", "manifest.json", "distrust_qlora_export.json", "distrust_qlora_base.json"):
        assert name in names, name
    assert list((run / "evaluations").glob("step-*.json"))
    for path in written:
        try:
            strictly_parsed(path)
        except ValueError as error:
            pytest.fail(f"{path}: {error}")

    # Before the first validation there is no best: null, not Infinity or "inf".
    early = strict_loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())["trainer"]
    assert early["loop"]["best_val_loss"] is None and early["loop"]["best_val_step"] is None
    assert early["early_stopping"]["best_loss"] is None and early["val_loss"] is None
    late = strict_loads((run / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())["trainer"]
    assert isinstance(late["loop"]["best_val_loss"], float) and late["loop"]["best_val_step"] in (4, 8)


def as_the_previous_version_wrote_it(checkpoint: Path) -> None:
    """Rewrite trainer_state.json in the previous encoding, with a manifest that matches: a bare
    Infinity for no best validation yet, early stopping's and the progress line's strings."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    trainer = state["trainer"]
    assert trainer["loop"]["best_val_loss"] is None  # before the first validation
    trainer["loop"]["best_val_loss"] = math.inf
    stopping = trainer["early_stopping"]
    stopping["best_loss"] = "inf" if stopping["best_loss"] is None else stopping["best_loss"]
    stopping["losses"] = ["nan" if x is None else x for x in stopping["losses"]]
    for key in ("losses", "ces"):
        trainer["progress"][key] = ["nan" if x is None else x for x in trainer["progress"][key]]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=2, sort_keys=True)  # allow_nan, as it was
        handle.write("\n")
    assert '"best_val_loss": Infinity' in path.read_text() and '"best_loss": "inf"' in path.read_text()
    write_manifest(checkpoint, state["step"], trainer, fsync=False)


def test_a_checkpoint_of_the_previous_version_still_resumes_to_the_same_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    checkpoints = out / "checkpoints"
    for path in checkpoints.glob("step-*"):
        if path.name != "step-00000002":
            shutil.rmtree(path)
    for pointer in ("best", "final"):
        (checkpoints / pointer).unlink(missing_ok=True)
    as_the_previous_version_wrote_it(checkpoints / "step-00000002")

    result = run_cli(*ARGS, "--data-dir", run.parent / "data", "--output-dir", out, "--auto-resume")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "skipping" not in result.stderr, result.stderr
    assert [line["objective"] for line in train_lines(out)] == [line["objective"] for line in train_lines(run)]
    assert adapters_equal(load_adapters(out), load_adapters(run))
    final = json.loads((checkpoints / (checkpoints / "final").read_text().strip() / "trainer_state.json").read_text())
    reference = json.loads((run / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert final["trainer"]["loop"]["best_val_loss"] == reference["trainer"]["loop"]["best_val_loss"]
    for path in checkpoints.glob(f"step-{STEPS:08d}/*.json"):  # what the resumed run wrote is strict again
        strictly_parsed(path)
