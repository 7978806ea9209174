"""Corpus index and batching: every sample once per epoch, bounded shapes, resumable position."""

from __future__ import annotations

import json
import random

import numpy as np

from conftest import load_tiny, make_record, write_jsonl
from corpus.batching import DataPosition, epoch_order, padded_length, training_batches
from corpus.index import CorpusIndex


def build_index(tmp_path, n=37, in_memory=False, max_tokens=40):
    """An index of the test's corpus, written on first use (rewritten, it would be another version:
    an index streaming from it stops)."""
    rng = random.Random(3)
    path = tmp_path / "train.jsonl"
    if not path.exists():
        write_jsonl(path, [make_record(rng) for _ in range(n)])
    return CorpusIndex.build(path, load_tiny().tokenizer, max_tokens=max_tokens, in_memory=in_memory)


def test_each_sample_exactly_once_per_epoch_and_order_follows_the_seed():
    lengths = np.random.default_rng(0).integers(3, 100, size=1000)
    for epoch in range(3):
        batches = epoch_order(lengths, 8, seed=5, epoch=epoch)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(1000))
    assert all(np.array_equal(a, b) for a, b in zip(epoch_order(lengths, 8, 5, 0), epoch_order(lengths, 8, 5, 0)))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch_order(lengths, 8, 5, 0), epoch_order(lengths, 8, 5, 1)))


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 500, size=4096)
    grouped = epoch_order(lengths, 8, seed=0, epoch=0)
    random_order = np.random.default_rng(1).permutation(4096).reshape(-1, 8)
    waste = lambda batches: sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)
    assert waste(grouped) < 0.2 * waste(random_order)


def test_padded_lengths_are_a_small_fixed_set():
    rungs = {padded_length(n, 1024) for n in range(1, 1025)}
    assert len(rungs) <= 16 and max(rungs) == 1024
    assert all(padded_length(n, 1024) >= n for n in range(1, 1025))


def test_streaming_and_in_memory_give_the_same_batches(tmp_path):
    streaming = build_index(tmp_path, in_memory=False)
    memory = build_index(tmp_path, in_memory=True)
    # Streaming keeps no sample, only the columns: what they really hold, per record, is small.
    assert streaming.in_memory is None and len(memory.in_memory) == len(memory)
    columns = (streaming.offsets, streaming.line_numbers, streaming.lengths, streaming.auth_weight,
               streaming.prov_entropy, streaming.source_type)
    assert all(len(column) == len(streaming) for column in columns)
    assert sum(column.nbytes for column in columns) / len(streaming) == streaming.bytes_per_record <= 32
    a = training_batches(streaming, 4, 0, DataPosition(), pad_id=0)
    b = training_batches(memory, 4, 0, DataPosition(), pad_id=0)
    for _ in range(12):
        (pa, ba), (pb, bb) = next(a), next(b)
        assert pa == pb and np.array_equal(ba.inputs, bb.inputs) and np.array_equal(ba.mask, bb.mask)


def test_resuming_at_a_position_continues_the_same_stream(tmp_path):
    index = build_index(tmp_path)
    full = training_batches(index, 4, 7, DataPosition(), pad_id=0)
    batches = [next(full) for _ in range(25)]  # crosses an epoch boundary (10 batches per epoch)
    position_after_13 = batches[12][0]
    resumed = training_batches(index, 4, 7, position_after_13, pad_id=0)
    for position, batch in batches[13:]:
        p, b = next(resumed)
        assert p == position and np.array_equal(b.inputs, batch.inputs)
    assert DataPosition.from_dict(json.loads(json.dumps(position_after_13.to_dict()))) == position_after_13


def test_truncation_is_counted(tmp_path):
    index = build_index(tmp_path, max_tokens=8)
    assert index.truncated > 0 and int(index.lengths.max()) == 8


def test_index_cache_reopens_the_same_index_and_notices_a_changed_file(tmp_path):
    tokenizer = load_tiny().tokenizer
    rng = random.Random(5)
    kinds = [{"source_type": "letter"}, {"source_type": "news"}, {}]  # some records have none
    path = write_jsonl(tmp_path / "train.jsonl", [make_record(rng, **kinds[i % 3]) for i in range(30)])
    cache = tmp_path / "cache"
    built = CorpusIndex.build(path, tokenizer, 40, cache_dir=cache, tokenizer_key="k")
    assert len(list(cache.glob("index-*.safetensors"))) == 1
    reopened = CorpusIndex.build(path, tokenizer, 40, cache_dir=cache, tokenizer_key="k")
    for name in ("offsets", "line_numbers", "lengths", "auth_weight", "prov_entropy", "source_type"):
        assert np.array_equal(getattr(built, name), getattr(reopened, name))
    assert reopened.truncated == built.truncated
    assert reopened.source_type_of(range(len(reopened))) == built.source_type_of(range(len(built)))
    assert built.source_type_of(range(3)) == ["letter", "news", None]
    with open(path, "a") as handle:
        handle.write(json.dumps(make_record(rng)) + "\n")
    grown = CorpusIndex.build(path, tokenizer, 40, cache_dir=cache, tokenizer_key="k")
    assert len(grown) == 31
    other_tokenizer = CorpusIndex.build(path, tokenizer, 40, cache_dir=cache, tokenizer_key="other")
    assert len(list(cache.glob("index-*.safetensors"))) == 3 and len(other_tokenizer) == 31
