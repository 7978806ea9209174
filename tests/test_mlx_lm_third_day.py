"""An mlx-lm user's third day: tool-calling chats as mlx-lm takes them, `mlx_lm lora`'s own flags
and keys, every mistake of a run named at once, a warmup that fits the run, answers from an
instruct model through its chat template, and metric names that say what they measure.

The runs go in the test's process (run_in_process) on the tiny model, a few steps each."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import (FAST, WORDS, assert_one_line_error, read_metrics, run_in_process, train_lines, write_corpus,
                      write_jsonl)
from test_mlx_lm_second_day import learned_positions


def words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


def fresh_tiny_tokenizer():
    """The tiny model's tokenizer, a copy of its own (a test changes its chat template)."""
    from mlx_lm.utils import load_tokenizer

    from base_model import tiny

    return load_tokenizer(Path(tiny.ensure_tiny_model()))


# ------------------------------------------------------------------ tool-calling chats

# The tiny model's template, with tools and tool calls written out as a tool-calling template does.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>TOOLS: {% for tool in tools %}{{ tool['function']['name'] }} {% endfor %}<eos>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}CALL "
    "{{ call['function']['name'] }} {{ call['function']['arguments'] | tojson }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look a record up.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def tool_chat(rng: random.Random, content_key: bool) -> dict:
    """A chat whose assistant calls a tool (`content` null, or absent), then answers from its result."""
    call = {"role": "assistant", "tool_calls": [{"type": "function", "id": "c1", "function": {
        "name": "lookup", "arguments": {"q": words(rng, 2)}}}]}
    if content_key:
        call["content"] = None
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are an archivist."},
        {"role": "user", "content": words(rng, 4)},
        call,
        {"role": "tool", "tool_call_id": "c1", "content": words(rng, 3)},
        {"role": "assistant", "content": words(rng, 5)},
    ]}


def test_tool_calling_chats_render_as_mlx_lm_renders_them_and_their_tool_calls_are_learned(tmp_path):
    from mlx_lm.tuner.datasets import ChatDataset

    from corpus.index import CorpusIndex

    tokenizer = fresh_tiny_tokenizer()
    tokenizer._tokenizer.chat_template = TOOLS_TEMPLATE
    rng = random.Random(3)
    records = [tool_chat(rng, content_key=True), tool_chat(rng, content_key=False)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    every = CorpusIndex.build(path, tokenizer, 512)
    last = CorpusIndex.build(path, tokenizer, 512, turns="last")
    header, eos = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.eos_token_id
    for row, record in enumerate(records):
        tokens = every.samples([row])[0].tokens
        # Token for token what mlx_lm lora trains on, the tools rendered; with mask_prompt, the same offset.
        theirs, _ = ChatDataset([record], tokenizer).process(record)
        masked, offset = ChatDataset([record], tokenizer, mask_prompt=True).process(record)
        assert tokens == theirs == masked
        assert tokenizer.decode(tokens).startswith("<|system|>TOOLS: lookup <eos><|system|>You are an archivist.")
        assert learned_positions(last, row) == set(range(offset, len(tokens)))
        # Every assistant turn, the one that calls the tool too: from after its header through its <eos>.
        answers = [set(range(i + 1, tokens.index(eos, i) + 1)) for i, t in enumerate(tokens) if t == header]
        assert len(answers) == 2 and "CALL lookup" in tokenizer.decode([tokens[i] for i in sorted(answers[0])])
        assert learned_positions(every, row) == answers[0] | answers[1]


@pytest.mark.parametrize("message, fragment", [
    ({"role": "assistant", "content": None}, "messages[1] must be an object with a string 'content' (null or absent "
                                             "only in an assistant message with 'tool_calls')"),
    ({"role": "user", "content": None, "tool_calls": [{"function": {"name": "f"}}]}, "messages[1]: 'tool_calls' must"),
    ({"role": "assistant", "tool_calls": []}, "messages[1]: 'tool_calls' must be a non-empty list"),
])
def test_a_bad_tool_call_is_one_line(message, fragment, tmp_path):
    from corpus.records import parse_record

    from run_safety.errors import UserError

    line = json.dumps({"messages": [{"role": "user", "content": "hi"}, message,
                                    {"role": "assistant", "content": "done"}]})
    with pytest.raises(UserError, match="train.jsonl:3: ") as caught:
        parse_record(line, "train.jsonl", 3)
    assert fragment in str(caught.value)
    with pytest.raises(UserError, match="'tools' must be a list"):
        parse_record(json.dumps({"tools": "lookup", "messages": [{"role": "assistant", "content": "x"}]}), "t", 1)


# ------------------------------------------------------------------ mlx_lm lora's flags and keys

def parse(*argv):
    from train_qlora import build_parser, settings_from_args

    return settings_from_args(build_parser().parse_args([str(arg) for arg in argv]))


def test_mlx_lm_lora_flags_become_ours_and_the_start_says_what_each_became(tmp_path):
    data = write_corpus(tmp_path / "data", train=8, val=0)
    theirs = ["--train", "--data", data, "--iters", "2", "--adapter-path", tmp_path / "out", "--num-layers", "1",
              "--mask-prompt", "--grad-accumulation-steps", "1", "--resume-adapter-file", ""]
    ours = ["--data-dir", data, "--max-steps", "2", "--output-dir", tmp_path / "out", "--lora-layers", "1",
            "--grad-accum", "1", "--init-adapters", ""]
    config, settings = parse(*FAST, *theirs)
    assert config.to_dict() == parse(*FAST, *ours)[0].to_dict()
    result = run_in_process(*FAST, *theirs)
    assert result.returncode == 0, result.stderr
    for line in ("note: --iters 2 is --max-steps 2 here", f"note: --data {data} is --data-dir {data} here",
                 "note: --num-layers 1 is --lora-layers 1 here", "note: --train: this command only trains",
                 "note: --mask-prompt: nothing to change: system, user and tool turns and prompts are never learned"):
        assert line in result.stderr, result.stderr
    assert "finished: reached --iters 2" in result.stderr  # the run's end in the user's words too
    assert [line["step"] for line in train_lines(tmp_path / "out")] == [1, 2]
    # Their name and ours for one setting: one of them, said; no equivalent: refused, each with what to do.
    assert_one_line_error(run_in_process(*FAST, "--iters", "2", "--max-steps", "3"),
                          "--iters and --max-steps are the same setting: give one", only_line=True)
    assert_one_line_error(run_in_process(*FAST, "--test", "--clear-cache-threshold", "1GB"),
                          "--test: mlx_lm lora's, with no equivalent here (evaluate after training with "
                          "src/evaluate.py", "; --clear-cache-threshold 1GB: mlx_lm lora's",
                          only_line=True)
    assert_one_line_error(run_in_process(*FAST, "--data-dir", data, "--val-batches", "-1"),
                          "--val-batches must be at least 1 (got -1) (mlx_lm lora's -1, the whole file, is not taken")
    # A value of theirs that is wrong is named as they wrote it.
    assert_one_line_error(run_in_process(*FAST, "--data-dir", data, "--iters", "0"),
                          "command line: --iters must be at least 1 (got 0)")


def test_every_mistyped_flag_and_every_bad_key_of_the_file_are_named_in_one_message(tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("model: tiny\nitres: 5\nlora_parameters:\n  key: [self_attn.q_proj]\n  rnak: 4\n  scael: 2\n"
                      "optimizer_config:\n  adamw:\n    weight_decy: 0.1\nlora:\n  dropuot: 0.1\n"
                      "chat_feature: conversations\ntext_feature: text\n")
    result = run_in_process("--config", config, "--learning-rat", "1e-4", "--max-stpes", "5", "--lr", "3")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    for fragment in ("unrecognized arguments --learning-rat (did you mean --learning-rate?), --max-stpes (did you "
                     "mean --max-steps?), --lr (did you mean --learning-rate?); and ",
                     f"{config}: unknown settings 'itres' (did you mean 'iters'?), ",
                     "'lora_parameters.key' (did you mean 'lora_parameters.keys'?)",
                     "'lora_parameters.rnak' (did you mean 'lora_parameters.rank'?)",
                     "'lora_parameters.scael' (did you mean 'lora_parameters.scale'?)",
                     "'optimizer_config.adamw.weight_decy' (did you mean 'optimizer_config.adamw.weight_decay'?)",
                     "'lora.dropuot' (did you mean 'lora.dropout'?)",
                     "not supported here (an mlx_lm lora setting with no equivalent): chat_feature: conversations "
                     "(records are read by the field 'messages' here"):
        assert fragment in result.stderr, result.stderr
    assert "text_feature" not in result.stderr  # mlx-lm's default name: the same here
    # Their flags with no equivalent, and the file's mistakes: one message too.
    result = run_in_process("--config", config, "--test")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "command line: --test: mlx_lm lora's, with no equivalent here" in result.stderr
    assert f"; and {config}: unknown settings 'itres'" in result.stderr


@pytest.mark.parametrize("text, fragment", [
    ("lora_parameters:\n  key: [q_proj]\n", "unknown setting 'lora_parameters.key' (did you mean "
                                            "'lora_parameters.keys'?)"),
    ("optimizer_config:\n  adamw:\n    weight_decy: 0.1\n", "'optimizer_config.adamw.weight_decy' (did you mean "
                                                             "'optimizer_config.adamw.weight_decay'?)"),
    ("iters: 5\nlora_parameters:\n  rank: 4\n  rank: 8\n", ":5: 'rank' is given twice (lines 4 and 5): keep one"),
    ("iters: 5\nseed: 1\niters: 6\n", ":4: 'iters' is given twice (lines 2 and 4): keep one"),
])
def test_a_nested_typo_gets_its_sections_name_and_a_key_given_twice_is_refused(text, fragment, tmp_path):
    from run_safety.errors import UserError

    config = tmp_path / "lora.yaml"
    config.write_text("model: tiny\n" + text)
    with pytest.raises(UserError) as raised:
        parse("--config", config)
    assert str(raised.value).startswith(str(config)) and fragment in str(raised.value), raised.value


# ------------------------------------------------------------------ a warmup that fits the run

def test_the_default_warmup_fits_the_run_and_one_as_long_as_the_run_is_said(tmp_path):
    from config import Config

    def fitted(steps: int) -> int:
        return Config.from_dict({"model": "tiny", "max_steps": steps}).training.warmup()

    assert [fitted(n) for n in (2, 20, 39, 40, 100, 999, 1000, 2000)] == [0, 0, 0, 2, 5, 49, 50, 50]
    assert Config.from_dict({"model": "tiny", "max_steps": 20, "warmup_steps": 7}).training.warmup() == 7

    data = write_corpus(tmp_path / "data", train=8, val=0)
    at = FAST.index("--warmup-steps")
    no_warmup = FAST[:at] + FAST[at + 2:]
    args = [*no_warmup, "--data-dir", data, "--learning-rate", "1e-3", "--max-steps", "2"]
    result = run_in_process(*args, "--output-dir", tmp_path / "default")
    assert result.returncode == 0, result.stderr
    # As mlx_lm lora: the first step at the peak rate (the fixed 50 of before gave 0.0, then 2e-05).
    assert [line["lr"] for line in train_lines(tmp_path / "default")] == pytest.approx([1e-3, 5e-4])
    assert "--warmup-steps" not in result.stderr

    result = run_in_process(*args, "--warmup-steps", "50", "--output-dir", tmp_path / "long")
    assert result.returncode == 0, result.stderr
    assert ("note: --warmup-steps 50 is as long as the run (2 steps): the learning rate climbs to 2e-05 at the "
            "last step and never reaches its peak 0.001; give fewer warmup steps, or -1") in result.stderr


# ------------------------------------------------------------------ answers from a model with a chat template

def test_a_model_with_a_chat_template_is_asked_through_it_and_an_empty_answer_says_what_to_try(tmp_path):
    from conftest import run_script_in_process

    # Every record is one word, then the end of the text: the model learns to end right after "the".
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "the"}] * 8)
    out = tmp_path / "run"
    result = run_in_process(*FAST, "--data-dir", tmp_path / "data", "--output-dir", out, "--max-steps", "20",
                            "--learning-rate", "1e-2", "--lambda-weight", "0", "--warmup-steps", "0")
    assert result.returncode == 0, result.stderr

    asked = run_script_in_process("generate", "--output-dir", out, "--prompt", "the", "--max-tokens", "4")
    assert asked.returncode == 0, asked.stderr
    assert ("prompt: chat template (the model has one, as mlx_lm generate uses it; the run trained on plain text "
            "records: --prompt-format text continues the prompt as they were)") in asked.stderr

    plain = run_script_in_process("generate", "--output-dir", out, "--prompt", "the", "--max-tokens", "4",
                                  "--prompt-format", "text")
    assert plain.returncode == 0 and plain.stdout == "\n", plain.stderr
    assert ("note: the answer is empty: the model ended its answer at once (the end-of-sequence token came first); "
            "try --prompt-format chat (an instruct model answers through its chat template") in plain.stderr


# ------------------------------------------------------------------ what a chat run learns, said

def chat(rng: random.Random, answer_words: int = 5) -> dict:
    return {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": words(rng, 6)},
        {"role": "assistant", "content": words(rng, 4)},
        {"role": "user", "content": words(rng, 3)},
        {"role": "assistant", "content": words(rng, answer_words)},
    ]}


def test_a_chat_run_says_what_it_learns_and_its_throughput_counts_every_token_it_processes(tmp_path):
    rng = random.Random(5)
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [chat(rng) for _ in range(8)])
    args = [*FAST, "--data-dir", data, "--max-steps", "2", "--max-seq-length", "256"]
    ends = {}
    for turns in ("all", "last"):
        out = tmp_path / turns
        result = run_in_process(*args, "--learn-assistant-turns", turns, "--output-dir", out)
        assert result.returncode == 0, result.stderr
        said = [line for line in result.stderr.splitlines() if line.startswith("data: learned: ")]
        assert len(said) == 1, result.stderr
        assert ("the last assistant turn of each chat" if turns == "last" else "every assistant turn of each chat, "
                "those that call tools too") in said[0]
        assert "system, user and tool turns and prompts are context: " in said[0] and "tokens of the 8 samples" in said[0]
        lines = train_lines(out)
        end = read_metrics(out)[-1]
        assert end["tokens_processed"] == sum(line["tokens_processed"] for line in lines) > end["tokens"]
        assert end["tokens"] == sum(line["tokens"] for line in lines)
        summary = next(line for line in result.stderr.splitlines() if line.startswith("  tokens "))
        assert summary.startswith(f"  tokens    {end['tokens_processed']:,} processed (") and \
            summary.endswith(f"tok/s), {end['tokens']:,} of them learned"), summary
        ends[turns] = end
    # The same batches: the same tokens processed, whichever turns are learned.
    assert ends["all"]["tokens_processed"] == ends["last"]["tokens_processed"]
    assert ends["all"]["tokens"] > ends["last"]["tokens"]

    # Answers cut off by truncation: said as such.
    short = [{"messages": [{"role": "user", "content": words(rng, 3)}, {"role": "assistant", "content": words(rng, 2)}]}
             for _ in range(3)]
    long = {"messages": [{"role": "user", "content": words(rng, 40)}, {"role": "assistant", "content": words(rng, 3)}]}
    write_jsonl(data / "train.jsonl", [*short, long])
    result = run_in_process(*FAST, "--data-dir", data, "--max-steps", "1", "--max-seq-length", "40",
                            "--learn-assistant-turns", "last", "--output-dir", tmp_path / "cut")
    assert result.returncode == 0, result.stderr
    assert ("note: 1 records are left out: what they teach (a chat's last answer, a completion) lies past "
            "--max-seq-length 40 and truncation cut it off (lines 4)") in result.stderr


# ------------------------------------------------------------------ small things

def test_epochs_end_as_epochs_peft_key_names_get_the_full_ones_and_the_wandb_hint_is_the_same_everywhere(
        tmp_path, monkeypatch):
    import sys

    from train_qlora import build_parser

    data = write_corpus(tmp_path / "data", train=8, val=0)
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "epochs", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert "Run ended: finished: reached --epochs 1 (2 steps)" in result.stderr
    assert "--max-steps" not in result.stderr

    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "keys", "--max-steps", "1",
                            "--lora-keys", "q_proj", "v_proj")
    assert_one_line_error(result, "--lora-keys: 'q_proj', 'v_proj' are not linear layers of this model's blocks",
                          "(did you mean self_attn.q_proj self_attn.v_proj?)")

    hint = 'pip install ".[cpu,wandb]" (Linux CPU; ".[cuda,wandb]" with NVIDIA, ".[wandb]" on a Mac)'
    assert hint in " ".join(build_parser().format_help().split())
    assert '[cpu,wandb]' in (Path(__file__).parent.parent / "pyproject.toml").read_text()
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    result = run_in_process(*FAST, "--data-dir", data, "--output-dir", tmp_path / "w", "--report-to", "wandb")
    assert_one_line_error(result, hint, only_line=True)


# ------------------------------------------------------------------ metric names that say what they are

def test_the_figures_are_named_for_what_they_are_everywhere_and_old_runs_still_read(tmp_path):
    from conftest import read_tensorboard

    from monitoring.metrics_log import read_metrics as read_by_name
    from monitoring.metrics_log import summary_text

    data = write_corpus(tmp_path / "data", train=8, val=4)
    out = tmp_path / "run"
    result = run_in_process(*[arg for arg in FAST if arg != "--no-tensorboard"], "--data-dir", data,
                            "--output-dir", out, "--max-steps", "2", "--eval-steps", "2")
    assert result.returncode == 0, result.stderr
    lines = read_metrics(out)
    train = [line for line in lines if "ce" in line and "event" not in line][-1]
    validation = next(line for line in lines if "val_ce" in line)
    assert {"objective", "ce", "distrust"} <= set(train)
    assert {"val_ce", "val_objective", "val_ce_low_auth", "val_ce_high_auth"} <= set(validation)
    # The lasting keys stay beside them, as they always meant: loss the objective, val_loss the plain CE.
    assert train["loss"] == train["objective"] and validation["val_loss"] == validation["val_ce"]
    assert not any(key.startswith("val_loss_") for key in validation)
    assert lines[-1]["best_val_ce"] == validation["val_ce"]
    tags = {value.tag for event in read_tensorboard(out / "logs") for value in event.summary.value}
    assert {"train/objective", "train/ce", "val/ce", "val/objective"} <= tags
    assert not {tag for tag in tags if tag.endswith("/loss")}
    assert f"step 2: val_ce={validation['val_ce']:.4f}  val_objective=" in result.stderr
    assert "compare val_ce)" in result.stderr and "best val  " in result.stderr
    listed = run_in_process("--list-checkpoints", "--output-dir", out)
    assert "objective" in listed.stdout and "val_ce" in listed.stdout

    # A run written with the names of before reads as today's.
    old = tmp_path / "old" / "metrics.jsonl"
    write_jsonl(old, [{"step": 1, "loss": 3.5, "ce": 7.5}, {"step": 1, "val_loss": 7.4, "val_loss_gap": 0.3},
                      {"event": "end", "reason": "finished", "best_val_loss": 7.4}])
    assert read_by_name(old) == [{"step": 1, "objective": 3.5, "ce": 7.5}, {"step": 1, "val_ce": 7.4, "val_ce_gap": 0.3},
                                 {"event": "end", "reason": "finished", "best_val_ce": 7.4}]
    assert "best val  7.4000" in summary_text(reason="finished", best_val_loss=7.4, best_val_step=1)


def test_a_checkpoint_of_before_with_the_fixed_warmup_resumes_where_the_fitted_warmup_is_the_same(tmp_path):
    from checkpoints import CheckpointManager
    from checkpoints.resume import ConfigMismatch, _load_checked
    from train_qlora import build_parser, run_inputs, settings_from_args

    data = write_corpus(tmp_path / "data", train=8, val=0)
    out = tmp_path / "run"
    before = [*FAST, "--data-dir", data, "--output-dir", out]
    at = before.index("--warmup-steps")
    before[at + 1] = "50"  # as a run saved it when 50 was the default
    assert run_in_process(*before, "--max-steps", "2").returncode == 0
    manager = CheckpointManager(out / "checkpoints")
    latest = manager.latest_valid().path
    today = before[:at] + before[at + 2:]  # no --warmup-steps: fitted to the run

    def load(steps: str):
        config = settings_from_args(build_parser().parse_args([*map(str, today), "--max-steps", steps]))[0]
        return _load_checked(manager, latest, config, run_inputs(config))

    assert load("1000").path == latest  # fitted: 50, the warmup it ran with
    with pytest.raises(ConfigMismatch, match="warmup_steps: checkpoint 50, now -1"):
        load("100")  # fitted: 5
