"""Peak memory and step time with and without --grad-checkpoint, beside `mlx_lm lora --grad-checkpoint`.

    python bench/bench_grad_checkpoint.py [--layers 8] [--hidden 256] [--seq 1024] [--batch-size 2] [--steps 6]

A model where activations dominate: the benchmarks' medium shape (hidden 256,
MLP 512, 4 heads of 64) with --layers blocks (8), random weights from a fixed
seed, quantized to 4 bits (group 64) once, the same folder for both sides. The
data: texts of the demo corpus joined into records longer than --seq tokens,
written without scores as an mlx-lm data folder (train.jsonl, valid.jsonl),
the same folder for both sides: every batch is --seq tokens long.

Both sides: LoRA rank 8, scale 2 on every block, Adam, learning rate 1e-4 (ours
without warmup), the same batch size, sequence length and number of steps;
validation of one batch (ours at the end, mlx_lm before step 1 and at the end),
no checkpoints before the end. Each side runs with and without gradient
checkpointing, each in its own process:

  ours:   python src/train_qlora.py --model Q4DIR --data-dir DATA ... [--grad-checkpoint]
  theirs: python -m mlx_lm lora --train --model Q4DIR --data DATA ... [--grad-checkpoint]
          (through a wrapper that receives its per-step reports: it prints no peak memory itself)

Figures: MLX peak memory of the process (mx.get_peak_memory: ours the
`peak_memory_mb` of its end line, mlx_lm the largest `peak_memory` it reports),
the process's max RSS, and the step time after the first (compiling) step: ours
from metrics.jsonl (every step), mlx_lm from its report of every step. The
goal: with --grad-checkpoint, peak memory no higher than mlx_lm's with the same
option, and a step no more than 1.4 times ours without it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEDIUM_CONFIG, REPO, SRC, bench_cache, run_child, scratch_dir  # noqa: E402

THEIRS_WRAPPER = r"""
import json, sys, time
import mlx.core as mx
import mlx_lm.lora
reports = []
class Reports:
    def on_train_loss_report(self, info):
        reports.append(info)
    def on_val_loss_report(self, info):
        pass
mlx_lm.lora.get_reporting_callbacks = lambda *a, **k: Reports()
sys.argv = ["mlx_lm.lora"] + sys.argv[1:]
try:
    mlx_lm.lora.main()
finally:
    sys.stderr.write("BENCH_REPORTS " + json.dumps({"reports": reports, "peak": mx.get_peak_memory()}) + "\n")
"""


def model_dir(layers: int, hidden: int) -> Path:
    """The random model, built once, and its 4-bit copy (what both sides train on)."""
    sys.path.insert(0, str(SRC))
    from modeling import TINY_MODEL_CONFIG, build_model_dir_once, build_random_model, ensure_tiny_model, prepare_base

    overrides = dict(MEDIUM_CONFIG, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                     head_dim=hidden // MEDIUM_CONFIG["num_attention_heads"], max_position_embeddings=8192)
    tiny = ensure_tiny_model()
    tag = hashlib.sha256(json.dumps([tiny.name, dict(TINY_MODEL_CONFIG, **overrides), 4321]).encode()).hexdigest()[:12]
    base = build_model_dir_once(bench_cache() / f"gc-{layers}x{hidden}-{tag}",
                                lambda scratch: build_random_model(scratch, overrides, 4321), "the benchmark model")
    return Path(prepare_base(str(base), 4).path)


def long_records(seq: int, count: int, seed: int) -> list[dict]:
    """Records of the demo corpus's texts joined until each is well over `seq` tokens
    (the tiny tokenizer gives about one token per 3-4 characters)."""
    import random

    texts = [json.loads(line)["text"] for line in (REPO / "data" / "train.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        parts, size = [], 0
        while size < seq * 6:
            parts.append(rng.choice(texts))
            size += len(parts[-1]) + 1
        records.append({"text": " ".join(parts)})
    return records


def write_data(folder: Path, seq: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train.jsonl", 32, 1), ("valid.jsonl", 4, 2)):
        with open(folder / name, "w", encoding="utf-8") as handle:
            for record in long_records(seq, count, seed):
                handle.write(json.dumps(record) + "\n")
    return folder


def ours(args, model: Path, data: Path, out: Path, checkpoint: bool) -> dict:
    cmd = [sys.executable, str(SRC / "train_qlora.py"), "--model", str(model), "--data-dir", str(data),
           "--output-dir", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-seq-length", str(args.seq), "--lora-rank", "8", "--lora-alpha", "16", "--lora-layers", "-1",
           "--optimizer", "adam", "--learning-rate", "1e-4", "--warmup-steps", "0", "--val-batches", "1",
           "--eval-steps", str(args.steps + 1), "--checkpoint-interval", str(args.steps + 1),
           "--no-early-stopping", "--no-tensorboard", "--seed", "0"] + (["--grad-checkpoint"] if checkpoint else [])
    result = run_child(cmd, out.with_suffix(".log"))
    if result["rc"] != 0:
        raise RuntimeError(f"ours exited {result['rc']}:\n{result['log'][-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["tokens"] / r["tokens_per_sec"] for r in lines if "tokens_per_sec" in r]
    end = next(r for r in lines if r.get("event") == "end")
    return {"peak": end["peak_memory_mb"] * 1e6, "rss": result["rss"], "steps": steps, "cmd": cmd}


def theirs(args, model: Path, data: Path, out: Path, config: Path, checkpoint: bool) -> dict:
    cmd = [sys.executable, "-c", THEIRS_WRAPPER, "--train", "--model", str(model), "--data", str(data),
           "--adapter-path", str(out), "--batch-size", str(args.batch_size), "--iters", str(args.steps),
           "--max-seq-length", str(args.seq), "--num-layers", "-1", "--optimizer", "adam",
           "--learning-rate", "1e-4", "--steps-per-report", "1", "--steps-per-eval", str(args.steps + 1),
           "--save-every", str(args.steps + 1), "--val-batches", "1", "--seed", "0", "-c", str(config)] + \
        (["--grad-checkpoint"] if checkpoint else [])
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    result = run_child(cmd, out.with_suffix(".log"), env)
    if result["rc"] != 0:
        raise RuntimeError(f"mlx_lm exited {result['rc']}:\n{result['log'][-3000:]}")
    blob = next(line for line in result["log"].splitlines() if line.startswith("BENCH_REPORTS "))
    reported = json.loads(blob[len("BENCH_REPORTS "):])
    steps = [1.0 / r["iterations_per_second"] for r in reported["reports"]]
    peak = max([r["peak_memory"] * 1e9 for r in reported["reports"]] + [reported["peak"]])
    return {"peak": peak, "rss": result["rss"], "steps": steps, "cmd": cmd}


def steady(steps: list[float]) -> float:
    return statistics.median(steps[1:]) if len(steps) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm

    model = model_dir(args.layers, args.hidden)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; mlx {mx.__version__}, "
          f"mlx_lm {mlx_lm.__version__}; device {mx.default_device()}")
    print(f"model: {model} ({args.layers} blocks, hidden {args.hidden}, 4-bit g64); batch {args.batch_size} x "
          f"{args.seq} tokens; LoRA rank 8 on every block; Adam; {args.steps} steps")
    with scratch_dir("bench-gc-", args.keep) as work:
        data = write_data(work / "data", args.seq)
        config = work / "lora.yaml"
        config.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}))
        results = {}
        for checkpoint in (False, True):
            tag = "gc" if checkpoint else "plain"
            results["ours", checkpoint] = ours(args, model, data, work / f"ours-{tag}", checkpoint)
            results["theirs", checkpoint] = theirs(args, model, data, work / f"theirs-{tag}", config, checkpoint)
            print(f"ran {tag}", flush=True)
        print(f"\nours:   {' '.join(results['ours', True]['cmd'][1:]).replace(str(work) + '/', '')}")
        print(f"theirs: python -m mlx_lm lora {' '.join(results['theirs', True]['cmd'][3:]).replace(str(work) + '/', '')}")

    def mb(value: float) -> str:
        return f"{value / 1e6:,.0f} MB"

    print(f"\n{'':34}{'ours':>12}{'mlx_lm lora':>14}{'ours/theirs':>13}")
    for checkpoint in (False, True):
        label = "--grad-checkpoint" if checkpoint else "without"
        o, t = results["ours", checkpoint], results["theirs", checkpoint]
        print(f"{'MLX peak memory, ' + label:34}{mb(o['peak']):>12}{mb(t['peak']):>14}{o['peak'] / t['peak']:>12.2f}x")
        print(f"{'max RSS, ' + label:34}{mb(o['rss']):>12}{mb(t['rss']):>14}{o['rss'] / t['rss']:>12.2f}x")
        print(f"{'step time (median after 1st), ' + label:34}{steady(o['steps']):>11.2f}s{steady(t['steps']):>13.2f}s"
              f"{steady(o['steps']) / steady(t['steps']):>12.2f}x")
    o_plain, o_gc = results["ours", False], results["ours", True]
    t_plain, t_gc = results["theirs", False], results["theirs", True]
    print(f"\n--grad-checkpoint, ours:   peak memory {o_gc['peak'] / o_plain['peak']:.2f}x of without, "
          f"step time {steady(o_gc['steps']) / steady(o_plain['steps']):.2f}x of without")
    print(f"--grad-checkpoint, mlx_lm: peak memory {t_gc['peak'] / t_plain['peak']:.2f}x of without, "
          f"step time {steady(t_gc['steps']) / steady(t_plain['steps']):.2f}x of without")
    print(f"goal: ours with it no higher than mlx_lm's with it ({o_gc['peak'] / t_gc['peak']:.2f}x), step time "
          f"at most 1.4x of ours without it ({steady(o_gc['steps']) / steady(o_plain['steps']):.2f}x)")
    for name, result in sorted(results.items()):
        print(f"  step seconds, {name[0]}{' --grad-checkpoint' if name[1] else ''}: "
              f"{', '.join(f'{s:.2f}' for s in result['steps'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
