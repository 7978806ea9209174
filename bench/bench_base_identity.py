"""What the run identity's hash of a base model costs: the first start, and a resume.

    python bench/bench_base_identity.py [--gb 4]

Writes a model folder (config.json, tokenizer.json and a model.safetensors of --gb GB)
to a temporary folder, waits out the 2 s in which a fresh sum is not kept, then times
file_identity.base_identity: once reading everything (as the first run on a base does),
once more as a new process would (this process's memory of the sums cleared: from the
cache on disk). The weights are just written, so they come from the page cache: the
first figure is the hashing alone; a base read cold from disk adds the disk's time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from run_safety import file_identity  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-identity-") as folder:
        base, cache = Path(folder) / "base", Path(folder) / "cache"
        base.mkdir()
        (base / "config.json").write_text('{"model_type": "llama"}\n')
        (base / "tokenizer.json").write_bytes(os.urandom(2_000_000))
        block = os.urandom(1 << 24)
        with open(base / "model.safetensors", "wb") as handle:
            for _ in range(int(args.gb * 1e9) // len(block)):
                handle.write(block)
        size_gb = sum(path.stat().st_size for path in base.iterdir()) / 1e9
        time.sleep(file_identity.RACY_NS / 1e9 + 0.1)
        started = time.perf_counter()
        file_identity.base_identity(str(base), cache)
        full = time.perf_counter() - started
        file_identity._known.clear()
        started = time.perf_counter()
        file_identity.base_identity(str(base), cache)
        again = time.perf_counter() - started
    print(f"base of {size_gb:.2f} GB: first start {full:.2f} s ({size_gb / full:.2f} GB/s, SHA-256 of every file); "
          f"a resume {again * 1000:.2f} ms (from the cache: a stat and a small JSON per file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
