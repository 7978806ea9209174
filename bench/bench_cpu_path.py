"""The CPU path on the real model: what an optimized BLAS and the base's float copy each bring.

    python bench/bench_cpu_path.py [--steps 3] [--keep]

SmolLM2-135M-Instruct from its GGUF (bench/real_model.py fetches it), the demo corpus's
train.jsonl, batch 4 x 64 tokens, LoRA rank 16 on every block. Two parts, in one run:

1. The float copy against the 4-bit base, in this process (an optimized BLAS loaded, as every
   command does): the largest logit difference between the two ways on the demo batches, the
   share of positions whose top token is the same, and the memory each takes.
2. Four training runs of the command itself, each its own process: MLX's bundled reference
   BLAS (DISTRUST_QLORA_BLAS=bundled) or OpenBLAS, each with --float-base off and on. Tokens
   per second over the steps after the first (the first compiles), from metrics.jsonl, and
   the ratios to the 4-bit base as it runs with MLX's own BLAS. Then the adapters of the
   OpenBLAS + float copy run are loaded by mlx_lm.load on the 4-bit base they name, and that
   model's logits are compared with the float copy's (the adapters are the quantized base's).

A 4-bit step of 4 x 64 tokens takes 30-110 s on two shared cores: with the default 3 steps the
whole run takes 10-20 minutes there. The runs follow one another, so a machine whose load
changes meanwhile moves the ratios: compare several runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from common import REPO, run_child, scratch_dir, train_command  # noqa: I001 - first: the BLAS before MLX

from real_model import gguf_path

import mlx.core as mx  # noqa: E402

BATCH, SEQ, RANK = 4, 64, 16
WAYS = [("bundled", "off"), ("bundled", "on"), ("openblas", "off"), ("openblas", "on")]


def demo_batches(tokenizer, count: int = 2) -> list[mx.array]:
    """`count` batches of BATCH x SEQ tokens from the demo corpus's first records."""
    rows = []
    with open(REPO / "data" / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            tokens = tokenizer.encode(json.loads(line)["text"])
            if len(tokens) >= SEQ:
                rows.append(tokens[:SEQ])
            if len(rows) == BATCH * count:
                break
    return [mx.array(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]


def compare_logits(quantized, floated, batches) -> tuple[float, float, float]:
    """(largest |difference| of the logits, largest |logit|, share of same top tokens)."""
    largest = scale = same = total = 0.0
    for batch in batches:
        a, b = quantized(batch).astype(mx.float32), floated(batch).astype(mx.float32)
        largest = max(largest, mx.abs(a - b).max().item())
        scale = max(scale, mx.abs(a).max().item())
        same += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0] * a.shape[1]
    return largest, scale, same / total


def logit_part(base: str) -> None:
    import mlx_lm

    from run_safety.cpu_blas import blas_line
    from base_model.float_base import copy_sizes, use_float_base

    print(blas_line() or "blas: (not MLX's Linux CPU wheel)")
    quantized, tokenizer = mlx_lm.load(base)
    floated, _ = mlx_lm.load(base)
    sizes = copy_sizes(floated)
    replaced = use_float_base(floated)
    batches = demo_batches(tokenizer)
    largest, scale, same = compare_logits(quantized, floated, batches)
    print(f"float copy: {replaced} quantized layers, {sizes[0] / 1e6:,.1f} MB of float32 weights in place of "
          f"{sizes[1] / 1e6:,.1f} MB")
    print(f"logits, 4-bit base against its float copy, {len(batches)} demo batches of {BATCH} x {SEQ}: largest "
          f"difference {largest:.3g} (largest logit {scale:.3g}); same top token at {100 * same:.2f}% of positions")


def training_part(gguf: Path, steps: int, root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    shutil.copy(REPO / "data" / "train.jsonl", data / "train.jsonl")  # no val.jsonl, no probes: steps only
    rows = []
    for blas, float_base in WAYS:
        out = root / f"{blas}-{float_base}"
        cmd = train_command(str(gguf), data, out, BATCH, SEQ, "--max-steps", steps, "--lora-rank", RANK,
                            "--lora-layers", -1, "--float-base", float_base, "--no-memory-check",
                            "--no-tensorboard", "--checkpoint-interval", 1000, "--warmup-steps", 1)
        env = None
        if blas == "bundled":
            import os

            env = dict(os.environ, DISTRUST_QLORA_BLAS="bundled")
        child = run_child(cmd, root / f"{blas}-{float_base}.log", env=env)
        if child["rc"] != 0:
            sys.exit(f"{blas} + float-base {float_base} failed (exit {child['rc']}):\n{child['log'][-3000:]}")
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = [line for line in lines if "tokens_per_sec" in line and line["step"] > 1]
        tokens = sum(line["tokens"] for line in timed)
        seconds = sum(line["tokens"] / line["tokens_per_sec"] for line in timed)
        peak = max(line["peak_memory_mb"] for line in lines if "peak_memory_mb" in line)
        said = [line for line in child["log"].splitlines() if line.startswith(("blas:", "base:"))]
        rows.append((blas, float_base, tokens / seconds, seconds / len(timed), peak, said))
    reference = rows[0][2]
    print(f"\ntraining, {steps} steps of {BATCH} x {SEQ} tokens, LoRA rank {RANK} on every block "
          f"(steps 2..{steps} timed):")
    print(f"{'BLAS':<22}{'base':<16}{'tok/s':>8}{'s/step':>9}{'MLX peak':>11}{'x bundled 4-bit':>17}")
    for blas, float_base, speed, per_step, peak, _ in rows:
        name = "MLX's bundled (netlib)" if blas == "bundled" else "OpenBLAS"
        how = "float32 copy" if float_base == "on" else "4-bit"
        print(f"{name:<22}{how:<16}{speed:>8.1f}{per_step:>9.2f}{peak:>8.0f} MB{speed / reference:>16.1f}x")
    for blas, float_base, *_, said in rows:
        print(f"  [{blas}, --float-base {float_base}] " + " | ".join(said))
    return root / "openblas-on"


def adapters_part(out: Path) -> None:
    """The float run's adapters, loaded by mlx-lm on the 4-bit base they name."""
    import mlx_lm

    from base_model.float_base import use_float_base

    base = json.loads((out / "adapter_config.json").read_text())["model"]
    quantized, tokenizer = mlx_lm.load(base, adapter_path=str(out))
    floated, _ = mlx_lm.load(base, adapter_path=str(out))
    use_float_base(floated)
    largest, scale, same = compare_logits(quantized, floated, demo_batches(tokenizer))
    print(f"\nadapters of the OpenBLAS + float copy run, loaded by mlx_lm.load on the 4-bit base {base}: largest "
          f"logit difference to the float copy with the same adapters {largest:.3g} (largest logit {scale:.3g}); "
          f"same top token at {100 * same:.2f}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps of each training run (the first is not timed)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders")
    args = parser.parse_args()
    gguf = gguf_path()
    if not gguf.is_file():
        sys.exit(f"the real model is not here ({gguf}): python bench/real_model.py fetches it")
    print(f"machine: {platform.machine()}, {platform.system()}; MLX {mx.__version__}, default device "
          f"{mx.default_device()}")
    with scratch_dir("bench-cpu-path-", args.keep) as root:
        out = training_part(gguf, max(args.steps, 2), root)
        logit_part(json.loads((out / "adapter_config.json").read_text())["model"])
        adapters_part(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
