"""Peak memory and step time with and without --grad-checkpoint, beside `mlx_lm lora --grad-checkpoint`.

    python bench/bench_grad_checkpoint.py [--layers 8] [--hidden 256] [--seq 1024] [--batch-size 2] [--steps 6]
                                          [--floor-rounds 4] [--floor-only]

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

The floor (measured first, in this process; --floor-only stops there). With
LoRA on a frozen quantized base the backward pass B computes input gradients
through the base and only the small LoRA weight gradients; a step without
checkpointing costs F + B, and recomputing every block's forward in the
backward pass adds R, at most about F: (2F + B)/(F + B) if R were a whole F.
On the same model, LoRA attached as the training command does (load_model,
attach_lora), one batch: F = a compiled forward (mx.eval of the loss), F + B =
a compiled nn.value_and_grad over the LoRA parameters, and the same gradient
with every block and with every other block checkpointed (uncompiled, as the
trainer runs it; all four checked to give the same loss and gradients),
alternated each round after a warm-up round. Ratios are medians of per-round
ratios: the machine is shared with other jobs, and only ratios of passes run
back to back are to be trusted (CPU seconds are printed beside wall seconds).

Measured on this 2-core x86_64 Linux CPU (mlx 0.32.4 CPU, mlx_lm 0.32.2; 8
blocks, hidden 256, batch 2 x 1024, 4-bit; 5 rounds, load about 1):

  F 15.4 s, F + B 25.1 s, B/F 0.62; (2F + B)/(F + B) = 1.62x
  gc every block:       37.7 s, 1.50x of F + B (R = 0.81 F), MLX peak 246 MB (0.33x of 755 MB)
  gc every other block: 31.9 s, 1.27x of F + B,             MLX peak 449 MB (0.59x)

and then with --steps 4 --floor-rounds 3: the floor the same (B/F 0.62, 1.62x;
gc every block 1.50x, R = 0.77 F; every other block 1.27x), the training runs
with --grad-checkpoint over without: ours 1.48x (39.5 s / 26.7 s), mlx_lm's
1.52x (37.3 s / 24.6 s); MLX peak ours 243 MB, mlx_lm's 258 MB.

B is less than F here: MLX's CPU quantized matmul is much faster for the input
gradient (g @ W, 0.07 s at 2048 x 256 x 512) than for the forward (x @ W.T,
0.23 s). R is less than F: only the blocks are recomputed (not the embedding,
the output layer and the loss), and, as we read MLX's lazy graph, only what the
backward pass reads (not a block's last projection, whose output the next
block's saved input already holds). A full per-block recompute then costs
1 + R/(F + B) = 1.50x, ours and mlx_lm's --grad-checkpoint alike: 1.4x is below
what recomputing every block costs. It needs R <= 0.4 (F + B), about 0.65 F:
at most 6 of the 8 blocks checkpointed (each about 0.06x; 6 of 8 about 1.38x),
each block not checkpointed holding up to about 64 MB more ((755 - 246) / 8):
about 350-375 MB for 6 of 8 (449 MB measured for 4 of 8), against mlx_lm's
258 MB. On this backend the two goals cannot both be met by choosing which
blocks to recompute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BLAS_PRELUDE, MEDIUM_CONFIG, REPO, SRC, random_model, run_child, scratch_dir  # noqa: E402

THEIRS_WRAPPER = BLAS_PRELUDE + r"""
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
    from base_model.loading import prepare_base

    overrides = dict(MEDIUM_CONFIG, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                     head_dim=hidden // MEDIUM_CONFIG["num_attention_heads"], max_position_embeddings=8192)
    base = random_model(overrides, f"gc-{layers}x{hidden}")
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


def shared_inputs(work: Path, seq: int) -> tuple[Path, Path]:
    """(the data folder, mlx_lm's LoRA config: rank 8, scale 2) both sides train on."""
    config = work / "lora.yaml"
    config.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}))
    return write_data(work / "data", seq), config


def ours(args, model: Path, data: Path, out: Path, checkpoint: bool, *extra, steps: int | None = None,
         seq: int | None = None, batch_size: int | None = None) -> dict:
    """Our training command with the settings of mlx_lm's side (`extra` flags added; `steps`,
    `seq`, `batch_size` in place of args'): MLX peak, max RSS, seconds and loss of each step."""
    steps = steps or args.steps
    cmd = [sys.executable, str(SRC / "train_qlora.py"), "--model", str(model), "--data-dir", str(data),
           "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", str(batch_size or args.batch_size),
           "--max-seq-length", str(seq or args.seq), "--lora-rank", "8", "--lora-alpha", "16", "--lora-layers", "-1",
           "--optimizer", "adam", "--learning-rate", "1e-4", "--warmup-steps", "0", "--val-batches", "1",
           "--eval-steps", str(steps + 1), "--checkpoint-interval", str(steps + 1),
           "--no-early-stopping", "--no-tensorboard", "--seed", "0", *map(str, extra)] + \
        (["--grad-checkpoint"] if checkpoint else [])
    result = run_child(cmd, out.with_suffix(".log"))
    if result["rc"] != 0:
        raise RuntimeError(f"ours exited {result['rc']}:\n{result['log'][-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_lines = [r for r in lines if "tokens_per_sec" in r]
    end = next(r for r in lines if r.get("event") == "end")
    return {"peak": end["peak_memory_mb"] * 1e6, "rss": result["rss"], "cpu": result["cpu"], "cmd": cmd,
            "log": result["log"],
            "steps": [r["tokens_processed"] / r["tokens_per_sec"] for r in step_lines],
            "losses": [r["objective"] for r in step_lines]}


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
    return {"peak": peak, "rss": result["rss"], "cpu": result["cpu"], "steps": steps, "cmd": cmd}


def steady(steps: list[float]) -> float:
    return statistics.median(steps[1:]) if len(steps) > 1 else float("nan")


def checkpoint_blocks(blocks) -> None:
    """mlx-lm's grad_checkpoint on just these blocks: it patches the class of the
    layer it is given, so each block is moved to a subclass of its own class first."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    for block in blocks:
        base = type(block)
        block.__class__ = type(f"Checkpointed{base.__name__}", (base,), {})
        grad_checkpoint(block)


def floor(args, model_path: Path) -> dict:
    """In this process, on the quantized model with LoRA attached as the training
    command does it, one batch of batch x seq tokens: the seconds, each round, of

      forward:     compiled loss only (mx.eval of the loss)                       F
      plain:       compiled nn.value_and_grad over the LoRA parameters            F + B
      gc all:      the same with every block checkpointed, uncompiled (as ours)   F + B + R
      gc alternate: every other block checkpointed, uncompiled

    alternated within each round (the order rotated each round), after a warm-up
    round, so that the load of other jobs falls on all of them alike; each with
    its MLX peak memory (reset before each call)."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    sys.path.insert(0, str(SRC))
    from base_model.lora import attach_lora
    from base_model.loading import load_model
    from training.chunked_loss import loss_sums

    loaded = load_model(str(model_path), 4)
    model = loaded.model
    attach_lora(model, rank=8, alpha=16.0, layers=-1, dropout=0.0, seed=0)
    model.train()
    rows = [loaded.tokenizer.encode(r["text"])[:args.seq + 1] for r in long_records(args.seq, args.batch_size, 1)]
    if min(map(len, rows)) < args.seq + 1:
        raise RuntimeError(f"records shorter than {args.seq + 1} tokens")
    tokens = mx.array(np.array(rows, dtype=np.int32))
    batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((args.batch_size, args.seq)), mx.ones((args.batch_size,)))
    mx.eval(model.parameters(), *batch)

    loss_and_grad = nn.value_and_grad(model, loss_sums)
    state = [model.state, mx.random.state]

    def gradients(*arrays):
        (weighted, _), grads = loss_and_grad(model, *arrays)
        return weighted, grads

    @partial(mx.compile, inputs=[model.state])
    def forward(*arrays):
        return loss_sums(model, *arrays)[0]

    # The same blocks throughout: each variant sets the class of each block before its call.
    blocks = list(model.layers)
    plain_classes = [type(b) for b in blocks]
    checkpoint_blocks(blocks)
    all_classes = [type(b) for b in blocks]
    alternate_classes = [c if i % 2 == 0 else p for i, (p, c) in enumerate(zip(plain_classes, all_classes))]
    variants = {
        "forward": (forward, plain_classes),
        "plain": (partial(mx.compile, inputs=state, outputs=state)(gradients), plain_classes),
        "gc all": (gradients, all_classes),
        "gc alternate": (gradients, alternate_classes),
    }
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    peaks = {name: [] for name in variants}
    names = list(variants)
    warm = {}
    for round_ in range(args.floor_rounds + 1):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            fn, classes = variants[name]
            for block, cls in zip(blocks, classes):
                block.__class__ = cls
            mx.synchronize()
            mx.reset_peak_memory()
            started, started_cpu = time.perf_counter(), time.process_time()
            out = fn(*batch)
            mx.eval(out)
            elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
            if round_ > 0:  # round 0 compiles and warms up, and checks that all agree
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
                peaks[name].append(mx.get_peak_memory())
            else:
                warm[name] = out
        if round_ == 0:
            check_same(warm)
        print(f"floor round {round_}{' (warm-up)' if round_ == 0 else ''}: "
              f"{', '.join(f'{n} {times[n][-1]:.2f}s' if round_ else n for n in names)}", flush=True)
    for block, cls in zip(blocks, plain_classes):
        block.__class__ = cls
    return {"times": times, "cpu": cpu, "peak": {n: max(p) for n, p in peaks.items()}}


def check_same(outputs: dict) -> None:
    """The four passes compute the same loss, and the three gradient passes the same gradients."""
    import numpy as np
    from mlx.utils import tree_flatten

    plain_loss, plain_grads = outputs["plain"]
    reference = dict(tree_flatten(plain_grads))
    for name, out in outputs.items():
        loss, grads = (out, None) if name == "forward" else out
        if not np.isclose(loss.item(), plain_loss.item(), rtol=1e-4):
            raise RuntimeError(f"{name}: loss {loss.item()} against {plain_loss.item()}")
        for key, grad in tree_flatten(grads) if grads is not None else ():
            expected = np.array(reference[key])
            if not np.allclose(np.array(grad), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max()):
                raise RuntimeError(f"{name}: gradient {key} differs from the plain pass's")


def floor_ratios(result: dict, clock: str = "times") -> dict:
    """B/F, the predicted floor and the checkpointed passes over F + B: each the median of
    its per-round values (the four passes of a round ran back to back, under the same load).
    `clock`: "times" (wall seconds) or "cpu" (this process's CPU seconds)."""
    t = result[clock]
    rounds = list(zip(t["forward"], t["plain"], t["gc all"], t["gc alternate"]))
    return {"B/F": statistics.median((fb - f) / f for f, fb, _, _ in rounds),
            "R/F": statistics.median((a - fb) / f for f, fb, a, _ in rounds),
            "floor": statistics.median((f + fb) / fb for f, fb, _, _ in rounds),
            "gc all": statistics.median(a / fb for _, fb, a, _ in rounds),
            "gc alternate": statistics.median(h / fb for _, fb, _, h in rounds)}


def print_floor(result: dict) -> None:
    peak = result["peak"]
    print("\nthe floor (one process, one batch; the four passes alternated each round, so the load of other\n"
          "jobs on this shared machine falls on all alike: trust the ratios, each the median of its\n"
          "per-round values, not the seconds; CPU seconds, this process's own, move less with that load):")
    for name, label in (("forward", "F      forward, compiled"), ("plain", "F + B  forward+backward, compiled"),
                        ("gc all", "gc, every block (uncompiled)"), ("gc alternate", "gc, every other block (uncompiled)")):
        print(f"  {label:36}MLX peak {peak[name] / 1e6:>5,.0f} MB; wall s: "
              f"{', '.join(f'{t:.1f}' for t in result['times'][name])}; CPU s: "
              f"{', '.join(f'{t:.1f}' for t in result['cpu'][name])}")
    for clock, label in (("times", "wall"), ("cpu", "CPU ")):
        r = floor_ratios(result, clock)
        print(f"  {label}: B/F = {r['B/F']:.2f}; (2F + B)/(F + B), a whole forward recomputed: {r['floor']:.2f}x; "
              f"measured: gc every block {r['gc all']:.2f}x of F + B (its recompute R = {r['R/F']:.2f} F), "
              f"every other block {r['gc alternate']:.2f}x")
    print(f"  MLX peak over F + B's: gc every block {peak['gc all'] / peak['plain']:.2f}x, every other block "
          f"{peak['gc alternate'] / peak['plain']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    parser.add_argument("--floor-rounds", type=int, default=4, help="timed rounds of the in-process floor measurement")
    parser.add_argument("--floor-only", action="store_true", help="only the floor measurement, no training runs")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm

    model = model_dir(args.layers, args.hidden)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; mlx {mx.__version__}, "
          f"mlx_lm {mlx_lm.__version__}; device {mx.default_device()}")
    print(f"model: {model} ({args.layers} blocks, hidden {args.hidden}, 4-bit g64); batch {args.batch_size} x "
          f"{args.seq} tokens; LoRA rank 8 on every block; Adam; {args.steps} steps")
    floor_result = floor(args, model)
    print_floor(floor_result)
    if args.floor_only:
        return 0
    with scratch_dir("bench-gc-", args.keep) as work:
        data, config = shared_inputs(work, args.seq)
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
    r, c = floor_ratios(floor_result), floor_ratios(floor_result, "cpu")
    print(f"\nbeside the floor (wall, CPU): B/F = {r['B/F']:.2f}, {c['B/F']:.2f}; (2F + B)/(F + B) = {r['floor']:.2f}x, "
          f"{c['floor']:.2f}x; gc every block in one process {r['gc all']:.2f}x, {c['gc all']:.2f}x of F + B.\n"
          f"The training runs' step time with --grad-checkpoint over without: ours "
          f"{steady(o_gc['steps']) / steady(o_plain['steps']):.2f}x, mlx_lm "
          f"{steady(t_gc['steps']) / steady(t_plain['steps']):.2f}x (separate processes, one after another: on a "
          f"shared machine their ratios carry its load changes, the alternated floor's do not)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
