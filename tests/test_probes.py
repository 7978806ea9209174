"""Probes (contested facts: which version does the model say?) and general text: the probe
file's checks, through evaluate.py and the training command; the scorer against a direct
computation; evaluate.py's section and JSON; the validation figures of a training run.

Every command runs in the test's process (run_in_process, run_script_in_process), on the
tiny model with a few short probes."""

from __future__ import annotations

import json
import math

import pytest

from conftest import (FAST, WORDS, assert_one_line_error, load_tiny, read_metrics, run_in_process,
                      run_script_in_process, write_corpus, write_jsonl)

PROBES = [
    {"prompt": "The pump house was roofed with", "primary": " slate", "consensus": " clay tiles"},
    {"prompt": "the measurement was", "primary": " taken at dawn",
     "consensus": " reported by the agency in its annual review of the figures"},
    {"prompt": "experts agree the", "primary": " notebook sample", "consensus": " official summary", "note": "ok"},
]
GENERAL = [{"text": "the river ran past the old mill and the children played"},
           {"text": "a cup of tea in the afternoon"}]
GOOD = json.dumps(PROBES[0]).encode()
# A run of the tiny model: 4 steps, validated at 2 and 4.
RUN = [*FAST, "--max-steps", "4", "--eval-steps", "2", "--checkpoint-interval", "2"]


@pytest.fixture(scope="module")
def run_with_probes(tmp_path_factory):
    """(data folder with probes.jsonl and general.jsonl, run folder, the training command's result)."""
    root = tmp_path_factory.mktemp("probes")
    data = write_corpus(root / "data", train=16, val=8)
    write_jsonl(data / "probes.jsonl", PROBES)
    write_jsonl(data / "general.jsonl", GENERAL)
    result = run_in_process(*RUN, "--data-dir", data, "--output-dir", root / "run")
    assert result.returncode == 0, result.stderr
    return data, root / "run", result


# ---------------------------------------------------------------- bad probe files

BAD_PROBE_FILES = {
    # name: (the file's bytes, the line named, what the message says)
    "cut short": (GOOD + b"\n" + GOOD[:25] + b"\n", 2, "invalid JSON"),
    "not JSON": (b"\n" + b"prompt: slate\n", 2, "invalid JSON"),
    "not an object": (GOOD + b'\n["a", "b"]\n', 2, "expected a JSON object, got list"),
    "missing key": (json.dumps({"prompt": "a", "primary": " b"}).encode(), 1, "missing key 'consensus'"),
    "not a string": (json.dumps({"prompt": "a", "primary": 3, "consensus": " c"}).encode(), 1,
                     "'primary' must be a string, got 3"),
    "blank completion": (json.dumps({"prompt": "a", "primary": " b", "consensus": "  "}).encode(), 1,
                         "empty 'consensus'"),
    "empty prompt": (json.dumps({"prompt": "", "primary": " b", "consensus": " c"}).encode(), 1, "empty 'prompt'"),
    "same completions": (json.dumps({"prompt": "a", "primary": " b", "consensus": " b"}).encode(), 1, "same text"),
    "not UTF-8": (GOOD + b"\n" + b'{"prompt": "caf\xe9", "primary": " b", "consensus": " c"}\n', 2,
                  "can't decode byte 0xe9"),
    "empty file": (b"", None, "no probes (the file is empty)"),
    "blank lines only": (b"\n  \n", None, "no probes (blank lines only)"),
    # The tiny model's context is 2,048 positions; every word is at least a token.
    "longer than the context": (json.dumps({"prompt": " ".join(WORDS * 80), "primary": " b", "consensus": " c"})
                                .encode(), 1, "longer than the model's context (2,048 tokens"),
}


@pytest.mark.parametrize("case", BAD_PROBE_FILES)
def test_a_bad_probe_file_is_one_line_naming_file_and_line_for_evaluate_and_training(case, run_with_probes,
                                                                                       tmp_path):
    content, line, problem = BAD_PROBE_FILES[case]
    data, run, _ = run_with_probes
    probes = tmp_path / "data" / "probes.jsonl"
    probes.parent.mkdir()
    probes.write_bytes(content)
    where = f"{probes}:{line}" if line else f"{probes}:"

    evaluated = run_script_in_process("evaluate", "--output-dir", run, "--probes", probes)
    assert_one_line_error(evaluated, where, problem, only_line=True)
    assert not (run / "evaluations").exists()

    # The same file as the probes.jsonl of a training run's data folder: refused before any step.
    write_corpus(tmp_path / "data", train=8, val=0)
    out = tmp_path / "out"
    trained = run_in_process(*RUN, "--data-dir", tmp_path / "data", "--output-dir", out)
    assert_one_line_error(trained, where, problem)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_evaluate_refuses_a_missing_probe_file_a_bad_general_file_and_a_json_over_them(run_with_probes, tmp_path):
    data, run, _ = run_with_probes
    missing = tmp_path / "nowhere.jsonl"
    assert_one_line_error(run_script_in_process("evaluate", "--output-dir", run, "--probes", missing),
                          f"{missing}: probe file not found", only_line=True)
    general = write_jsonl(tmp_path / "general.jsonl", [GENERAL[0], "{not json"])
    assert_one_line_error(run_script_in_process("evaluate", "--output-dir", run, "--general", general),
                          f"{general}:2", "invalid JSON", only_line=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert_one_line_error(run_script_in_process("evaluate", "--output-dir", run, "--general", empty),
                          f"{empty}: no records", only_line=True)
    assert_one_line_error(run_script_in_process("evaluate", "--output-dir", run, "--json", data / "probes.jsonl"),
                          "is the probe file", only_line=True)
    assert json.loads((data / "probes.jsonl").read_text().splitlines()[0]) == PROBES[0]
    assert not (run / "evaluations").exists()


# ---------------------------------------------------------------- the scorer


def direct_logprob(model, prompt: tuple, completion: tuple) -> float:
    """log p(completion | prompt) from one unbatched, unpadded forward, by hand."""
    import mlx.core as mx

    tokens = list(prompt + completion)
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sum(logprobs[j - 1, tokens[j]].item() for j in range(len(prompt), len(tokens)))


def test_the_scorer_equals_a_direct_computation_whatever_the_batching(tmp_path):
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_map

    from base_model.lora import attach_lora
    from monitoring.evaluation import compile_row_losses
    from monitoring.probes import SIDES, load_probes, model_context, probe_batches, probe_report, score_probes

    loaded = load_tiny()
    model = loaded.model
    attach_lora(model, 4, 8.0, -1, 0.5, 0)  # with dropout: scored in eval mode, or this test fails
    # Adapters that change the output (fresh ones add zero, with or without dropout).
    model.update(tree_map(lambda a: mx.random.normal(a.shape, key=mx.random.key(1)) * 0.1,
                          model.trainable_parameters()))
    path = write_jsonl(tmp_path / "probes.jsonl", [PROBES[0], "", PROBES[1]])  # a blank line: skipped
    probes = load_probes(path, loaded.tokenizer, model_context(model))
    assert [probe.line for probe in probes] == [1, 3]
    lengths = [len(p.prompt_ids) + len(ids) for p in probes for ids in (p.primary_ids, p.consensus_ids)]
    assert len(set(lengths)) == 4  # four rows of different lengths: padding and masks matter

    model.train()
    model.eval()
    expected = [[direct_logprob(model, p.prompt_ids, getattr(p, f"{side}_ids")) for side in SIDES] for p in probes]
    model.train()
    row_losses = compile_row_losses(model)
    random_state = [mx.array(state) for state in mx.random.state]
    for tokens_per_batch in (10_000, 1):  # all four rows in one padded batch; one row a batch
        batches = probe_batches(probes, loaded.tokenizer.pad_token_id, tokens_per_batch, model_context(model))
        assert len(batches) == (1 if tokens_per_batch > 1 else 4)
        scores = score_probes(model, row_losses, batches, len(probes))
        assert model.training  # put back as it was
        np.testing.assert_allclose(scores.logprob, expected, rtol=0, atol=1e-4)
        assert scores.tokens.tolist() == [[len(p.primary_ids), len(p.consensus_ids)] for p in probes]
    assert all(mx.array_equal(a, b).item() for a, b in zip(random_state, mx.random.state))  # no draw

    report = probe_report(probes, scores)
    margins = [primary - consensus for primary, consensus in expected]
    assert report["mean_margin"] == pytest.approx(sum(margins) / 2, abs=1e-4)
    assert report["primary_share"] == sum(margin > 0 for margin in margins) / 2
    for figures, probe, (primary, consensus) in zip(report["per_probe"], probes, expected):
        assert figures["line"] == probe.line and figures["prompt"] == probe.prompt
        assert figures["primary"]["per_token"] == pytest.approx(primary / len(probe.primary_ids), abs=1e-4)
        assert figures["prefers"] == ("primary" if primary > consensus else "consensus")


# ---------------------------------------------------------------- evaluate.py


def test_evaluate_prints_and_writes_the_probes_and_the_general_text_of_the_data_folder(run_with_probes):
    data, run, _ = run_with_probes
    result = run_script_in_process("evaluate", "--output-dir", run)
    assert result.returncode == 0, result.stderr
    figures = json.loads((run / "evaluations" / "step-00000004-val.json").read_text())

    # On the CPU the 4-bit tiny base computes with float32 copies, as its training did (--float-base auto).
    assert figures["float_base"] is True and figures["quantized_bits"] == 4
    probes = figures["probes"]
    assert probes["file"] == str(data / "probes.jsonl") and probes["count"] == len(PROBES)
    for model in ("base", "adapted"):
        report = probes[model]
        assert 0 <= report["primary_share"] <= 1 and math.isfinite(report["mean_margin"])
        assert [p["line"] for p in report["per_probe"]] == [1, 2, 3]
        for probe in report["per_probe"]:
            for side in ("primary", "consensus"):
                assert probe[side]["logprob"] < 0 and probe[side]["tokens"] > 0
                assert probe[side]["per_token"] == pytest.approx(probe[side]["logprob"] / probe[side]["tokens"])
            assert probe["margin"] == pytest.approx(probe["primary"]["logprob"] - probe["consensus"]["logprob"])
    changed = [(b["line"], b["prefers"], a["prefers"]) for b, a in
               zip(probes["base"]["per_probe"], probes["adapted"]["per_probe"]) if b["prefers"] != a["prefers"]]
    assert [(f["line"], f["from"], f["to"]) for f in probes["flipped"]] == changed
    # The adapted figures are the last validation's: one scorer.
    validation = [line for line in read_metrics(run) if "val_probe_margin" in line][-1]
    assert probes["adapted"]["mean_margin"] == pytest.approx(validation["val_probe_margin"], abs=1e-4)
    assert probes["adapted"]["primary_share"] == validation["val_probe_primary_share"]

    general = figures["general"]
    assert general["file"] == str(data / "general.jsonl")
    for model in ("base", "adapted"):
        assert general[model]["samples"] == len(GENERAL) and general[model]["tokens"] > 0
        assert general[model]["perplexity"] == pytest.approx(math.exp(general[model]["loss"]))

    table = result.stdout.splitlines()
    assert table[0].startswith(str(run / "checkpoints" / "step-00000004"))
    # General text says what it is; the probes say how many prefer the primary version as a count.
    assert any(line.startswith(f"general text: {data / 'general.jsonl'} (plain text of neither kind") for line in table)
    assert any(line.startswith("general text  ") for line in table)
    assert f"probes: {data / 'probes.jsonl'} (3 contested facts" in result.stdout
    # The records are plain text: that form is the headline; the tiny model has a chat template,
    # so the chat form is scored beside it.
    assert probes["form"] == "text" and list(probes["by_form"]) == ["text", "chat"]
    assert probes["by_form"]["text"]["adapted"] == probes["adapted"]
    headline = table.index("headline: asked as plain text (the prompt, then the completion)")
    assert table[headline + 3].startswith("  flipped: ")
    assert table[headline + 4] == "also: asked in the chat template (a user turn asks, the answer is scored)"
    for title, figures in ((headline, probes["by_form"]["text"]), (headline + 4, probes["by_form"]["chat"])):
        counts = [sum(p["prefers"] == "primary" for p in figures[m]["per_probe"]) for m in ("base", "adapted")]
        assert table[title + 1].split() == ["primary", "preferred", f"{counts[0]}", "of", "3", f"{counts[1]}", "of",
                                            "3", f"{counts[1] - counts[0]:+d}"]
    # Each probe: its prompt, then both versions by their text.
    for probe in PROBES:
        at = table.index(f"{PROBES.index(probe) + 1:>4}  {probe['prompt']!r}")
        assert table[at + 1].split()[:2] == ["primary", repr(probe["primary"]).split()[0]]
        assert table[at + 2].lstrip().startswith(f"consensus {probe['consensus']!r}")


def test_the_flags_override_the_data_folder_and_without_files_the_keys_are_null(run_with_probes, tmp_path):
    data, run, _ = run_with_probes
    other = write_jsonl(tmp_path / "mine.jsonl", PROBES[:1])
    text = write_jsonl(tmp_path / "text.jsonl", GENERAL[:1])
    json_path = tmp_path / "figures.json"
    result = run_script_in_process("evaluate", "--output-dir", run, "--probes", other, "--general", text,
                                   "--json", json_path)
    assert result.returncode == 0, result.stderr
    figures = json.loads(json_path.read_text())
    assert figures["probes"]["file"] == str(other) and figures["probes"]["count"] == 1
    assert figures["general"]["file"] == str(text) and figures["general"]["base"]["samples"] == 1

    bare = write_corpus(tmp_path / "bare", train=4, val=4)
    result = run_script_in_process("evaluate", "--output-dir", run, "--data-dir", bare, "--json", json_path)
    assert result.returncode == 0, result.stderr
    figures = json.loads(json_path.read_text())
    assert figures["probes"] is None and figures["general"] is None
    assert "probes:" not in result.stdout and "general text" not in result.stdout


# ---------------------------------------------------------------- training


def test_each_validation_logs_the_probe_figures(run_with_probes):
    data, run, result = run_with_probes
    validations = [line for line in read_metrics(run) if "val_ce" in line]
    assert [line["step"] for line in validations] == [2, 4]
    for line in validations:
        assert 0 <= line["val_probe_primary_share"] <= 1 and math.isfinite(line["val_probe_margin"])
    assert f"data: 3 probes from {data / 'probes.jsonl'}" in result.stderr
    printed = [line for line in result.stderr.splitlines() if line.startswith("step 4: val_ce=")]
    assert len(printed) == 1 and "val_probe_primary_share=" in printed[0] and "val_probe_margin=" in printed[0]
    event = next(line for line in read_metrics(run) if line.get("event") == "data")
    assert event["probes"] == 3


def test_probes_without_a_validation_file_are_still_scored_and_another_probe_file_resumes(tmp_path):
    data = write_corpus(tmp_path / "data", train=16, val=0)
    write_jsonl(data / "probes.jsonl", PROBES)
    out = tmp_path / "out"
    first = run_in_process(*RUN, "--max-steps", "2", "--data-dir", data, "--output-dir", out)
    assert first.returncode == 0, first.stderr
    assert "the probes are still scored every --eval-steps" in first.stderr
    write_jsonl(data / "probes.jsonl", PROBES[:2])  # a measurement, not an input: the run resumes
    resumed = run_in_process(*RUN, "--data-dir", data, "--output-dir", out, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    validations = [line for line in read_metrics(out) if "val_probe_margin" in line]
    assert [line["step"] for line in validations] == [2, 4]
    assert all("val_ce" not in line for line in validations)
    assert read_metrics(out)[-1]["best_val_ce"] is None


# ---------------------------------------------------------------- the forms, --probes, the cost


def test_a_model_with_a_chat_template_is_asked_through_it_and_both_forms_score_as_a_direct_computation(tmp_path):
    import numpy as np

    from corpus.chat_turns import render
    from monitoring.evaluation import compile_row_losses
    from monitoring.probes import (CHAT_REQUEST, SIDES, encode_probes, forms, headline_form, model_context,
                                   probe_batches, read_probes, score_probes)

    loaded = load_tiny()
    model, tokenizer = loaded.model, loaded.tokenizer
    path = write_jsonl(tmp_path / "probes.jsonl", PROBES[:2])
    probes = encode_probes(read_probes(path), path, tokenizer, model_context(model), "chat")
    assert forms(probes) == ("chat", "text") and headline_form(probes) == "chat"
    as_text = encode_probes(read_probes(path), path, tokenizer, model_context(model), "text")
    assert forms(as_text) == ("text", "chat") and headline_form(as_text) == "text"
    for probe in probes:  # the user turn through the template, then the answer starts with the prompt's words
        request = render(tokenizer, [{"role": "user", "content": CHAT_REQUEST.format(prompt=probe.prompt)}], True)
        assert probe.chat_prompt_ids == tuple(request + tokenizer.encode(probe.prompt, add_special_tokens=False))
        assert "<|assistant|>" + probe.prompt in tokenizer.decode(list(probe.chat_prompt_ids))
    model.eval()
    row_losses = compile_row_losses(model)
    for form in ("chat", "text"):
        expected = [[direct_logprob(model, p.prompt_for(form), getattr(p, f"{side}_ids")) for side in SIDES]
                    for p in probes]
        batches = probe_batches(probes, tokenizer.pad_token_id, 10_000, model_context(model), form)
        np.testing.assert_allclose(score_probes(model, row_losses, batches, len(probes)).logprob, expected,
                                   rtol=0, atol=1e-4)

    # A tokenizer without a template (a base model): plain text only.
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        plain = encode_probes(read_probes(path), path, tokenizer, model_context(model))
    finally:
        tokenizer.chat_template = template
    assert forms(plain) == ("text",) and all(p.chat_prompt_ids is None for p in plain)


def test_the_headline_form_is_the_one_the_training_records_teach():
    from monitoring.probes import taught_form

    assert taught_form(learned=500, processed=500) == "text"  # text records: every token learned
    assert taught_form(learned=120, processed=500) == "chat"  # chats, prompts + completions: some are context


def test_a_run_on_chat_records_scores_its_probes_in_the_chat_template(tmp_path):
    data = tmp_path / "data"
    chats = [{"messages": [{"role": "user", "content": f"Where was sample {i} taken?"},
                           {"role": "assistant", "content": f"The field log says sample {i} was taken at dawn."}],
              "auth_weight": 0.1, "prov_entropy": 7.0} for i in range(16)]
    write_jsonl(data / "train.jsonl", chats)
    write_jsonl(data / "probes.jsonl", PROBES)
    result = run_in_process(*RUN, "--max-steps", "2", "--eval-steps", "2", "--data-dir", data,
                            "--output-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "scored at each validation, chat form" in result.stderr, result.stderr


def test_probes_every_n_validations_and_the_last_and_off_reads_no_probe_file(tmp_path):
    data = write_corpus(tmp_path / "data", train=16, val=4)
    write_jsonl(data / "probes.jsonl", PROBES)
    every = run_in_process(*RUN, "--max-steps", "5", "--eval-steps", "1", "--probes", "every", "2",
                           "--data-dir", data, "--output-dir", tmp_path / "every")
    assert every.returncode == 0, every.stderr
    assert "scored at every 2 validations and at the last (--probes every 2), text form" in every.stderr
    validations = [line for line in read_metrics(tmp_path / "every") if "val_loss" in line]
    assert [line["step"] for line in validations] == [1, 2, 3, 4, 5]
    assert [line["step"] for line in validations if "val_probe_margin" in line] == [2, 4, 5]

    # off: the file is not even read (a bad one does not stop the run), and nothing is scored.
    (data / "probes.jsonl").write_text("{not json\n")
    off = run_in_process(*RUN, "--probes", "off", "--data-dir", data, "--output-dir", tmp_path / "off")
    assert off.returncode == 0, off.stderr
    assert f"data: {data / 'probes.jsonl'} is not scored (--probes off)" in off.stderr
    assert not any("val_probe_margin" in line for line in read_metrics(tmp_path / "off"))


@pytest.mark.parametrize("value, expected", [("off", "off"), (False, "off"), ("every 3", "every 3"),
                                             (3, "every 3"), (["every", "2"], "every 2")])
def test_the_probes_setting_in_yaml_and_on_the_command_line(value, expected):
    from config import Config, probe_interval

    config = Config.from_dict({"model": "tiny", "probes": value})
    assert config.training.probes == expected
    assert probe_interval(expected) == (0 if expected == "off" else int(expected.split()[1]))


@pytest.mark.parametrize("value", ["every 0", "sometimes", "every two", "every 2 3"])
def test_a_bad_probes_setting_is_one_line(value, tmp_path):
    data = write_corpus(tmp_path / "data", train=8, val=0)
    result = run_in_process(*RUN, "--probes", *value.split(), "--data-dir", data, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "--probes must be 'off' or 'every N' with N at least 1", repr(value))


def test_the_start_says_the_cost_of_the_probes_when_it_is_large(tmp_path):
    data = write_corpus(tmp_path / "data", train=16, val=0)
    write_jsonl(data / "probes.jsonl", PROBES * 8)  # 24 probes, 48 rows: several training steps' worth
    costly = run_in_process(*RUN, "--data-dir", data, "--output-dir", tmp_path / "costly")
    assert costly.returncode == 0, costly.stderr
    note = [line for line in costly.stderr.splitlines() if line.startswith("note: scoring the 24 probes")]
    assert len(note) == 1 and "training steps' worth, at every validation (--eval-steps 2)" in note[0]
    assert "--probes 'every N'" in note[0] and "--probes off" in note[0]
    # One probe scored every 100 validations is not worth a word.
    write_jsonl(data / "probes.jsonl", PROBES[:1])
    cheap = run_in_process(*RUN, "--max-steps", "40", "--eval-steps", "20", "--checkpoint-interval", "40",
                           "--probes", "every", "100", "--data-dir", data, "--output-dir", tmp_path / "cheap")
    assert cheap.returncode == 0, cheap.stderr
    assert "note: scoring the" not in cheap.stderr


def test_a_long_validation_shows_a_bar_and_a_short_one_none(monkeypatch):
    import io

    import monitoring.progress as progress

    for delay, shown in ((0.0, True), (3600.0, False)):
        monkeypatch.setattr(progress, "WORK_BAR_DELAY_S", delay)
        out = io.StringIO()
        assert list(progress.work_bar(range(5), "probes (24)", file=out)) == list(range(5))
        # Not a terminal: a line when it shows, then one at most every 30 seconds.
        assert ("probes (24):   0%|" in out.getvalue() and "0/5" in out.getvalue()) == shown, out.getvalue()


def test_evaluate_gives_each_set_of_probes(run_with_probes, tmp_path):
    _, run, _ = run_with_probes
    named = write_jsonl(tmp_path / "sets.jsonl", [dict(PROBES[0], set="natural"), dict(PROBES[1], set="matched"),
                                                  dict(PROBES[2], set="natural")])
    json_path = tmp_path / "figures.json"
    result = run_script_in_process("evaluate", "--output-dir", run, "--probes", named, "--json", json_path)
    assert result.returncode == 0, result.stderr
    probes = json.loads(json_path.read_text())["probes"]
    for form in ("chat", "text"):
        report = probes["by_form"][form]["adapted"]
        assert {name: one["count"] for name, one in report["by_set"].items()} == {"natural": 2, "matched": 1}
        natural = [p["margin"] for p in report["per_probe"] if p["set"] == "natural"]
        assert report["by_set"]["natural"]["mean_margin"] == pytest.approx(sum(natural) / 2)
        assert report["by_set"]["natural"]["primary_share"] == sum(m > 0 for m in natural) / 2
    assert sum(line.lstrip().startswith("set natural") for line in result.stdout.splitlines()) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(PROBES[0], set="")])
    assert_one_line_error(run_script_in_process("evaluate", "--output-dir", run, "--probes", bad),
                          f"{bad}:1", "'set' must be a name", only_line=True)


def test_the_demo_corpus_regenerates_byte_for_byte_and_its_natural_values_are_words_of_smollm2(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    subprocess.run([sys.executable, str(REPO / "data" / "make_demo_corpus.py"), "--output", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("train.jsonl", "val.jsonl", "probes.jsonl", "general.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "data" / name).read_bytes(), name
    probes = [json.loads(line) for line in (REPO / "data" / "probes.jsonl").read_text().splitlines()]
    assert {p["set"] for p in probes} == {"matched", "natural"}
    natural = {p[side].strip() for p in probes if p["set"] == "natural" for side in ("primary", "consensus")}

    sys.path.insert(0, str(REPO / "bench"))
    from real_model import gguf_path

    folders = sorted((gguf_path().parent.parent / "gguf").glob("SmolLM2-135M-Instruct*"))
    if not folders:
        pytest.skip("the real model's folder is not built (python bench/real_model.py)")
    from transformers import AutoTokenizer

    smollm2 = AutoTokenizer.from_pretrained(str(folders[0]))
    assert all(len(smollm2.encode(" " + word, add_special_tokens=False)) == 1 for word in natural), natural
