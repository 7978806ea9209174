"""The chunked loss (chunked_loss.py): the same losses, distrust weighting and gradients as the
whole batch's logits at once, within float rounding, on every kind of output layer; models whose
output is not their plain output layer keep the whole loss; and runs with chunks train, validate,
resume exactly and run under several processes like runs without."""

from __future__ import annotations

import json
import os
import signal
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from training.chunked_loss import AUTO, AUTO_LOGITS, AUTO_MIN_CHUNKS, WHOLE, loss_plan, token_losses
from conftest import (FAST, adapters_equal, load_adapters, read_metrics, run_cli, run_in_process,
                      run_script_in_process, train_lines)
from monitoring.evaluation import compile_row_losses
from training.optimization import gradient_function

# Each chunk runs the operations autograd runs on the whole batch, on its rows: on this CPU
# (MLX 0.32.4) the losses, the gradients and whole runs came out equal to the bit. Where a
# backend's matrix product gives a row another rounding for another number of rows (not
# measured: Metal, CUDA), they would differ by float rounding, which Adam carries forward
# (as between any two summation orders): hence tolerances, not equality.
GRADIENT_TOLERANCE = 1e-5
RUN_TOLERANCE = 1e-4
CHUNKED = ["--loss-chunk-size", "16"]  # FAST's batches (4 x up to 48 tokens) in up to 12 chunks


def tiny_model(tmp_path, *, tied: bool = True, bits: int = 4, dora: bool = False):
    """The tiny model (tied embedding), or one of its shape with its own lm_head; with LoRA
    (or DoRA) on every block, its B matrices drawn so that every adapter has a gradient."""
    from base_model import loading, lora, tiny

    if tied:
        name = "tiny"
    else:
        name = str(tiny.build_random_model(tmp_path / "untied", {"tie_word_embeddings": False}, seed=7))
    loaded = loading.load_model(name, bits)
    model = loaded.model
    lora.attach_lora(model, 4, 8.0, -1, 0.0, seed=0, fine_tune_type="dora" if dora else "lora")
    mx.random.seed(5)
    model.load_weights([(name, mx.random.normal(value.shape) * 0.05) for name, value in
                        tree_flatten(model.trainable_parameters()) if name.endswith("lora_b")], strict=False)
    model.train()
    return model


def a_batch(length: int = 40, rows: int = 3, vocabulary: int = 1024):
    rng = np.random.default_rng(3)
    inputs = mx.array(rng.integers(0, vocabulary, (rows, length)), dtype=mx.int32)
    targets = mx.array(rng.integers(0, vocabulary, (rows, length)), dtype=mx.int32)
    mask = mx.array((rng.random((rows, length)) > 0.2).astype(np.float32))
    weights = mx.array(rng.uniform(0.2, 3.0, rows).astype(np.float32))
    return inputs, targets, mask, weights


def relative_difference(a: dict, b: dict) -> float:
    return max(float(mx.abs(a[k] - b[k]).max().item()) / max(float(mx.abs(b[k]).max().item()), 1e-30) for k in b)


@pytest.mark.parametrize("kind", ["tied 4-bit", "lm_head 4-bit", "lm_head float", "DoRA"])
def test_chunks_give_the_whole_losses_and_gradients_within_rounding(tmp_path, kind):
    model = tiny_model(tmp_path, tied=kind in ("tied 4-bit", "DoRA"), bits=0 if kind == "lm_head float" else 4,
                       dora=kind == "DoRA")
    batch = a_batch()
    whole = gradient_function(model, loss_plan(model, WHOLE), compiled=True)(*batch)
    reference = dict(tree_flatten(whole[2]))
    assert all(float(mx.abs(g).max().item()) > 0 for g in reference.values())  # every adapter learns
    for chunk, compiled in ((7, True), (16, False), (119, True)):
        w, c, grads = gradient_function(model, loss_plan(model, chunk), compiled=compiled)(*batch)
        assert np.allclose([w.item(), c.item()], [whole[0].item(), whole[1].item()], rtol=1e-6, atol=0), chunk
        assert relative_difference(dict(tree_flatten(grads)), reference) < GRADIENT_TOLERANCE, chunk
    # Forward only (validation, evaluate.py): the same losses per row.
    inputs, targets, mask, _ = batch
    rows = compile_row_losses(model, loss_plan(model, 16))(inputs, targets, mask)
    assert mx.allclose(rows, compile_row_losses(model)(inputs, targets, mask), rtol=1e-6, atol=0).item()


def test_automatic_chunks_follow_the_size_of_the_logits(tmp_path):
    plan = loss_plan(tiny_model(tmp_path), AUTO)
    assert plan.vocabulary == 1024 and plan.note is None
    # The tiny model's batches hold few logits: computed whole, as before the chunks existed.
    assert plan.chunk_for(4 * 48) is None and plan.chunk_for(AUTO_LOGITS // 1024) is None
    # Past AUTO_LOGITS: at least AUTO_MIN_CHUNKS chunks, each at most AUTO_LOGITS logits.
    tokens = AUTO_LOGITS // 1024 + 1
    assert plan.chunk_for(tokens) == -(-tokens // AUTO_MIN_CHUNKS)
    assert plan.chunk_for(10**6) == AUTO_LOGITS // 1024
    assert loss_plan(tiny_model(tmp_path), 16).chunk_for(16) is None  # one chunk would hold them all
    assert loss_plan(tiny_model(tmp_path), WHOLE).head is None


def test_a_model_with_soft_capped_logits_keeps_the_whole_loss_with_a_note():
    from mlx_lm.models import gemma2

    mx.random.seed(0)
    model = gemma2.Model(gemma2.ModelArgs(model_type="gemma2", hidden_size=32, num_hidden_layers=1,
                                          intermediate_size=64, num_attention_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                          vocab_size=256, num_key_value_heads=1, final_logit_softcapping=3.0))
    model.freeze()
    plan = loss_plan(model, AUTO)
    assert plan.head is None and "soft-cap" in plan.note
    inputs, targets, _, _ = a_batch(rows=2, length=24, vocabulary=256)
    expected = nn.losses.cross_entropy(model(inputs), targets)
    assert mx.allclose(token_losses(model, inputs, targets, plan), expected).item()


def test_a_run_in_chunks_learns_what_a_run_without_learns(corpus, tmp_path):
    args = [*FAST, "--data-dir", corpus, "--max-steps", "10", "--lora-dropout", "0.1", "--learning-rate", "1e-3"]
    chunked = run_in_process(*args, *CHUNKED, "--output-dir", tmp_path / "chunked")
    whole = run_in_process(*args, "--loss-chunk-size", "0", "--output-dir", tmp_path / "whole")
    assert chunked.returncode == 0 and whole.returncode == 0, chunked.stderr + whole.stderr
    a, b = train_lines(tmp_path / "chunked"), train_lines(tmp_path / "whole")
    assert [line["tokens"] for line in a] == [line["tokens"] for line in b]
    assert np.allclose([line["objective"] for line in a], [line["objective"] for line in b], rtol=1e-5, atol=0)
    val = [[line["val_ce"] for line in read_metrics(out) if "val_ce" in line] for out in
           (tmp_path / "chunked", tmp_path / "whole")]
    assert len(val[0]) == 2 and np.allclose(val[0], val[1], rtol=1e-5, atol=0)
    difference = relative_difference(load_adapters(tmp_path / "chunked"), load_adapters(tmp_path / "whole"))
    assert difference < RUN_TOLERANCE
    # evaluate.py takes the run's setting: base and adapted losses in chunks, the same figures.
    figures = []
    for out in (tmp_path / "chunked", tmp_path / "whole"):
        result = run_script_in_process("evaluate", "--output-dir", out, "--json", out / "evaluation.json")
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "evaluation.json").read_text())
        figures.append([report[side]["overall"]["loss"] for side in ("base", "adapted")])
    assert np.allclose(figures[0], figures[1], rtol=1e-6, atol=0)


def test_chunks_with_grad_checkpoint_learn_what_chunks_without_it_learn(corpus, tmp_path):
    args = [*FAST, *CHUNKED, "--data-dir", corpus, "--max-steps", "4", "--learning-rate", "1e-3"]
    checkpointed = run_cli(*args, "--grad-checkpoint", "--output-dir", tmp_path / "gc")  # it patches a class
    plain = run_in_process(*args, "--output-dir", tmp_path / "plain")
    assert checkpointed.returncode == 0 and plain.returncode == 0, checkpointed.stderr + plain.stderr
    assert np.allclose([line["objective"] for line in train_lines(tmp_path / "gc")],
                       [line["objective"] for line in train_lines(tmp_path / "plain")], rtol=1e-5, atol=0)
    assert relative_difference(load_adapters(tmp_path / "gc"), load_adapters(tmp_path / "plain")) < RUN_TOLERANCE


def test_a_run_in_chunks_killed_and_resumed_ends_bit_identical(corpus, tmp_path):
    from test_resume import committed_steps, start_cli, wait_until

    args = [*FAST, *CHUNKED, "--data-dir", corpus, "--max-steps", "10", "--checkpoint-interval", "1",
            "--lora-dropout", "0.1"]
    reference = run_in_process(*args, "--output-dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    process = start_cli(*args, "--output-dir", out, stderr_path=log)
    wait_until(lambda: len(committed_steps(log)) >= 3, process, timeout=120)
    time.sleep(0.05 * (os.getpid() % 5))  # somewhere in the next steps
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_in_process(*args, "--output-dir", out, "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert [(line["step"], line["objective"]) for line in train_lines(out)] == \
        [(line["step"], line["objective"]) for line in train_lines(tmp_path / "reference")]
    assert adapters_equal(load_adapters(out), load_adapters(tmp_path / "reference"))


def test_two_processes_in_chunks_learn_what_one_process_learns(corpus, tmp_path):
    from test_distributed import LAUNCHER, RELATIVE_TOLERANCE, exit_codes, launch

    if not LAUNCHER.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    args = [*FAST, *CHUNKED, "--data-dir", corpus, "--max-steps", "3", "--seed", "3", "--learning-rate", "1e-3"]
    two = launch(2, *args, "--output-dir", tmp_path / "two")
    assert "Run ended: finished" in two.stderr and exit_codes(two) == {}, two.stderr
    # The pre-flight decided for both ranks alike: rank 0 says it once.
    assert two.stderr.count("memory: the longest batch (2 x 48 tokens in each of 2 processes) peaks at") == 1
    one = run_in_process(*args, "--output-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert relative_difference(load_adapters(tmp_path / "two"), load_adapters(tmp_path / "one")) < RELATIVE_TOLERANCE


def loss_peak(tokens: int, chunk: int, width: int = 16, vocabulary: int = 8192) -> tuple[float, float]:
    """(MLX bytes the compiled gradient of the chunked loss allocates at most beyond its inputs,
    bytes of one chunk's logits) on a float output layer: products heavy enough that MLX
    encodes ahead of what it computes, as on a real vocabulary."""
    from training import chunked_loss

    mx.random.seed(0)
    head = nn.Linear(width, vocabulary, bias=False)
    hidden = mx.random.normal((2, tokens // 2, width))
    targets = mx.random.randint(0, vocabulary, (2, tokens // 2))
    mask, weights = mx.ones((2, tokens // 2)), mx.array([0.5, 2.0])
    mx.eval(head.parameters(), hidden, targets)
    step = mx.compile(mx.value_and_grad(
        lambda h: chunked_loss.weighted_sum_in_chunks(head, h, targets, mask, weights, chunk)[0]))
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(hidden))
    return mx.get_peak_memory() - before, chunk * vocabulary * 4


def test_the_loss_memory_does_not_grow_with_the_batch():
    # MLX allocates what it encodes, up to about a hundred operations ahead of what it computes:
    # without the gate between chunks, three chunks' buffers (15 chunk-sized) were in use at once.
    few, buffer = loss_peak(4 * 128, 128)
    many, _ = loss_peak(32 * 128, 128)
    assert few <= 7 * buffer and many <= 7 * buffer, (few / buffer, many / buffer)
    assert many <= few + buffer  # 8 times the tokens: the inputs' own gradient grows, not the logits'
