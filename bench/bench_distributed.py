"""Steps and tokens per second with 1 and 2 processes (mlx.launch, ring backend on
loopback), and the share of a 2-process step spent in the gradient all-sum.

    python bench/bench_distributed.py [--steps 40] [--models tiny,medium]

Each model is trained by `src/train_qlora.py` on the demo corpus with the same
global batch, once as one process and once under
`mlx.launch -n 2 --backend ring`; figures are the medians over the steps after
the first 5 (compilation), read from each run's metrics.jsonl (tokens per
second there is the whole group's). The all-sum is timed on its own: a
2-process child averages a tree shaped like the run's LoRA gradients with
mlx.nn.average_gradients, as the compiled step does, 30 times; its median over
the 2-process step time is the share.

On one machine, 2 processes share its cores (and its memory bandwidth): what
the figures show is the cost of splitting, not the gain of a second machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, TRAIN, cmd_text, is_train_line, medium_model

LAUNCHER = Path(sys.executable).parent / "mlx.launch"
WARM_STEPS = 5

ALLSUM_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import mlx.core as mx, mlx.nn as nn
from mlx.utils import tree_map
from base_model.lora import attach_lora
from base_model.loading import load_model
group = mx.distributed.init(strict=True)
loaded = load_model(sys.argv[2], 4)
attach_lora(loaded.model, int(sys.argv[3]), 32.0, -1, 0.0, 0)
grads = tree_map(lambda p: mx.ones_like(p), loaded.model.trainable_parameters())
reduce = mx.compile(lambda tree: nn.average_gradients(tree, group))
times = []
for i in range(35):
    started = time.perf_counter()
    mx.eval(reduce(grads))
    times.append(time.perf_counter() - started)
if group.rank() == 0:
    print(json.dumps({"allsum_s": sorted(times[5:])[len(times[5:]) // 2]}))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1] + 1  # the ring takes this one and the next


def launch_prefix(processes: int) -> list[str]:
    if processes == 1:
        return []
    return [str(LAUNCHER), "-n", str(processes), "--backend", "ring", "-p", str(free_port()), "--"]


def train(model: str, processes: int, out: Path, args) -> dict:
    cmd = launch_prefix(processes) + [
        sys.executable, str(TRAIN), "--model", model, "--data-dir", str(REPO / "data"), "--output-dir", str(out),
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-seq-length",
        str(args.max_seq_length), "--lora-rank", str(args.lora_rank), "--lora-layers", "-1",
        "--eval-steps", str(10 * args.steps), "--checkpoint-interval", str(10 * args.steps),
        "--no-tensorboard", "--no-early-stopping", "--fresh"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    if result.returncode != 0 or not lines or lines[-1].get("event") != "end":
        raise RuntimeError(f"failed: {cmd_text(cmd)}\n{result.stderr[-3000:]}")
    steps = [line for line in lines if is_train_line(line) and line["step"] > WARM_STEPS]
    seconds = statistics.median(line["tokens"] / line["tokens_per_sec"] for line in steps)
    tokens = statistics.median(line["tokens"] for line in steps)
    return {"step_s": seconds, "steps_per_s": 1 / seconds, "tokens_per_s": tokens / seconds}


def allsum_seconds(model: str, args) -> float:
    cmd = launch_prefix(2) + [sys.executable, "-c", ALLSUM_CHILD, str(REPO / "src"), model, str(args.lora_rank)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)["allsum_s"]
    raise RuntimeError(f"failed: {cmd_text(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--models", default="tiny,medium")
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()
    if not LAUNCHER.exists():
        print(f"error: {LAUNCHER} not found (mlx.launch comes with mlx)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "src"))
    import mlx.core as mx

    print(f"# MLX {mx.__version__}, {os.cpu_count()} CPUs, backend {'gpu' if mx.metal.is_available() else 'cpu'}; "
          f"global batch {args.batch_size} x {args.max_seq_length} tokens, LoRA rank {args.lora_rank} on all "
          f"blocks, {args.steps} steps (medians after step {WARM_STEPS})")
    print(f"{'model':<8} {'processes':>9} {'step s':>8} {'steps/s':>8} {'tok/s':>8} {'vs 1 process':>13} "
          f"{'all-sum ms':>11} {'all-sum share':>14}")
    root = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        for name in args.models.split(","):
            model = str(medium_model()) if name == "medium" else name
            one = train(model, 1, root / f"{name}-1", args)
            two = train(model, 2, root / f"{name}-2", args)
            allsum = allsum_seconds(model, args)
            print(f"{name:<8} {1:>9} {one['step_s']:>8.3f} {one['steps_per_s']:>8.2f} {one['tokens_per_s']:>8,.0f} "
                  f"{1.0:>12.2f}x {'-':>11} {'-':>14}")
            print(f"{name:<8} {2:>9} {two['step_s']:>8.3f} {two['steps_per_s']:>8.2f} {two['tokens_per_s']:>8,.0f} "
                  f"{two['tokens_per_s'] / one['tokens_per_s']:>12.2f}x {1000 * allsum:>11.2f} "
                  f"{allsum / two['step_s']:>13.1%}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
