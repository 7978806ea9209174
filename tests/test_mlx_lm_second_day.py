"""An mlx-lm user's second day: multi-turn chats learned whole, LoRA on the layers they name,
their W&B, epochs instead of iterations, errors in their own words, and what the start of a
run says about scores guessed from text.

Killed runs and the runs that resume them run in processes of their own; the others in the
test's process (run_in_process)."""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import (FAST, REPO, WORDS, assert_one_line_error, load_adapters, read_metrics, run_in_process,
                      train_lines, write_corpus, write_jsonl)


def words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


def chat(rng: random.Random) -> dict:
    """A three-turn chat with a system prompt and a tool turn, as mlx-lm reads it (no scores)."""
    return {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": words(rng, 4)},
        {"role": "assistant", "content": words(rng, 6)},
        {"role": "user", "content": words(rng, 3)},
        {"role": "assistant", "content": words(rng, 5)},
        {"role": "tool", "content": words(rng, 3)},
        {"role": "assistant", "content": words(rng, 7)},
    ]}


def fresh_tiny_tokenizer():
    """The tiny model's tokenizer, a copy of its own (a test may change its chat template)."""
    from mlx_lm.utils import load_tokenizer

    from base_model import tiny

    return load_tokenizer(Path(tiny.ensure_tiny_model()))


def answer_tokens(tokens: list[int], tokenizer) -> list[set[int]]:
    """Per assistant turn, the positions of its answer in the tiny model's rendering
    (`<|role|>content<eos>`): the tokens after `<|assistant|>`, through the `<eos>` that ends it."""
    header, eos = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.eos_token_id
    answers = []
    for i, token in enumerate(tokens):
        if token == header:
            end = tokens.index(eos, i)
            answers.append(set(range(i + 1, end + 1)))
    return answers


def learned_positions(index, row: int) -> set[int]:
    """The token positions the training loss counts for one sample: target j is token j + 1."""
    from corpus.batching import collate

    batch = collate(index, np.array([row]), 1, pad_id=0)
    return {j + 1 for j in np.flatnonzero(batch.mask[0])}


# The system prompt is written before the last user turn: the rendering of a conversation's
# beginning is then not the beginning of the whole conversation's rendering.
SYSTEM_LAST_TEMPLATE = (
    "{% set last = namespace(user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set last.user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{% if loop.index0 == last.user and messages[0]['role'] == 'system' %}"
    "<|system|>{{ messages[0]['content'] }}<eos>{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("template", ["tiny", "system-last"])
def test_the_loss_mask_of_a_three_turn_chat_covers_exactly_its_three_answers(template, tmp_path):
    from corpus.chat_turns import render
    from corpus.index import CorpusIndex

    tokenizer = fresh_tiny_tokenizer()
    if template == "system-last":
        tokenizer._tokenizer.chat_template = SYSTEM_LAST_TEMPLATE
    record = chat(random.Random(0))
    path = write_jsonl(tmp_path / "train.jsonl", [record, {"text": "the field log"}])
    index = CorpusIndex.build(path, tokenizer, 256)  # every assistant turn, the default
    tokens = index.samples([0])[0].tokens
    answers = answer_tokens(tokens, tokenizer)
    assert len(answers) == 3 and tokens == render(tokenizer, record["messages"], add_generation_prompt=False)
    assert learned_positions(index, 0) == set().union(*answers)  # exactly the answers, each with its <eos>
    if template == "system-last":  # the template really is one whose beginnings are not prefixes
        first_two = render(tokenizer, record["messages"][:3], add_generation_prompt=False)
        assert tokens[:len(first_two)] != first_two
    assert learned_positions(index, 1) == set(range(1, len(index.samples([1])[0].tokens)))  # text: whole

    # Only the last answer: exactly what mlx-lm's mask_prompt learns.
    last = CorpusIndex.build(path, tokenizer, 256, turns="last")
    assert learned_positions(last, 0) == answers[-1]
    prompt = render(tokenizer, record["messages"][:-1], add_generation_prompt=True)
    assert min(answers[-1]) == len(prompt)


def test_every_answer_of_a_multi_turn_chat_is_learned_and_the_setting_is_part_of_the_run(tmp_path):
    rng = random.Random(1)
    data = tmp_path / "data"
    records = [chat(rng) for _ in range(4)]
    write_jsonl(data / "train.jsonl", records)
    tokenizer = fresh_tiny_tokenizer()
    from corpus.chat_turns import render

    answers = [answer_tokens(render(tokenizer, r["messages"], False), tokenizer) for r in records]
    every, last = sum(len(a) for turns in answers for a in turns), sum(len(turns[-1]) for turns in answers)
    out = tmp_path / "run"
    args = [*FAST, "--data-dir", data, "--output-dir", out, "--max-seq-length", "256", "--warmup-steps", "0"]
    result = run_in_process(*args, "--max-steps", "1")  # one batch: the 4 chats
    assert result.returncode == 0, result.stderr
    assert train_lines(out)[0]["tokens"] == every

    # Learning only the last answer changes the result: a resume must keep the setting.
    refused = run_in_process(*args, "--max-steps", "2", "--learn-assistant-turns", "last", "--auto-resume")
    assert_one_line_error(refused, "cannot resume", "learn_assistant_turns: checkpoint 'all', now 'last'")
    fresh = run_in_process(*args, "--max-steps", "1", "--learn-assistant-turns", "last", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert train_lines(out)[0]["tokens"] == last < every
    assert len(list((out / "cache").glob("index-*.safetensors"))) == 2  # one index per setting

    from config import Config

    # A checkpoint from before the setting learned the last answer only: it resumes as that.
    saved = Config.from_dict({"model": "tiny"}).to_dict()
    del saved["training"]["learn_assistant_turns"]
    assert Config.from_saved(saved, "old").training.learn_assistant_turns == "last"


# ------------------------------------------------------------------ LoRA where the user wants it

# An attention-only run (--lora-keys self_attn.q_proj self_attn.v_proj) killed and resumed bit for bit,
# with LoRA on exactly those layers: test_mlx_lm_users' test of each option.


def test_a_lora_key_the_model_does_not_have_is_named_with_the_ones_it_has(tmp_path):
    data = write_corpus(tmp_path / "data", train=8, val=0)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out", "--max-steps", "1",
                            "--lora-keys", "self_attn.q_proj,attn.qkv")
    assert_one_line_error(result, "--lora-keys: 'attn.qkv' is not a linear layer of this model's blocks; they are: "
                                  "mlp.down_proj mlp.gate_proj mlp.up_proj self_attn.k_proj self_attn.o_proj "
                                  "self_attn.q_proj self_attn.v_proj", only_line=False)
    config = tmp_path / "lora.yaml"
    config.write_text(f"model: tiny\ndata: {data}\nlora_parameters:\n  rank: 4\n  scale: 2.0\n  keys: [q_proj]\n")
    result = run_in_process("--config", config, "--output-dir", tmp_path / "out", "--max-steps", "1")
    assert_one_line_error(result, f"{config}: 'lora_parameters.keys': 'q_proj' is not a linear layer")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ Weights & Biases, offline


def wandb_history(run_folder: Path) -> dict[int, dict]:
    """step -> {name: value} of a W&B offline run, read back from its .wandb file: W&B's
    transaction log (LevelDB's log format: 32 KiB blocks of records, each with a 7-byte
    header of checksum, length and kind, split across blocks as FIRST/MIDDLE/LAST) of
    wandb's own Record protobufs. wandb ships no Python reader of it any more."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    history, position, pending = {}, 7, b""
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(int(items["_step"]), {}).update(
                    {key: value for key, value in items.items() if not key.startswith("_")})
    return history


def test_report_to_wandb_offline_logs_the_figures_of_metrics_jsonl_and_a_resume_continues_the_run(
        tmp_path, monkeypatch):
    """The example mlx-lm YAML (lora_parameters.keys, report_to: wandb) trains as written."""
    pytest.importorskip("wandb", reason="W&B is an extra: pip install .[cpu,wandb]")
    from monitoring.metrics_log import tag_for

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(home))  # W&B must write nothing there: everything goes to the run folder
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    quick = ["--output-dir", out, "--max-seq-length", "48", "--batch-size", "4", "--val-batches", "1",
             "--eval-steps", "2", "--checkpoint-interval", "2", "--no-tensorboard"]
    example = REPO / "examples" / "lora_config_wandb.yaml"
    first = run_in_process("--config", example, *quick, "--max-steps", "4")
    assert first.returncode == 0, first.stderr
    (said,) = [line for line in first.stderr.splitlines() if line.startswith("W&B:")]
    assert said.startswith("W&B: new run ") and f"offline, in {out.resolve() / 'wandb'}" in said
    resumed = run_in_process("--config", example, *quick, "--max-steps", "6", "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    run_id = said.split()[3]
    assert f"W&B: continuing run {run_id} " in resumed.stderr

    folders = sorted((out / "wandb").glob("offline-run-*"))
    # One W&B run, two sessions: offline-run-<time>-<run id>, and "-1" after it when both started in the same second.
    assert [folder.name.split("-")[3] for folder in folders] == [run_id, run_id], folders
    logged = {}
    for folder in folders:
        for step, figures in wandb_history(folder).items():
            logged.setdefault(step, {}).update(figures)
    expected = {}
    for line in read_metrics(out):
        if "step" in line and "event" not in line:
            expected.setdefault(line["step"], {}).update(
                {tag_for(key): value for key, value in line.items() if key != "step" and value is not None})
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and logged == expected  # every figure, at its step
    assert {"train/objective", "val/ce", "train/lr"} <= set(logged[4])
    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["trainer"]["wandb_run_id"] == run_id

    # The YAML's lora_parameters.keys, as written: attention only.
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert {name.split(".")[4] for name in load_adapters(out)} == {"q_proj", "v_proj"}
    assert list(home.rglob("*")) == []  # nothing written outside the output folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "run"]


def test_report_to_wandb_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    data = write_corpus(tmp_path / "data", train=8, val=0)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out", "--report-to", "wandb")
    assert_one_line_error(result, "--report-to wandb: the wandb package is not installed", 'pip install ".[cpu,wandb]"',
                          only_line=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ epochs


def test_epochs_set_the_steps_from_the_corpus_and_the_global_batch(tmp_path):
    data = write_corpus(tmp_path / "data", train=24, val=8)
    out = tmp_path / "run"
    args = [*FAST, "--data-dir", data, "--output-dir", out, "--grad-accum", "2"]
    result = run_in_process(*args, "--epochs", "2")
    assert result.returncode == 0, result.stderr
    assert "steps: 2 epochs of 24 training samples, 6 batches of 4 each, 2 batches per step: 6 steps" in \
        result.stderr.splitlines()
    assert train_lines(out)[-1]["step"] == 6 and "finished: reached --epochs 2 (6 steps)" in result.stderr
    # A run of 2 epochs continued to 3: the steps follow again, from the same corpus.
    more = run_in_process(*args, "--epochs", "3", "--auto-resume")
    assert more.returncode == 0, more.stderr
    assert "at step 6" in more.stderr and train_lines(out)[-1]["step"] == 9

    both = run_in_process(*args, "--epochs", "2", "--max-steps", "5")
    assert_one_line_error(both, "command line: --max-steps and --epochs both say how long to train: give one of them")
    config = tmp_path / "lora.yaml"
    config.write_text("model: tiny\niters: 5\nepochs: 2\n")
    both = run_in_process("--config", config, "--data-dir", data, "--output-dir", tmp_path / "x")
    assert_one_line_error(both, f"{config}: 'iters' and 'epochs' both say how long to train")
    # A flag overrides the file's other one: --epochs over the file's iters.
    config.write_text("model: tiny\niters: 5\n")
    from train_qlora import build_parser, settings_from_args

    settings, _ = settings_from_args(build_parser().parse_args(["--config", str(config), "--epochs", "1"]))
    assert (settings.training.epochs, settings.training.max_steps) == (1, 2000)  # max_steps: set from the corpus


# ------------------------------------------------------------------ errors in the user's words


@pytest.mark.parametrize("text, fragment", [
    ("iters: three hundred\n", "'iters' must be an integer, got 'three hundred'"),
    ("steps_per_eval: 0\n", "'steps_per_eval' must be at least 1 (got 0)"),
    ("lora_parameters:\n  rank: 0\n", "'lora_parameters.rank' must be at least 1 (got 0)"),
    ("optimizer_config:\n  adamw:\n    eps: -1\n", "'optimizer_config.adamw.eps' must be a positive number"),
    ("training:\n  max_steps: many\n", "'training.max_steps' must be an integer"),
    ("eval_steps: 0\n", "'eval_steps' must be at least 1"),
    ("itres: 5\n", "unknown setting 'itres' (did you mean 'iters'?)"),
    ("save_evry: 5\n", "unknown setting 'save_evry' (did you mean 'save_every'?)"),
    ("learn_assistant_turns: first\n", "'learn_assistant_turns' must be one of all, last (got 'first')"),
    ("report_to: swanlab\n", "report_to: swanlab (wandb;"),
])
def test_a_yaml_mistake_is_named_as_the_user_wrote_it(text, fragment, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("model: tiny\n" + text)
    result = run_in_process("--config", config, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, f"error: {config}: ", fragment, only_line=True)


@pytest.mark.parametrize("flags, message", [
    (["--max-stpes", "5"], "unrecognized argument --max-stpes (did you mean --max-steps?)"),
    (["--learning_rate", "1e-3"], "unrecognized argument --learning_rate (did you mean --learning-rate?)"),
    (["--max-step", "5"], "unrecognized argument --max-step (did you mean --max-steps?)"),  # no abbreviations
    (["--lora-layer=1"], "unrecognized argument --lora-layer=1 (did you mean --lora-layers?)"),
])
def test_a_mistyped_flag_gets_the_flag_it_was_close_to(flags, message):
    result = run_in_process("--model", "tiny", *flags)
    assert result.returncode == 2 and result.stderr == f"train_qlora.py: error: {message} (see --help)\n"


def test_a_line_cut_short_names_the_column_where_it_ends(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": "a b c"}, '{"text": "hello"'])
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "train.jsonl:2: invalid JSON (Expecting ',' delimiter at column 17, where the "
                                  "line ends: is it cut short?)")
    write_jsonl(data / "train.jsonl", ['{"text": "a" "b"}'])
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "train.jsonl:1: invalid JSON (Expecting ',' delimiter at column 14)")


# ------------------------------------------------------------------ what the start and the end say


def test_scores_from_text_alone_are_said_with_how_to_train_plainly_and_notes_come_only_when_asked(tmp_path):
    data = tmp_path / "data"
    rng = random.Random(2)
    write_jsonl(data / "train.jsonl", [{"text": words(rng, 8)} for _ in range(6)] +
                [{"text": words(rng, 8), "year": 1921} for _ in range(2)])
    out = tmp_path / "run"
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert ("data: 6 of them have no metadata either (source_type, year, publisher, url, citation_count, evidence): "
            "their scores are guessed from their wording alone; they weight the loss at --lambda-weight 1; to train "
            "plainly, without weights: --lambda-weight 0") in result.stderr.splitlines()
    assert "--lora-layers" not in result.stderr  # the default (16) is more than tiny's 2 blocks: no request to note
    summary = result.stderr.split("Run ended:", 1)[1]
    assert "in training steps (every session of the run)" in summary
    assert "this session, as the progress line counts it" in summary
    assert next(line for line in read_metrics(out) if line.get("event") == "data")["train_scored_from_text"] == 6

    plain = run_in_process(*FAST, "--data-dir", data, "--output-dir", out, "--max-steps", "1", "--fresh",
                           "--lambda-weight", "0", "--lora-layers", "16")
    assert plain.returncode == 0, plain.stderr
    assert "they do not weight the loss here (plain cross-entropy)" in plain.stderr
    assert "note: --lora-layers 16 is more than the model's 2 layers; using all 2" in plain.stderr.splitlines()
    config = tmp_path / "lora.yaml"
    config.write_text(f"model: tiny\nnum_layers: 8\ndata: {data}\n")
    named = run_in_process("--config", config, *FAST[2:], "--output-dir", out, "--max-steps", "1", "--fresh")
    assert f"note: {config}: 'num_layers' 8 is more than the model's 2 layers; using all 2" in named.stderr.splitlines()
