"""Peak memory and step time of the chunked loss, beside ours unchunked and `mlx_lm lora`.

    python bench/bench_memory.py [--model DIR] [--layers 4] [--hidden 512] [--vocab 128256]
                                 [--seq 64] [--batch-size 2] [--steps 3] [--rounds 3]
                                 [--loss-steps 20] [--loss-seq 16] [--loss-chunk 4] [--skip-training]
                                 [--skip-loss] [--keep] [--sizes 2x128,2x512,4x2048] [--size-steps 2]

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

--sizes runs part 4 instead of parts 1 to 3:

4. For each batch size (ROWSxTOKENS): in this process, the MLX memory the chunked loss and its
   gradient with respect to the hidden states take at most beyond their inputs (the loss's own
   share of a step: it should not grow with the batch); then ours (its defaults: automatic
   chunks, --float-base auto) and `mlx_lm lora`, --size-steps steps each, same data and
   settings as part 2: MLX peaks and their ratio. Where mlx_lm's whole-batch loss (about four
   float32 copies of the batch's logits) would need more than half the memory available, it is
   not run and its logits alone, a lower bound of its peak, stand in (said so).

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

Part 4, `--layers 2 --hidden 128 --sizes 2x128,2x512,2x1024,4x2048` (2 steps a run; ours with
its float copy, as --float-base auto chose; load average 9 to 10), chunks of 32 tokens throughout:

       batch   loss alone    ours   mlx_lm lora   ours/mlx_lm
     2 x 128        82 MB  156 MB        541 MB         0.29x
     2 x 512        83 MB  183 MB      2,151 MB         0.08x
    2 x 1024        83 MB  234 MB      4,312 MB         0.05x
    4 x 2048        86 MB  863 MB   >= 4,203 MB      <= 0.21x  (mlx_lm not run: ~16.8 GB)

Before the gate between chunks (chunked_loss.GATE_OPERATIONS), in chunks of 32 tokens, the
loss alone took 247 MB (15 chunk-sized buffers) at every size measured, 128 to 1,024 tokens.

With `--model` SmolLM2-135M's GGUF (49,152 words, 30 blocks), part 1 at 2
rounds: MLX peak 374 MB against 460 MB (0.81x: the blocks weigh more there),
0.95x the time, equal to the bit.
"""

from __future__ import annotations

import argparse
import copy
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

# The whole batch's loss allocates about this many float32 copies of its logits at once (the
# logits, their softmax, the gradient's two terms): 4.0 measured for part 1's "whole" at 512 tokens.
MLX_LM_LOGIT_COPIES = 4
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


# ---------------------------------------------------------------------------
# 4. several batch sizes


def batch_sizes(text: str) -> list[tuple[int, int]]:
    """`2x128,2x512,4x2048` -> [(2, 128), (2, 512), (4, 2048)]."""
    try:
        sizes = [tuple(int(n) for n in part.lower().split("x")) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise SystemExit(f"--sizes {text!r}: give batch sizes as ROWSxTOKENS, comma-separated, e.g. 2x128,2x512")
    return sizes


def loss_alone(model_path: Path, sizes: list[tuple[int, int]], width: int) -> dict:
    """In this process, for each batch size: the MLX memory the chunked loss and its gradient
    with respect to the hidden states allocate at most beyond their inputs (the compiled pass,
    as in a step), on the model's own output layer as a run on this machine computes it
    (--float-base's automatic choice), and the tokens of a chunk."""
    import mlx.core as mx

    from training.chunked_loss import AUTO, loss_plan, weighted_sum_in_chunks
    from base_model.float_base import choose, use_float_base
    from base_model.loading import load_model

    model = load_model(str(model_path), 4).model
    model.freeze()
    on, _ = choose("auto", model)
    if on:
        use_float_base(model)
    plan = loss_plan(model, AUTO)
    result = {}
    for rows, length in sizes:
        chunk = plan.chunk_for(rows * length)
        mx.random.seed(0)
        hidden = mx.random.normal((rows, length, width)) * 0.5
        targets = mx.random.randint(0, plan.vocabulary, (rows, length))
        mask, weights = mx.ones((rows, length)), mx.linspace(0.5, 2.0, rows)
        mx.eval(hidden, targets, mask, weights)

        def weighted(h):
            return weighted_sum_in_chunks(plan.head, h, targets, mask, weights, chunk)[0]

        step = mx.compile(mx.value_and_grad(weighted))
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(hidden))
        result[rows, length] = {"peak": mx.get_peak_memory() - before, "chunk": chunk,
                                "chunk_logits": 4 * chunk * plan.vocabulary, "float_base": on}
        print(f"loss alone at {rows} x {length}: {result[rows, length]['peak'] / 1e6:,.0f} MB", flush=True)
    return result


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo, in bytes (None elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def size_runs(args, model: Path, work: Path, sizes: list[tuple[int, int]], vocabulary: int) -> dict:
    """For each batch size, ours and `mlx_lm lora` (--size-steps steps each, same data and
    settings as part 2). mlx_lm holds the whole batch's logits, their softmax and the gradient's
    terms (about MLX_LM_LOGIT_COPIES float32 copies): where that would take more than half of
    the memory available now, it is not run, and its logits alone (a lower bound of its peak)
    stand in, said so."""
    config = work / "lora.yaml"
    config.write_text('{"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}')  # as part 2's
    results = {}
    for rows, length in sizes:
        data = write_data(work / f"data-{length}", length)
        sized = copy.copy(args)
        sized.batch_size, sized.seq, sized.steps = rows, length, args.size_steps
        ours_result = ours(sized, model, data, work / f"ours-{rows}x{length}", False)
        logits = 4 * rows * length * vocabulary
        free = available_memory()
        if free is not None and MLX_LM_LOGIT_COPIES * logits > free / 2:
            theirs_result = {"peak": logits, "bound": True, "needs": MLX_LM_LOGIT_COPIES * logits, "free": free}
        else:
            theirs_result = theirs(sized, model, data, work / f"theirs-{rows}x{length}", config, False)
        results[rows, length] = (ours_result, theirs_result)
        print(f"ran {rows} x {length}", flush=True)
    return results


def print_sizes(alone: dict, runs: dict, vocabulary: int) -> None:
    def mb(value: float) -> str:
        return f"{value / 1e6:,.0f} MB"

    first = next(iter(alone.values()))
    print(f"\n4. several batch sizes ({vocabulary:,}-word vocabulary; ours: the defaults, automatic chunks, "
          f"float copy of the base {'on' if first['float_base'] else 'off'} as --float-base auto chose here):")
    print(f"{'batch':>12}{'chunk':>7}{'loss alone':>12}{'(chunk logits)':>16}{'ours':>10}{'mlx_lm lora':>14}"
          f"{'ours/mlx_lm':>13}")
    for size, (o, t) in runs.items():
        a = alone[size]
        theirs_text = (">= " if t.get("bound") else "") + mb(t["peak"])
        ratio = f"{'<= ' if t.get('bound') else ''}{o['peak'] / t['peak']:.2f}x"
        print(f"{f'{size[0]} x {size[1]}':>12}{a['chunk']:>7}{mb(a['peak']):>12}{'(' + mb(a['chunk_logits']) + ')':>16}"
              f"{mb(o['peak']):>10}{theirs_text:>14}{ratio:>13}")
    for size, (_, t) in runs.items():
        if t.get("bound"):
            print(f"  {size[0]} x {size[1]}: mlx_lm lora not run: about {MLX_LM_LOGIT_COPIES} float32 copies of its "
                  f"logits ({mb(t['needs'])}) against {mb(t['free'])} available now; its logits alone "
                  f"({mb(t['peak'])}) are a lower bound of its peak, so the ratio is an upper bound")


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
    parser.add_argument("--sizes", help="part 4 only: batch sizes ROWSxTOKENS, comma-separated (e.g. "
                                        "2x128,2x512,4x2048): the loss's own peak, ours' and mlx_lm lora's")
    parser.add_argument("--size-steps", type=int, default=2, help="steps of each run of part 4")
    args = parser.parse_args()
    sizes = batch_sizes(args.sizes) if args.sizes else None

    import mlx.core as mx
    import mlx_lm

    model = model_dir(args)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; mlx {mx.__version__}, "
          f"mlx_lm {mlx_lm.__version__}; device {mx.default_device()}; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if sizes:
        import json

        shape = json.loads((model / "config.json").read_text())
        vocabulary = shape["vocab_size"]
        print(f"model: {model} ({shape['num_hidden_layers']} blocks {shape['hidden_size']} wide, {vocabulary:,} "
              f"words, 4-bit); LoRA rank 8 on every block; Adam; {args.size_steps} steps a run", flush=True)
        alone = loss_alone(model, sizes, shape["hidden_size"])
        with scratch_dir("bench-memory-", args.keep) as work:
            print_sizes(alone, size_runs(args, model, work, sizes, vocabulary), vocabulary)
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        return 0
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
