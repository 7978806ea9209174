"""The Empirical Distrust objective and the masked loss, against hand-computed values."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_tiny
from corpus.batching import collate
from corpus.index import CorpusIndex
from training.distrust import DistrustObjective, distrust_scores
from run_safety.errors import UserError
from training.chunked_loss import loss_sums


def test_distrust_score_matches_the_published_formula():
    for a, h in [(0.0, 0.0), (0.5, 2.0), (0.99, 0.1), (0.05, 4.5)]:
        expected = 2.7 * (math.log(1 - a + 1e-8) + h) ** 2
        assert distrust_scores(np.array([a]), np.array([h]), 2.7)[0] == pytest.approx(expected, rel=1e-12)


def test_reference_objective_adds_lambda_times_mean_score():
    auth, entropy = np.array([0.1, 0.9, 0.5]), np.array([3.0, 0.2, 1.0])
    objective = DistrustObjective(2.7, 0.7, "reference", auth, entropy)
    d = [2.7 * (math.log(1 - a + 1e-8) + h) ** 2 for a, h in zip(auth, entropy)]
    assert objective.objective(9.9, 2.0, auth, entropy) == pytest.approx(2.0 + 0.7 * sum(d) / 3, rel=1e-12)
    assert np.all(objective.weights(auth, entropy) == 1.0)


def test_weighted_mode_weights_have_corpus_mean_one_and_lambda_zero_is_plain():
    rng = np.random.default_rng(0)
    auth, entropy = rng.uniform(0, 0.99, 500), rng.uniform(0, 5, 500)
    weighted = DistrustObjective(2.7, 1.0, "weighted", auth, entropy)
    weights = weighted.weights(auth, entropy)
    assert weights.mean() == pytest.approx(1.0, rel=1e-5)
    d = distrust_scores(auth, entropy, 2.7)
    assert weights[0] == pytest.approx(d[0] / d.mean(), rel=1e-5)
    plain = DistrustObjective(2.7, 0.0, "weighted", auth, entropy)
    assert np.all(plain.weights(auth, entropy) == 1.0)


def test_weighted_mode_refuses_a_corpus_whose_scores_are_all_zero():
    with pytest.raises(UserError, match=r"mean of d\*\*lambda over the training set is 0"):
        DistrustObjective(2.7, 30.0, "weighted", np.zeros(3), np.zeros(3))  # d**30 underflows to 0


def test_padding_never_counts(tmp_path):
    """A padded batch gives the loss of its samples computed one by one, unpadded."""
    loaded = load_tiny()
    model, tokenizer = loaded.model, loaded.tokenizer
    path = tmp_path / "train.jsonl"
    texts = ["the measurement was taken", "a much longer field log entry about copper voltage readings at dawn",
             "letter"]
    import json
    path.write_text("".join(json.dumps({"text": t, "auth_weight": 0.3, "prov_entropy": 1.0}) + "\n" for t in texts))
    index = CorpusIndex.build(path, tokenizer, max_tokens=64)
    batch = collate(index, np.arange(3), batch_size=4, pad_id=tokenizer.pad_token_id)
    assert batch.inputs.shape[1] >= max(index.lengths) - 1 and batch.indices[3] == -1  # a fill row

    weights = np.array([1.0, 2.0, 0.5, 0.0], dtype=np.float32)
    weighted_sum, ce_sum = loss_sums(model, mx.array(batch.inputs), mx.array(batch.targets),
                                     mx.array(batch.mask), mx.array(weights))
    by_hand_ce, by_hand_weighted, tokens = 0.0, 0.0, 0
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
        logits = model(mx.array([ids[:-1]]))[0]
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = [-log_probs[j, ids[j + 1]].item() for j in range(len(ids) - 1)]
        by_hand_ce += sum(nll)
        by_hand_weighted += weights[row] * sum(nll)
        tokens += len(nll)
    assert batch.tokens == tokens  # one target per real token after the first, EOS included, no pad
    assert ce_sum.item() == pytest.approx(by_hand_ce, rel=1e-5)
    assert weighted_sum.item() == pytest.approx(by_hand_weighted, rel=1e-5)

    # Whatever sits in the padding, the loss is the same.
    noisy = batch.inputs.copy()
    noisy[batch.mask == 0] = 7
    again, _ = loss_sums(model, mx.array(noisy), mx.array(batch.targets), mx.array(batch.mask),
                         mx.array(weights))
    assert again.item() == pytest.approx(weighted_sum.item(), rel=1e-6)


def test_prompt_tokens_carry_no_loss(tmp_path):
    loaded = load_tiny()
    tokenizer = loaded.tokenizer
    import json
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "what was measured", "completion": "the voltage",
                                "auth_weight": 0.3, "prov_entropy": 1.0}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "the copper sample"}],
                                  "auth_weight": 0.3, "prov_entropy": 1.0}) + "\n")
    index = CorpusIndex.build(path, tokenizer, max_tokens=64)
    batch = collate(index, np.arange(2), batch_size=2, pad_id=tokenizer.pad_token_id)
    completion = tokenizer.encode("the voltage", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert batch.mask[0].sum() == len(completion)
    learned = batch.targets[0][batch.mask[0] == 1].tolist()
    assert learned == completion
    answer = tokenizer.encode("the copper sample", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert batch.targets[1][batch.mask[1] == 1].tolist() == answer
