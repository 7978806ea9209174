"""What validation costs a run: memory against the size of the val file, time per batch.

    python bench/bench_validation.py [--factor 20] [--memory-steps 4] [--val-batches 50]
                                     [--steps 40] [--eval-steps 10] [--cost-val-batches 10]
                                     [--batch-size 8] [--max-seq-length 1024] [--model tiny] [--keep-dirs]

Every figure comes from real runs of `src/train_qlora.py` as child processes
(early stopping off), on data/train.jsonl copied into temporary data dirs.

1. Memory against the val file's size. Two data dirs with the same train.jsonl
   and a val.jsonl built by repeating data/val.jsonl: one the size of
   train.jsonl, one --factor times that. Both begin with the same records, so
   with the same --val-batches validation sees the same batches. Each runs
   --memory-steps steps with one validation at the end; figures: MLX peak
   memory (`peak_memory_mb` of the end line of metrics.jsonl) and the process's
   max RSS (os.wait4). Goal: the same peak (validation reads only the batches
   it needs).

2. Time of one validation batch against one training step. The same
   --steps-step run with validation every --eval-steps steps (data dir with
   val.jsonl the size of train.jsonl) and without (no val.jsonl: no
   validation at all). Per validation batch:
       (wall with validation - wall without) / (validations * --cost-val-batches)
   against the median step seconds (tokens / tokens_per_sec of the train
   lines). Process wall time carries the noise of every step, so the same is
   also measured from the times the metrics lines appear (polled every 10 ms):
   a validation line comes after the train line of its step, with only
   validation (and the progress line) between them; and the "best"
   checkpoints that validation triggers are listed apart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SRC, cmd_text, is_train_line, run_watched, scratch_dir, train_command  # noqa: E402


def build_data(root: Path, name: str, val_bytes: int | None) -> Path:
    """train.jsonl copied; val.jsonl = data/val.jsonl repeated up to `val_bytes` (None: no val file)."""
    data = root / name
    data.mkdir()
    shutil.copy2(REPO / "data" / "train.jsonl", data / "train.jsonl")
    if val_bytes is not None:
        lines = [line if line.endswith("\n") else line + "\n"
                 for line in (REPO / "data" / "val.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
                 if line.strip()]
        written = 0
        with open(data / "val.jsonl", "w", encoding="utf-8") as out:
            while written < val_bytes:
                for line in lines:
                    out.write(line)
                    written += len(line.encode("utf-8"))
                    if written >= val_bytes:
                        break
    return data


def command(args, data: Path, out: Path, *extra) -> list[str]:
    return train_command(args.model, data, out, args.batch_size, args.max_seq_length, *extra)


def memory(args, root: Path) -> None:
    train_bytes = (REPO / "data" / "train.jsonl").stat().st_size
    dirs = {"1x": build_data(root, "data-val-1x", train_bytes),
            f"{args.factor}x": build_data(root, f"data-val-{args.factor}x", args.factor * train_bytes)}
    print(f"\n1. memory against the val file's size (--val-batches {args.val_batches}, "
          f"{args.memory_steps} steps, one validation at the end)")
    results = {}
    for label, data in dirs.items():
        out = root / f"memory-{label}"
        cmd = command(args, data, out, "--max-steps", args.memory_steps, "--eval-steps", args.memory_steps,
                      "--val-batches", args.val_batches, "--checkpoint-interval", 10**6)
        result = run_watched(cmd, out, root / f"memory-{label}.log")
        val = data / "val.jsonl"
        records = sum(1 for line in open(val, "rb") if line.strip())
        val_lines = [(t, r) for t, r in result["lines"] if "val_ce" in r]
        train_times = {r["step"]: t for t, r in result["lines"] if is_train_line(r)}
        val_s = val_lines[-1][0] - train_times[val_lines[-1][1]["step"]]
        results[label] = result
        print(f"  val {label:>4}: {cmd_text(cmd)}")
        print(f"        val.jsonl {val.stat().st_size / 2**20:6.2f} MiB, {records:,} records; "
              f"peak MLX {result['end']['peak_memory_mb']:7.1f} MB, max RSS {result['max_rss_mb']:7.1f} MiB, "
              f"validation {val_s:.2f} s, val_loss {val_lines[-1][1]['val_loss']:.5f}, wall {result['wall']:.1f} s")
    small, big = results["1x"], results[f"{args.factor}x"]
    dp = big["end"]["peak_memory_mb"] - small["end"]["peak_memory_mb"]
    dr = big["max_rss_mb"] - small["max_rss_mb"]
    print(f"  {args.factor}x - 1x: peak MLX {dp:+.1f} MB, max RSS {dr:+.1f} MiB   goal: the same peak: "
          f"{'met' if abs(dp) < 1.0 else 'MISSED'} (MLX), "
          f"{'met' if abs(dr) < max(8.0, 0.03 * small['max_rss_mb']) else 'MISSED'} (RSS, within 3 % or 8 MiB)")


def cost(args, root: Path) -> None:
    train_bytes = (REPO / "data" / "train.jsonl").stat().st_size
    with_val = root / "data-val-1x"
    if not with_val.exists():
        with_val = build_data(root, "data-val-1x", train_bytes)
    without = build_data(root, "data-no-val", None)
    validations = args.steps // args.eval_steps
    batches = validations * args.cost_val_batches
    print(f"\n2. one validation batch against one training step ({args.steps} steps, validation every "
          f"{args.eval_steps}: {validations} validations x {args.cost_val_batches} batches = {batches} batches)")
    runs = {}
    for label, data in (("without", without), ("with", with_val)):
        out = root / f"cost-{label}"
        cmd = command(args, data, out, "--max-steps", args.steps, "--eval-steps", args.eval_steps,
                      "--val-batches", args.cost_val_batches, "--checkpoint-interval", 10**6)
        runs[label] = result = run_watched(cmd, out, root / f"cost-{label}.log")
        saves = [r["seconds"] for _, r in result["lines"] if r.get("event") == "checkpoint"]
        result["saves"] = saves
        print(f"  {label:<7}: {cmd_text(cmd)}")
        print(f"           wall {result['wall']:.2f} s, training seconds {result['end']['seconds']:.2f} s, "
              f"{len(saves)} checkpoints {sum(saves):.2f} s")
    step_s = statistics.median(r["tokens"] / r["tokens_per_sec"] for _, r in runs["with"]["lines"]
                               if is_train_line(r) and r["step"] > 1)
    wall_diff = runs["with"]["wall"] - runs["without"]["wall"]
    loop_diff = ((runs["with"]["wall"] - runs["with"]["end"]["seconds"] - sum(runs["with"]["saves"]))
                 - (runs["without"]["wall"] - runs["without"]["end"]["seconds"] - sum(runs["without"]["saves"])))
    print(f"  median step {step_s * 1000:.1f} ms (run with validation, steps 2..)")
    print(f"  (wall with - wall without) / {batches} batches = {wall_diff:.2f} s / {batches} = "
          f"{wall_diff / batches * 1000:.1f} ms per batch = {wall_diff / batches / step_s:.2f} steps")
    print(f"  the same less each run's step and checkpoint seconds (step-time noise removed): "
          f"{loop_diff / batches * 1000:.1f} ms per batch = {loop_diff / batches / step_s:.2f} steps")
    lines = runs["with"]["lines"]
    train_times = {r["step"]: t for t, r in lines if is_train_line(r)}
    per_validation = [(r["step"], t - train_times[r["step"]]) for t, r in lines if "val_ce" in r]
    print("  from the times the lines appear, each validation (train line of its step -> its val line):")
    for step, seconds in per_validation:
        print(f"    step {step:<5} {seconds * 1000:8.1f} ms = {seconds / args.cost_val_batches * 1000:7.1f} ms per batch "
              f"= {seconds / args.cost_val_batches / step_s:.2f} steps")
    later = [s for _, s in per_validation[1:]] or [s for _, s in per_validation]
    per_batch = statistics.median(later) / args.cost_val_batches
    print(f"    median of validations after the first: {per_batch * 1000:.1f} ms per batch = "
          f"{per_batch / step_s:.2f} training steps (forward only: about 1/3 of a step is what one would expect)")
    best = [(r["step"], r["seconds"]) for _, r in lines if r.get("event") == "checkpoint" and r.get("best")]
    if best:
        print("    checkpoints marked best that validation triggered (not counted above): "
              + ", ".join(f"step {s} {sec * 1000:.1f} ms" for s, sec in best))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny or a local mlx-lm model dir")
    parser.add_argument("--factor", type=int, default=20, help="the large val file is this many times train.jsonl")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--val-batches", type=int, default=50, help="for the memory runs (the default of the CLI)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-steps", type=int, default=10, help="should divide --steps")
    parser.add_argument("--cost-val-batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--skip", choices=["memory", "cost"], default=None)
    parser.add_argument("--keep-dirs", action="store_true")
    args = parser.parse_args()
    if args.steps % args.eval_steps:
        parser.error("--eval-steps must divide --steps")

    if args.model == "tiny":
        sys.path.insert(0, str(SRC))
        from base_model.tiny import ensure_tiny_model
        ensure_tiny_model()
    print(f"bench_validation: {os.cpu_count()} CPUs, model {args.model}, batch {args.batch_size}, "
          f"max-seq-length {args.max_seq_length}")
    with scratch_dir("bench-validation-", args.keep_dirs) as root:
        if args.skip != "memory":
            memory(args, root)
        if args.skip != "cost":
            cost(args, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
