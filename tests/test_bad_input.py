"""Bad input: one line naming the file, line and problem; exit 2; no traceback; nothing lost.

The command runs in the test's process (run_in_process); a missing training file and
argparse's own message are checked in a process of its own too, as a user sees them."""

from __future__ import annotations

import json
import random

import pytest

from conftest import FAST, assert_one_line_error, make_record, run_cli, run_in_process, write_corpus, write_jsonl


def good_lines(n=12, seed=0):
    rng = random.Random(seed)
    return [json.dumps(make_record(rng)) for _ in range(n)]


BAD_TRAIN_FILES = {
    # name: (lines of train.jsonl, what the message must say)
    "truncated last line": (good_lines() + ['{"text": "cut off here', ], ["train.jsonl:13", "invalid JSON"]),
    "not an object": (good_lines(3) + ["[1, 2]"], ["train.jsonl:4", "expected a JSON object"]),
    "missing auth_weight": (good_lines(2) + [json.dumps({"text": "a b", "prov_entropy": 1.0})],
                            ["train.jsonl:3", "missing field 'auth_weight'"]),
    "auth_weight is a string": (good_lines(2) + [json.dumps({"text": "a", "auth_weight": "high", "prov_entropy": 1})],
                                ["train.jsonl:3", "'auth_weight' must be a finite number"]),
    "auth_weight above 0.99": (good_lines(5) + [json.dumps({"text": "a", "auth_weight": 1.5, "prov_entropy": 1})],
                               ["train.jsonl:6", "'auth_weight' must be in [0, 0.99]"]),
    "negative prov_entropy": ([json.dumps({"text": "a", "auth_weight": 0.5, "prov_entropy": -1})],
                              ["train.jsonl:1", "'prov_entropy' must be in [0, 1000]"]),
    "prov_entropy so large d overflows": ([json.dumps({"text": "a", "auth_weight": 0.5, "prov_entropy": 1e300})],
                                          ["train.jsonl:1", "'prov_entropy' must be in [0, 1000]"]),
    "nested 100,000 deep": (["[" * 100_000], ["train.jsonl:1", "nested too deeply"]),
    "score of 400 digits": (['{"text": "a", "auth_weight": 0.5, "prov_entropy": ' + "9" * 400 + "}"],
                            ["train.jsonl:1", "'prov_entropy' must be a finite number", "400 digits"]),
    "integer of 5000 digits": (['{"text": "a", "auth_weight": 0.5, "prov_entropy": ' + "9" * 5000 + "}"],
                               ["train.jsonl:1", "invalid JSON"]),
    "infinite score": (['{"text": "a", "auth_weight": 0.5, "prov_entropy": Infinity}'],
                       ["train.jsonl:1", "'prov_entropy' must be a finite number"]),
    "text is a number": ([json.dumps({"text": 7, "auth_weight": 0.5, "prov_entropy": 1})],
                         ["train.jsonl:1", "'text' must be a string"]),
    "empty text": (good_lines(4) + [json.dumps({"text": "  ", "auth_weight": 0.5, "prov_entropy": 1})],
                   ["train.jsonl:5", "empty 'text'"]),
    "no text field": ([json.dumps({"body": "x", "auth_weight": 0.5, "prov_entropy": 1})],
                      ["train.jsonl:1", "missing field 'text'"]),
    "empty file": ([], ["train.jsonl", "no records (the file is empty)"]),
    "blank lines only": (["", "   ", "\t"], ["train.jsonl", "no records (its 3 lines are blank)"]),
    "chat without assistant": ([json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                            "auth_weight": 0.5, "prov_entropy": 1})],
                               ["train.jsonl:1", "last message must be a non-empty 'assistant'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_FILES))
def test_bad_training_file(case, tmp_path):
    lines, fragments = BAD_TRAIN_FILES[case]
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", lines)
    out = tmp_path / "out"
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "2")
    assert_one_line_error(result, *fragments)
    assert not (out / "adapters.safetensors").exists()


def test_missing_train_file(tmp_path):
    result = run_cli(*FAST, "--data-dir", tmp_path / "nowhere", "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "train.jsonl", "not found")


def test_unknown_model_path(corpus, tmp_path):
    args = [a if a != "tiny" else str(tmp_path / "no-such-model") for a in FAST]
    result = run_in_process(*args, "--data-dir", corpus, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "no-such-model", "model not found")


@pytest.mark.parametrize("flags, fragment", [
    (["--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["--learning-rate", "-1"], "--learning-rate must be a positive number"),
    (["--distrust-mode", "sideways"], "--distrust-mode must be 'weighted' or 'reference'"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--quantize-bits", "7"], "--quantize-bits must be one of"),
])
def test_bad_config_value(flags, fragment, corpus, tmp_path):
    result = run_in_process(*FAST, *flags, "--data-dir", corpus, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, fragment)


def test_bad_yaml_config(corpus, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lora:\n  dropout: lots\n")
    result = run_in_process(*FAST, "--config", config, "--data-dir", corpus, "--output-dir", tmp_path / "out",
                            "--max-steps", "2")
    assert_one_line_error(result, "run.yaml: 'lora.dropout' must be a number, got 'lots'")
    config.write_text("lora_rank: 4\nbogus_setting: 1\n")
    result = run_in_process(*FAST, "--config", config, "--data-dir", corpus, "--output-dir", tmp_path / "out",
                            "--max-steps", "2")
    assert_one_line_error(result, "unknown setting 'bogus_setting'")
    config.write_bytes(b"lora_rank: 4\nproject_name: caf\xe9\n")  # Latin-1, as an old editor saves it
    result = run_in_process(*FAST, "--config", config, "--data-dir", corpus, "--output-dir", tmp_path / "out",
                            "--max-steps", "2")
    assert_one_line_error(result, f"{config}:2: not UTF-8 text (byte 0xe9)")


def test_a_bad_line_anywhere_in_the_val_file_stops_the_run_before_its_first_step(tmp_path):
    data = write_corpus(tmp_path / "data")
    with open(data / "val.jsonl", "a") as handle:
        handle.write('{"text": "broken\n')
    out = tmp_path / "out"
    # Line 17 is far beyond the batches a validation reads (2 x 4 samples): the whole file is checked.
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "10")
    assert_one_line_error(result, "val.jsonl:17", "invalid JSON")
    assert "step 1/" not in result.stderr and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()


def test_a_bad_line_of_mlx_lms_valid_jsonl_is_named_the_same_way(tmp_path):
    data = write_corpus(tmp_path / "data", val=0)
    write_jsonl(data / "valid.jsonl", [{"text": "fine"}, {"text": "a year to come", "year": 3000}])
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out", "--max-steps", "10")
    assert_one_line_error(result, "valid.jsonl:2", "year 3000 is in the future")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_output_dir_that_is_a_file(corpus, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    result = run_in_process(*FAST, "--data-dir", corpus, "--output-dir", taken, "--max-steps", "2")
    assert_one_line_error(result, str(taken), "cannot use as --output-dir")
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("flags, fragment", [
    (["--seed", str(2**40)], "--seed must be in [0, 2**32)"),
    (["--lambda-weight", "400"], "d**lambda under- or overflows"),
])
def test_values_that_would_break_later(flags, fragment, corpus, tmp_path):
    result = run_in_process(*FAST, *flags, "--data-dir", corpus, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, fragment)


def test_a_flag_value_of_the_wrong_type_is_one_line_from_argparse(corpus, tmp_path):
    result = run_cli(*FAST, "--max-steps", "abc", "--data-dir", corpus, "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    # argparse's own message, on one line: no usage block, no traceback.
    assert result.stderr.splitlines() == ["train_qlora.py: error: argument --max-steps: invalid int value: 'abc' "
                                          "(see --help)"], result.stderr


@pytest.mark.parametrize("flags, fragment", [
    (["--optimizer", "lion"], "--optimizer must be one of adamw, adam, sgd, adafactor (got 'lion')"),
    (["--fine-tune-type", "full"], "--fine-tune-type must be one of lora, dora (got 'full')"),
    (["--optimizer", "adam", "--weight-decay", "0.1"], "--weight-decay applies to --optimizer adamw or sgd or "
                                                         "adafactor, not adam"),
    (["--sgd-momentum", "0.9"], "--sgd-momentum applies to --optimizer sgd, not adamw"),
    (["--optimizer", "sgd", "--sgd-nesterov"], "--sgd-nesterov needs --sgd-momentum above 0"),
    (["--adam-beta2", "1.5"], "--adam-beta2 must be in [0, 1)"),
    (["--grad-checkpoint", "--lora-dropout", "0.1"], "--grad-checkpoint cannot go with --lora-dropout above 0"),
    (["--early-stopping-window", "0"], "--early-stopping-window must be at least 1"),
])
def test_bad_values_of_the_new_options(flags, fragment, corpus, tmp_path):
    result = run_in_process(*FAST, *flags, "--data-dir", corpus, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, fragment, only_line=True)
