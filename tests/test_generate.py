"""generate.py: text from the model a run trained, streamed.

It generates what mlx-lm generates from `mlx_lm.load(base, adapter_path=RUN)`
with the same prompt tokens: through the chat template when the model has one (as
mlx_lm generate), as plain text with --prompt-format text, saying which.
Bad input is one line on stderr and exit 2.

The first test runs generate.py in a process of its own, as a user does; the
others in the test's process.
"""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from conftest import (FAST, REPO, WORDS, copy_with_damaged_adapters, run_in_process, run_script,
                      run_script_in_process, train_on_a_tiny_copy, write_jsonl)

GENERATE = REPO / "src" / "generate.py"
PROMPT = "the measurement was taken at dawn"


def run_generate(*args) -> subprocess.CompletedProcess:
    return run_script("generate", *args)


def generate_in_process(*args) -> subprocess.CompletedProcess:
    return run_script_in_process("generate", *args)


def mlx_lm_text(run, prompt_ids, max_tokens, adapters=None) -> str:
    """Greedy generation by mlx-lm itself from the base the run names and its adapters."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import stream_generate

    adapter_config = json.loads((run / "adapter_config.json").read_text())
    model, tokenizer = load(adapter_config["model"], adapter_path=str(adapters or run))
    return "".join(r.text for r in stream_generate(model, tokenizer, mx.array(prompt_ids(tokenizer)),
                                                   max_tokens=max_tokens))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run on plain text records, on a local copy of the tiny model (so that the base can go missing)."""
    root = tmp_path_factory.mktemp("generate")
    base, out = train_on_a_tiny_copy(root, val=0)
    return root, base, out


def test_generates_the_trained_model_text_streaming_plain_text(text_run):
    _, _, out = text_run
    result = run_generate("--output-dir", out, "--prompt", PROMPT, "--max-tokens", "12", "--prompt-format", "text")
    assert result.returncode == 0, result.stderr
    assert "prompt: plain text (--prompt-format text)" in result.stderr
    expected = mlx_lm_text(out, lambda tokenizer: tokenizer.encode(PROMPT), 12)
    assert expected.strip() and result.stdout == expected + "\n"

    # An older checkpoint: its own adapters.
    first = out / "checkpoints" / "step-00000005"
    result = run_generate("--output-dir", out, "--prompt", PROMPT, "--max-tokens", "12", "--checkpoint", first,
                          "--prompt-format", "text")
    assert result.returncode == 0, result.stderr
    assert "(step 5)" in result.stderr
    assert result.stdout == mlx_lm_text(out, lambda tokenizer: tokenizer.encode(PROMPT), 12, adapters=first) + "\n"


def test_a_run_trained_on_chat_records_is_prompted_through_the_chat_template(tmp_path):
    rng = random.Random(0)
    records = [{"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=6))},
                             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=8))}],
                "auth_weight": 0.5, "prov_entropy": 1.0} for _ in range(12)]
    write_jsonl(tmp_path / "data" / "train.jsonl", records)
    out = tmp_path / "run"
    result = run_in_process(*FAST, "--data-dir", tmp_path / "data", "--output-dir", out, "--max-steps", "3")
    assert result.returncode == 0, result.stderr

    result = generate_in_process("--output-dir", out, "--prompt", PROMPT, "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "prompt: chat template (the model has one, as mlx_lm generate uses it)" in result.stderr

    def chat(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             tokenize=True)

    assert result.stdout == mlx_lm_text(out, chat, 8) + "\n"
    result = generate_in_process("--output-dir", out, "--prompt", PROMPT, "--max-tokens", "8",
                                 "--prompt-format", "text")
    assert "prompt: plain text (--prompt-format text)" in result.stderr


def refused(capsys, *argv) -> str:
    import generate

    assert generate.main([str(arg) for arg in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(text_run, tmp_path, capsys):
    root, base, out = text_run
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert "no checkpoints, so no adapters to generate from" in refused(capsys, "--output-dir", empty, "--prompt", "x")
    assert "no such run folder" in refused(capsys, "--output-dir", tmp_path / "nowhere", "--prompt", "x")
    assert "--max-tokens must be at least 1" in refused(capsys, "--output-dir", out, "--prompt", "x", "--max-tokens", 0)
    assert "--prompt is empty" in refused(capsys, "--output-dir", out, "--prompt", " ")

    damaged = copy_with_damaged_adapters(out, tmp_path / "damaged", "step-00000010")
    line = refused(capsys, "--output-dir", damaged, "--prompt", "x", "--checkpoint",
                   damaged / "checkpoints" / "step-00000010")
    assert "invalid" in line and "step-00000010" in line

    moved = root / "tiny-base-moved"
    base.rename(moved)
    try:
        line = refused(capsys, "--output-dir", out, "--prompt", "x")
        assert "base model" in line and "not found" in line
    finally:
        moved.rename(base)
