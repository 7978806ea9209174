"""Time to save, verify and load a checkpoint of a given size.

    python bench/bench_checkpoint_io.py --size-mb 64 --repeat 3 [--no-fsync] [--dir /path/on/the/disk/to/test]

The state is split like a LoRA run's: adapters (1/3) and AdamW moments (2/3),
in float32 arrays of `--array-mb` each. Figures are medians over `--repeat`
saves; save includes retention (which verifies the kept checkpoints).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

import mlx.core as mx  # noqa: E402

from checkpoints import CheckpointManager, TrainingState  # noqa: E402


def make_state(step: int, size_mb: float, array_mb: float) -> TrainingState:
    elements = max(1, int(array_mb * 2**20 / 4))
    count = max(3, round(size_mb / array_mb))
    adapter_count = max(1, count // 3)
    adapters = {f"model.layers.{i}.self_attn.q_proj.lora_a": mx.random.normal((elements,)) for i in range(adapter_count)}
    optimizer = {"step": mx.array(step), "learning_rate": mx.array(1e-4)}
    for i in range(count - adapter_count):
        optimizer[f"model.layers.{i // 2}.self_attn.q_proj.lora_a.{'mv'[i % 2]}"] = mx.random.normal((elements,))
    return TrainingState(step=step, adapters=adapters, optimizer=optimizer, trainer={"loss": 1.0},
                         config={}, fingerprint="", adapter_config={"fine_tune_type": "lora"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=64.0)
    parser.add_argument("--array-mb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        manager = CheckpointManager(Path(root) / "checkpoints", keep=args.keep, fsync=not args.no_fsync)
        save_s, verify_s, load_s = [], [], []
        size = 0
        for step in range(1, args.repeat + 1):
            state = make_state(step, args.size_mb, args.array_mb)
            mx.eval(state.adapters, state.optimizer)
            start = time.perf_counter()
            path = manager.save(state)
            save_s.append(time.perf_counter() - start)

            start = time.perf_counter()
            infos = manager.checkpoints()
            verify_s.append(time.perf_counter() - start)
            size = next(i.size_bytes for i in infos if i.path == path)

            start = time.perf_counter()
            loaded = manager.load(path)
            mx.eval(loaded.adapters, loaded.optimizer)
            load_s.append(time.perf_counter() - start)

    mb = size / 2**20
    print(f"checkpoint {mb:.1f} MiB, fsync={'off' if args.no_fsync else 'on'}, keep={args.keep}, median of {args.repeat}")
    for label, times in (("save (+retention)", save_s), ("list + verify all", verify_s), ("load (+verify)", load_s)):
        median = statistics.median(times)
        print(f"  {label:<18} {median * 1000:8.1f} ms   {mb / median:8.1f} MiB/s of one checkpoint")


if __name__ == "__main__":
    main()
