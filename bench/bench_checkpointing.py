"""What checkpointing costs a run: share of wall time, the stall of one save, resume start-up.

    python bench/bench_checkpointing.py [--models tiny,larger] [--tiny-steps 100] [--tiny-interval 20]
                                        [--larger-steps 12] [--larger-interval 4]
                                        [--resume-models tiny] [--resume-repeats 3] [--resume-from-step 10]
                                        [--batch-size 8] [--max-seq-length 1024] [--keep-dirs]

Every figure comes from real runs of `src/train_qlora.py` as child processes,
on data/train.jsonl copied into a temporary data dir without val.jsonl (so no
validation and no "best" saves get in the way; early stopping is off).
"larger" is a random Llama built into a temporary directory (4 layers, 256
wide, intermediate 512, the tiny model's tokenizer), quantized on load like
any unquantized base.

1. Share of wall time spent saving. A run of N steps with a short
   --checkpoint-interval gives the per-save seconds (the `seconds` of the
   checkpoint lines of metrics.jsonl: manager.save + retention + the top-level
   adapters) and the median step seconds (tokens / tokens_per_sec of the train
   lines). The share at the default interval is then
       save_s / (250 * step_s + save_s)                  goal: under 2 %
   (the measured share at the run's own interval is printed too).

2. Stall of a save. The save is synchronous, so a step waits for all of it.
   Measured twice: the checkpoint line's seconds, and from the times the
   metrics lines appear (polled every 10 ms): the gap from step N's line to
   step N+1's when N saved, against the median gap between train lines. Also
   the step seconds of step N+1 against the median step seconds.

3. Start-up of a resume. Process start to the first train line of a fresh
   start (`--fresh` in an empty output dir) against process start to the first
   resumed train line (`--auto-resume` on a copy of a run stopped at
   --resume-from-step with its final checkpoint), polling metrics.jsonl every
   10 ms; each --resume-repeats times, alternating; the child is killed as
   soon as its line appears. Goal: resumed no more than 10 % slower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SRC, cmd_text, is_train_line, medium_model, run_watched, scratch_dir, train_command  # noqa: E402

DEFAULT_INTERVAL = 250

# ---------------------------------------------------------------------------
# models and data


def train_only_data(root: Path) -> Path:
    data = root / "data-train-only"
    data.mkdir()
    shutil.copy2(REPO / "data" / "train.jsonl", data / "train.jsonl")
    return data


# ---------------------------------------------------------------------------
# 1 + 2: share and stall


def save_share(name: str, model: str, data: Path, root: Path, steps: int, interval: int, args) -> None:
    out = root / f"share-{name}"
    cmd = train_command(model, data, out, args.batch_size, args.max_seq_length, "--max-steps", steps, "--checkpoint-interval", interval)
    result = run_watched(cmd, out, root / f"share-{name}.log")
    lines = result["lines"]
    train = {r["step"]: (t, r["tokens"] / r["tokens_per_sec"]) for t, r in lines if is_train_line(r)}
    saves = [(r["step"], r["seconds"], r.get("final", False)) for _, r in lines if r.get("event") == "checkpoint"]
    end = next(r for _, r in lines if r.get("event") == "end")

    steps_after_first = [train[s][1] for s in sorted(train) if s > 1]
    step_s = statistics.median(steps_after_first)
    periodic = [sec for step, sec, final in saves if not final]
    all_saves = [sec for _, sec, _ in saves]
    save_s = statistics.median(periodic or all_saves)
    # Time between consecutive train lines that is not the step itself: logging
    # and progress for an ordinary step, plus the whole save after a saving step.
    outside = {s: train[s][0] - train[s - 1][0] - train[s][1] for s in sorted(train) if s - 1 in train and s > 2}
    saved_at = {step for step, _, final in saves if not final}
    plain_outside = statistics.median(o for s, o in outside.items() if s - 1 not in saved_at)

    loop_s = sum(r[1] for r in train.values()) + sum(all_saves)
    print(f"\n[{name}] {cmd_text(cmd)}")
    print(f"  run: {len(train)} steps, {len(saves)} saves ({len(periodic)} periodic + final), "
          f"process wall {result['wall']:.1f} s, training seconds {end['seconds']:.1f} s, "
          f"peak MLX memory {end['peak_memory_mb']:.1f} MB")
    print(f"  step seconds: median {step_s * 1000:.1f} ms (steps 2..{max(train)}), step 1 {train[1][1] * 1000:.1f} ms")
    print(f"  per-save seconds: median {save_s * 1000:.1f} ms, min {min(all_saves) * 1000:.1f}, "
          f"max {max(all_saves) * 1000:.1f}; all: " + ", ".join(
              f"{step}{'F' if final else ''}={sec * 1000:.1f}" for step, sec, final in saves) + " ms")
    print(f"  share at this run's interval ({interval}): {100 * sum(all_saves) / loop_s:.2f} % "
          f"of steps + saves")
    share = save_s / (DEFAULT_INTERVAL * step_s + save_s)
    print(f"  share at the default interval ({DEFAULT_INTERVAL}): save_s / (250 * step_s + save_s) = "
          f"{save_s * 1000:.1f} / ({DEFAULT_INTERVAL} * {step_s * 1000:.1f} + {save_s * 1000:.1f}) ms = "
          f"{100 * share:.3f} %   goal < 2 %: {'met' if share < 0.02 else 'MISSED'}")
    print(f"  stall of a save (synchronous): median {save_s * 1000:.1f} ms = {save_s / step_s:.2f} median steps")
    rows = [(step, outside[step + 1], train[step + 1][1]) for step in sorted(saved_at) if step + 1 in outside]
    if rows:
        print(f"  from the times the lines appear: time between step N's and step N+1's train lines less "
              f"step N+1's own seconds, when N saved, against {plain_outside * 1000:.1f} ms (median, no save); "
              f"step N+1 seconds against the median {step_s * 1000:.1f} ms:")
        for step, extra, next_s in rows:
            print(f"    N={step:<5} outside the step {extra * 1000:8.1f} ms (stall +{(extra - plain_outside) * 1000:7.1f})"
                  f"   step N+1 {next_s * 1000:8.1f} ms ({next_s / step_s:.2f}x median)")
        stall = statistics.median(extra - plain_outside for _, extra, _ in rows)
        after = statistics.median(next_s for _, _, next_s in rows)
        print(f"    median stall seen from the lines: {stall * 1000:.1f} ms = {stall / step_s:.2f} median steps; "
              f"median step after a save {after * 1000:.1f} ms ({after / step_s:.2f}x median step)")


# ---------------------------------------------------------------------------
# 3: resume start-up


def resume_startup(name: str, model: str, data: Path, root: Path, args) -> None:
    n = args.resume_from_step
    prepared = root / f"resume-{name}-prepared"
    prep_cmd = train_command(model, data, prepared, args.batch_size, args.max_seq_length, "--max-steps", n, "--checkpoint-interval", n)
    run_watched(prep_cmd, prepared, root / f"resume-{name}-prep.log")  # also warms the file cache
    total = n + 1000  # never reached: the child is killed at its first train line
    fresh_s, resume_s, fresh_step, resume_step = [], [], [], []
    for i in range(args.resume_repeats):
        for kind in ("fresh", "resume"):
            out = root / f"resume-{name}-{kind}-{i}"
            if kind == "fresh":
                cmd = train_command(model, data, out, args.batch_size, args.max_seq_length, "--max-steps", total, "--fresh")
                first = 1
            else:
                shutil.copytree(prepared, out)
                cmd = train_command(model, data, out, args.batch_size, args.max_seq_length, "--max-steps", total, "--auto-resume")
                first = n + 1
            result = run_watched(cmd, out, root / f"resume-{name}-{kind}-{i}.log",
                                 until=lambda r, first=first: is_train_line(r) and r["step"] >= first)
            line = next(r for _, r in result["lines"] if is_train_line(r) and r["step"] >= first)
            step_seconds = line["tokens"] / line["tokens_per_sec"]
            (fresh_s if kind == "fresh" else resume_s).append(result["first_hit"])
            (fresh_step if kind == "fresh" else resume_step).append((step_seconds, line["tokens"]))
            if i == 0:
                print(f"  {kind:<6}: {cmd_text(cmd)}")
            if not args.keep_dirs:
                shutil.rmtree(out, ignore_errors=True)
    ckpt = prepared / "checkpoints" / f"step-{n:08d}"
    size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file()) if ckpt.is_dir() else 0
    f, r = statistics.median(fresh_s), statistics.median(resume_s)
    print(f"  process start -> first train line, median of {args.resume_repeats} "
          f"(checkpoint at step {n}, {size / 2**20:.2f} MiB):")
    def row(label, times, steps):
        before = [t - st for t, (st, _) in zip(times, steps)]
        print(f"    {label}: {statistics.median(times):7.3f} s   (" + ", ".join(f"{x:.3f}" for x in times) + ")   "
              f"of which the first step {statistics.median(st for st, _ in steps):.3f} s "
              f"({steps[0][1]} tokens), before it {statistics.median(before):.3f} s")
        return statistics.median(before)

    fb = row("fresh start ", fresh_s, fresh_step)
    rb = row("auto-resume ", resume_s, resume_step)
    print(f"    resumed / fresh = {r / f:.3f}  ({100 * (r / f - 1):+.1f} %)   goal <= +10 %: "
          f"{'met' if r / f <= 1.10 else 'MISSED'}")
    print(f"    without the first step itself (its batch differs: step 1 vs step {n + 1}): "
          f"resumed / fresh = {rb / fb:.3f}  ({100 * (rb / fb - 1):+.1f} %)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,larger", help="comma-separated, of tiny and larger (share + stall)")
    parser.add_argument("--tiny-steps", type=int, default=100)
    parser.add_argument("--tiny-interval", type=int, default=20)
    parser.add_argument("--larger-steps", type=int, default=12)
    parser.add_argument("--larger-interval", type=int, default=4)
    parser.add_argument("--resume-models", default="tiny", help="comma-separated, of tiny and larger; '' = skip")
    parser.add_argument("--resume-repeats", type=int, default=3)
    parser.add_argument("--resume-from-step", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--keep-dirs", action="store_true", help="keep the temporary directory and print it")
    args = parser.parse_args()

    models = [m for m in args.models.split(",") if m]
    resume_models = [m for m in args.resume_models.split(",") if m]
    with scratch_dir("bench-checkpointing-", args.keep_dirs) as root:
        data = train_only_data(root)
        paths = {"tiny": "tiny"}
        if "larger" in models + resume_models:
            paths["larger"] = str(medium_model())
        else:
            sys.path.insert(0, str(SRC))
            from base_model.tiny import ensure_tiny_model
            ensure_tiny_model()
        print(f"bench_checkpointing: {os.cpu_count()} CPUs, batch {args.batch_size}, "
              f"max-seq-length {args.max_seq_length}, data {REPO / 'data' / 'train.jsonl'} (no validation)")
        for name in models:
            steps = getattr(args, f"{name}_steps")
            interval = getattr(args, f"{name}_interval")
            save_share(name, paths[name], data, root, steps, interval, args)
        for name in resume_models:
            print(f"\n[{name}] resume start-up")
            resume_startup(name, paths[name], data, root, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
