"""Peak memory and step time of the chunked loss, beside ours unchunked and `mlx_lm lora`.

    python bench/bench_memory.py [--model DIR] [--layers 4] [--hidden 512] [--vocab 128256]
                                 [--seq 64] [--batch-size 2] [--steps 3] [--rounds 3]
                                 [--loss-steps 20] [--loss-seq 16] [--loss-chunk 4] [--skip-training]
                                 [--skip-loss] [--keep]

A model where the logits dominate: 4 blocks 512 wide (8 heads of 64, MLP 1024)
with a 128,256-word vocabulary (Llama 3's), its embedding tied to the output
layer, random weights from a fixed seed, quantized to 4 bits (group 64) once;
the tiny model's tokenizer (so the targets are the first 1,024 words, and the
softmax runs over all 128,256). `--model` takes another model instead: an
mlx-lm folder (quantized to 4 bits first unless it is), a GGUF file (its
mlx-lm folder, built once, is what both sides train), or `real`, the project's
real model (SmolLM2-135M, 49,152 words; fetched by bench/real_model.py). The data: texts of
the demo corpus joined into records longer than --seq tokens, one mlx-lm data
folder for every side: every batch is --seq tokens long.

Three parts, in one run:

1. In this process, one batch (--batch-size x --seq), LoRA rank 8 on every
   block: the compiled gradient pass with the whole batch's logits and with
   the automatic chunks (--loss-chunk-size -1), alternated for --rounds rounds
   after a warm-up round that checks they agree: the loss exactly, the
   gradients within the relative difference printed. Wall and CPU seconds and
   MLX peak (reset before each pass). Only ratios of passes run back to back
   are to be trusted on a shared machine.
2. Training runs, each its own process, --steps steps, without and with
   --grad-checkpoint: ours (the automatic chunks, the default), ours with
   --loss-chunk-size 0, and `mlx_lm lora` (through a wrapper that receives its
   per-step reports), same model, data, batch, length, LoRA, Adam at 1e-4:
   MLX peak (ours: the end line's peak_memory_mb, the steps' own: the
   pre-flight resets it; mlx_lm: the largest it reports) and the median step
   time after the first (compiling) step, and the CPU seconds of the whole
   process (os.wait4: user + system; start, pre-flight, steps, validation),
   which move less than wall seconds with the load of other jobs. Goals: ours
   at most 0.5x mlx_lm's peak, and a step no more than 1.05x ours unchunked.
3. The loss of --loss-steps steps (batch 1 x --loss-seq tokens, --loss-chunk
   tokens a chunk) against the same run with --loss-chunk-size 0: the largest
   relative difference of a step's loss, and of the final adapters.

Measured on this 2-core x86_64 Linux CPU (mlx 0.32.4 CPU, mlx_lm 0.32.2), the
defaults, load average 2 to 3 (`--rounds 8 --skip-training` for part 1,
`--steps 6 --skip-loss` for part 2, the defaults for part 3):

  1. MLX peak 133 MB with chunks (8 tokens) against 341 MB without (0.39x);
     time 1.003x wall, 1.000x CPU (medians of 8 rounds); loss and gradients
     equal to the bit.
  2. MLX peak: ours 133 MB, ours unchunked 342 MB, mlx_lm 337 MB (0.40x);
     with --grad-checkpoint 109, 320, 322 MB (0.34x). Step: 13.9 s, 13.7 s,
     13.9 s (1.015x of ours unchunked); with --grad-checkpoint 15.4, 16.1,
     15.1 s (0.96x). Process CPU seconds: 1.018x and 0.993x of unchunked.
  3. 20 of 20 step losses identical, the adapters identical.

With `--model` SmolLM2-135M's GGUF (49,152 words, 30 blocks), part 1 at 2
rounds: MLX peak 374 MB against 460 MB (0.81x: the blocks weigh more there),
0.95x the time, equal to the bit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grad_checkpoint import long_records, shared_inputs, steady, theirs, write_data  # noqa: E402
from bench_grad_checkpoint import ours as ours_run  # noqa: E402
from common import SRC, random_model, scratch_dir  # noqa: E402

LARGE_VOCABULARY = {"num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192}


def model_dir(args) -> Path:
    """The model both sides train, as an mlx-lm folder: --model (a folder, a GGUF file, or `real`:
    bench/real_model.py's SmolLM2-135M), or the random large-vocabulary one; 4-bit."""
    sys.path.insert(0, str(SRC))
    from base_model.loading import prepare_base, resolve_model

    if args.model:
        name = args.model
        if name == "real":
            from real_model import gguf_path

            if not gguf_path().is_file():
                sys.exit(f"--model real: {gguf_path()} is not there; python bench/real_model.py fetches it")
            name = str(gguf_path())
        return Path(prepare_base(resolve_model(name), 4, shown=name).path)
    overrides = dict(LARGE_VOCABULARY, num_hidden_layers=args.layers, hidden_size=args.hidden,
                     intermediate_size=2 * args.hidden, num_attention_heads=args.hidden // 64,
                     num_key_value_heads=args.hidden // 64, vocab_size=args.vocab)
    base = random_model(overrides, f"vocab-{args.layers}x{args.hidden}x{args.vocab}")
    return Path(prepare_base(str(base), 4).path)


# ---------------------------------------------------------------------------
# 1. in this process


def in_process(args, model_path: Path) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    sys.path.insert(0, str(SRC))
    from training.chunked_loss import AUTO, WHOLE, loss_plan
    from base_model.lora import attach_lora
    from base_model.loading import load_model
    from training.optimization import gradient_function

    loaded = load_model(str(model_path), 4)
    model = loaded.model
    attach_lora(model, rank=8, alpha=16.0, layers=-1, dropout=0.0, seed=0)
    # LoRA's B matrices start at zero (so would every A's gradient): drawn, so all are compared.
    mx.random.seed(1)
    model.load_weights([(name, mx.random.normal(value.shape) * 0.05) for name, value in
                        tree_flatten(model.trainable_parameters()) if name.endswith("lora_b")], strict=False)
    model.train()
    rows = [loaded.tokenizer.encode(r["text"])[:args.seq + 1] for r in long_records(args.seq, args.batch_size, 1)]
    tokens = mx.array(np.array(rows, dtype=np.int32))
    # Weights as the objective gives them (not all 1: each token's gradient is then scaled after
    # the output layer instead of before, and may differ by rounding).
    weights = mx.array(np.random.default_rng(0).uniform(0.3, 3.0, args.batch_size).astype(np.float32))
    batch = (tokens[:, :-1], tokens[:, 1:], mx.ones((args.batch_size, args.seq)), weights)
    mx.eval(model.parameters(), *batch)
    plans = {"whole": loss_plan(model, WHOLE), "chunked": loss_plan(model, AUTO)}
    chunk = plans["chunked"].chunk_for(args.batch_size * args.seq)
    variants = {name: gradient_function(model, plan, compiled=True) for name, plan in plans.items()}
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    peaks = {name: [] for name in variants}
    warm = {}
    names = list(variants)
    for round_ in range(args.rounds + 1):
        for name in names if round_ % 2 == 0 else names[::-1]:
            mx.synchronize()
            mx.reset_peak_memory()
            started, started_cpu = time.perf_counter(), time.process_time()
            out = variants[name](*batch)
            mx.eval(out)
            elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
            if round_ == 0:
                warm[name] = out
            else:
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
                peaks[name].append(mx.get_peak_memory())
            del out
        print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: " +
              ", ".join(f"{n} {times[n][-1]:.1f}s" if round_ else n for n in names), flush=True)
    (w_whole, c_whole, g_whole), (w_chunk, c_chunk, g_chunk) = warm["whole"], warm["chunked"]
    reference = dict(tree_flatten(g_whole))
    worst = 0.0
    for key, grad in tree_flatten(g_chunk):
        scale = float(mx.abs(reference[key]).max().item())
        if scale > 0:
            worst = max(worst, float(mx.abs(grad - reference[key]).max().item()) / scale)
    return {"times": times, "cpu": cpu, "peak": {n: max(p) for n, p in peaks.items()}, "chunk": chunk,
            "loss": (w_whole.item(), w_chunk.item(), c_whole.item(), c_chunk.item()), "gradient_difference": worst}


def print_in_process(result: dict) -> None:
    t, c, peak = result["times"], result["cpu"], result["peak"]
    w_whole, w_chunk, c_whole, c_chunk = result["loss"]
    print(f"\n1. one batch in this process, the compiled gradient pass (chunks of {result['chunk']} tokens):")
    for name in ("whole", "chunked"):
        print(f"  {name:8} MLX peak {peak[name] / 1e6:>7,.1f} MB; wall s: {', '.join(f'{x:.1f}' for x in t[name])}; "
              f"CPU s: {', '.join(f'{x:.1f}' for x in c[name])}")
    wall = statistics.median(a / b for a, b in zip(t["chunked"], t["whole"]))
    cpu = statistics.median(a / b for a, b in zip(c["chunked"], c["whole"]))
    print(f"  chunked / whole: MLX peak {peak['chunked'] / peak['whole']:.2f}x; time (median of per-round ratios) "
          f"wall {wall:.3f}x, CPU {cpu:.3f}x")
    print(f"  weighted loss sum {w_whole!r} whole, {w_chunk!r} chunked ({'equal' if w_whole == w_chunk else 'differ'}); "
          f"plain {c_whole!r}, {c_chunk!r}; gradients: largest difference {result['gradient_difference']:.2e} "
          f"of the largest value of its array")


# ---------------------------------------------------------------------------
# 2. and 3. training runs


def ours(args, model: Path, data: Path, out: Path, checkpoint: bool, *extra, **settings) -> dict:
    """bench_grad_checkpoint's run of ours, with the pre-flight's line and the run folder."""
    result = ours_run(args, model, data, out, checkpoint, *extra, **settings)
    result["memory_line"] = next((line for line in result["log"].splitlines() if line.startswith("memory: ")), None)
    result["out"] = out
    return result


def training_runs(args, model: Path, work: Path) -> dict:
    data, config = shared_inputs(work, args.seq)
    results = {}
    for checkpoint in (False, True):
        tag = "gc" if checkpoint else "plain"
        results["chunked", checkpoint] = ours(args, model, data, work / f"chunked-{tag}", checkpoint)
        results["whole", checkpoint] = ours(args, model, data, work / f"whole-{tag}", checkpoint,
                                            "--loss-chunk-size", "0")
        results["mlx_lm", checkpoint] = theirs(args, model, data, work / f"theirs-{tag}", config, checkpoint)
        print(f"ran {tag}", flush=True)
    return results


def print_training(results: dict, work: Path) -> None:
    def mb(value: float) -> str:
        return f"{value / 1e6:,.0f} MB"

    print(f"\n2. training runs (ours: {' '.join(results['chunked', True]['cmd'][1:]).replace(str(work) + '/', '')})")
    print(f"   {results['chunked', False]['memory_line']}")
    print(f"\n{'':28}{'ours chunked':>14}{'ours whole':>12}{'mlx_lm lora':>13}{'chunked/mlx_lm':>16}{'chunked/whole':>15}")
    for checkpoint in (False, True):
        label = "--grad-checkpoint" if checkpoint else "without"
        o, w, t = results["chunked", checkpoint], results["whole", checkpoint], results["mlx_lm", checkpoint]
        print(f"{'MLX peak, ' + label:28}{mb(o['peak']):>14}{mb(w['peak']):>12}{mb(t['peak']):>13}"
              f"{o['peak'] / t['peak']:>15.2f}x{o['peak'] / w['peak']:>14.2f}x")
        so, sw, st = steady(o["steps"]), steady(w["steps"]), steady(t["steps"])
        print(f"{'step s (median after 1st)':28}{so:>13.1f}s{sw:>11.1f}s{st:>12.1f}s{so / st:>15.2f}x{so / sw:>14.3f}x")
        print(f"{'process CPU s (all of it)':28}{o['cpu']:>13.1f}s{w['cpu']:>11.1f}s{t['cpu']:>12.1f}s"
              f"{o['cpu'] / t['cpu']:>15.2f}x{o['cpu'] / w['cpu']:>14.3f}x")
    for name, result in sorted(results.items()):
        print(f"  step seconds, {name[0]}{' --grad-checkpoint' if name[1] else ''}: "
              f"{', '.join(f'{s:.1f}' for s in result['steps'])}")


def loss_runs(args, model: Path, work: Path) -> tuple[dict, dict]:
    data = write_data(work / "loss-data", args.loss_seq)
    common = dict(steps=args.loss_steps, seq=args.loss_seq, batch_size=1)
    chunked = ours(args, model, data, work / "loss-chunked", False, "--loss-chunk-size", args.loss_chunk, **common)
    whole = ours(args, model, data, work / "loss-whole", False, "--loss-chunk-size", "0", **common)
    return chunked, whole


def print_loss(chunked: dict, whole: dict, args) -> None:
    import mlx.core as mx
    import numpy as np

    a, b = np.array(chunked["losses"]), np.array(whole["losses"])
    steps = len(a)
    relative = np.abs(a - b) / np.abs(b)
    ours_adapters = mx.load(str(chunked["out"] / "adapters.safetensors"))
    whole_adapters = mx.load(str(whole["out"] / "adapters.safetensors"))
    adapters = max(float(mx.abs(ours_adapters[k] - whole_adapters[k]).max() / mx.abs(whole_adapters[k]).max())
                   for k in whole_adapters)
    identical = int((a == b).sum())
    print(f"\n3. {steps} steps, batch 1 x {args.loss_seq} tokens, --loss-chunk-size {args.loss_chunk} against 0: "
          f"{identical} of {steps} step losses identical, the largest relative difference {relative.max():.1e} "
          f"(step {int(relative.argmax()) + 1}); final adapters: largest difference {adapters:.1e} of the largest "
          f"value of its array")
    print(f"   losses chunked: {', '.join(f'{x:.6f}' for x in a)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an mlx-lm model folder or GGUF file instead of the random large-vocabulary "
                                         "model; `real`: bench/real_model.py's SmolLM2-135M")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of part 1")
    parser.add_argument("--loss-steps", type=int, default=20)
    parser.add_argument("--loss-seq", type=int, default=16)
    parser.add_argument("--loss-chunk", type=int, default=4)
    parser.add_argument("--skip-training", action="store_true", help="part 1 only")
    parser.add_argument("--skip-loss", action="store_true", help="parts 1 and 2 only")
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    args = parser.parse_args()

    import mlx.core as mx
    import mlx_lm

    model = model_dir(args)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; mlx {mx.__version__}, "
          f"mlx_lm {mlx_lm.__version__}; device {mx.default_device()}; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"model: {model}; batch {args.batch_size} x {args.seq} tokens; LoRA rank 8 on every block; Adam", flush=True)
    print_in_process(in_process(args, model))
    if args.skip_training:
        return 0
    with scratch_dir("bench-memory-", args.keep) as work:
        print_training(training_runs(args, model, work), work)
        if not args.skip_loss:
            print_loss(*loss_runs(args, model, work), args)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
