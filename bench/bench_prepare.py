"""Throughput and memory of the data preparation.

    python bench/bench_prepare.py [--records 1000000] [--seed 0]

Writes N raw records with the demo generator (data/make_demo_corpus.py) to a
temporary folder, runs corpus.prepare.prepare on them, and prints records per
second and the peak resident memory per record. The generator streams to disk,
so the peak is the preparation's (plus the interpreter and numpy).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "data"))
import os  # noqa: E402
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from corpus.prepare import prepare  # noqa: E402
from make_demo_corpus import write_raw  # noqa: E402


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as folder:
        raw = Path(folder) / "raw.jsonl"
        started = time.perf_counter()
        write_raw(raw, args.records, args.seed)
        generated = time.perf_counter() - started
        rss_before = peak_rss_bytes()

        started = time.perf_counter()
        result = prepare(raw, Path(folder) / "out", val_fraction=0.1, seed=args.seed)
        elapsed = time.perf_counter() - started
        rss_peak = peak_rss_bytes()
        raw_mb = raw.stat().st_size / 1e6
        index_figures = bench_index(Path(folder) / "out" / "train.jsonl", Path(folder) / "cache")

    kept = result.train_count + result.val_count
    print(f"records:            {args.records:,} raw ({raw_mb:,.0f} MB, generated in {generated:.1f} s), "
          f"{kept:,} kept, {result.exact_duplicates + result.near_duplicates:,} duplicates removed")
    print(f"preparation:        {elapsed:.1f} s, {args.records / elapsed:,.0f} records/s")
    print(f"peak RSS:           {rss_peak:,} bytes ({rss_peak / args.records:,.0f} bytes/record); "
          f"before preparing {rss_before:,} bytes; growth {(rss_peak - rss_before) / args.records:,.0f} bytes/record")
    for line in index_figures:
        print(line)
    return 0


def bench_index(train: Path, cache: Path) -> list[str]:
    """Index the prepared corpus as training does (tiny model's tokenizer), reopen
    it from its cache, and fetch a batch at a random position."""
    import numpy as np

    from corpus.batching import collate, epoch_order
    from corpus.index import CorpusIndex
    from base_model.loading import load_model

    tokenizer = load_model("tiny", quantize_bits=0).tokenizer
    rss_before = peak_rss_bytes()
    started = time.perf_counter()
    index = CorpusIndex.build(train, tokenizer, 1025, cache_dir=cache, tokenizer_key="bench")
    built = time.perf_counter() - started
    rss_growth = peak_rss_bytes() - rss_before
    started = time.perf_counter()
    reopened = CorpusIndex.build(train, tokenizer, 1025, cache_dir=cache, tokenizer_key="bench")
    reopen = time.perf_counter() - started
    started = time.perf_counter()
    order = epoch_order(reopened.lengths, 8, seed=0, epoch=3)
    ordered = time.perf_counter() - started
    rng = np.random.default_rng(0)
    fetch = []
    for position in rng.integers(0, len(order), size=20):
        started = time.perf_counter()
        collate(reopened, order[position], 8, pad_id=0)
        fetch.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(10_000):
        reopened.check_unchanged("(bench)")  # what each streamed batch read adds: one stat
    check = (time.perf_counter() - started) / 10_000
    hashing = bench_hash(train, cache / "file-hashes")
    n = len(index)
    return [
        f"index build:        {n:,} records in {built:.1f} s, {n / built:,.0f} records/s "
        f"(parse, check and tokenize every record)",
        f"index size:         {index.bytes_per_record:.0f} bytes/record in memory; peak RSS growth while "
        f"building {rss_growth / n:,.0f} bytes/record",
        f"index reopen:       {reopen * 1000:.1f} ms from its cache",
        f"epoch order:        {ordered * 1000:.0f} ms to compute the batches of one epoch (any epoch, from the seed)",
        f"batch at random:    median {sorted(fetch)[len(fetch) // 2] * 1000:.2f} ms to read, tokenize and pad "
        f"a batch of 8 at a random position (nothing before it is read)",
        f"unchanged check:    {check * 1e6:.1f} us per batch read (one stat: device, inode, size, mtime, ctime)",
        *hashing,
    ]


def bench_hash(train: Path, cache: Path) -> list[str]:
    """The run identity's SHA-256 of the training file: read in full once, then from its cache."""
    from run_safety import file_identity

    size_mb = train.stat().st_size / 1e6
    age = time.time_ns() - max(train.stat().st_mtime_ns, train.stat().st_ctime_ns)
    time.sleep(max(0.0, (file_identity.RACY_NS - age) / 1e9 + 0.05))  # a sum this fresh is not kept
    file_identity._known.clear()  # the index's cache key took it already: read it in full again
    started = time.perf_counter()
    file_identity.file_sha256(train, cache)
    full = time.perf_counter() - started
    file_identity._known.clear()  # as a new process: from the cache on disk
    started = time.perf_counter()
    file_identity.file_sha256(train, cache)
    cached = time.perf_counter() - started
    return [f"content hash:       {full:.2f} s for the {size_mb:,.0f} MB training file ({size_mb / full:,.0f} MB/s, "
            f"SHA-256, read in full: the first start, and after any change)",
            f"content hash again: {cached * 1000:.2f} ms from its cache (file unchanged: a stat and a small JSON)"]


if __name__ == "__main__":
    sys.exit(main())
