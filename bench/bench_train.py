"""Wall time and peak memory of our trainer beside `mlx_lm lora`, in one run.

    python bench/bench_train.py [--size tiny|medium|real] [--steps 200] [--batch-size 8]
                                [--max-seq-length 256] [--lora-rank 16] [--lora-layers -1]
                                [--repeats 2] [--with-eval-checkpoints] [--factors]
                                [--full-batches] [--plain]

--size real: SmolLM2-135M-Instruct from its GGUF file (bench/real_model.py fetches it): ours is
given the GGUF file, mlx_lm lora the 4-bit mlx-lm folder ours builds from it (the same folder
ours then trains), on full batches: the demo texts joined into records longer than
--max-seq-length (--full-batches), so both sides train batch x length tokens every step.

--factors: where the speed comes from, in one table: ours with MLX's bundled reference BLAS
(DISTRUST_QLORA_BLAS=bundled) and with the installed OpenBLAS, each with the 4-bit base
(--float-base off) and with its float32 copy; mlx_lm lora with each BLAS (its process loads
the same library before MLX, as ours does: cpu_blas.py). Seconds a step from the steps' own
timings with the first --report-every steps (compilation) left out, tokens a step and a
second, MLX peak; tokens a second as ratios to ours as it ran before (bundled BLAS, 4-bit
base: "today") and to mlx_lm lora with either BLAS.

Measured (2-core x86_64, mlx 0.32.4 CPU, mlx_lm 0.32.2, OpenBLAS 0.3.21 at 2 threads; the
machine shared, load average in brackets; `--size real --factors --steps 3 --val-batches 1`):

  --batch-size 2 --max-seq-length 64, all six rows, 1 run each [9-11]: s/step 65.5 today,
    60.2 bundled + float copy, 58.3 OpenBLAS + 4-bit, 9.30 ours (OpenBLAS + float copy),
    84.3 mlx_lm, 55.2 mlx_lm + OpenBLAS: ours 7.0x today, 9.2x mlx_lm, 6.0x mlx_lm + OpenBLAS;
    MLX peak 782 MiB (float copy) against 394 (4-bit) and mlx_lm's 461.
  --variants 1,4,5 --batch-size 2 --max-seq-length 64 --repeats 2 [3-8]: 23.0 / 1.675 / 18.2
    s a step (best of 2): ours 13.7x today, 11.0x mlx_lm.
  --variants 1,4,5 --batch-size 4 --max-seq-length 64 [6]: 33.0 / 3.88 / 38.2 s a step: ours
    8.5x today, 10.0x mlx_lm; MLX peak 994 MiB against 605 (today) and 739 (mlx_lm).
  the same with --repeats 2 [3-6]: 31.8 / 2.03 / 30.7 s a step (best of 2; 125.9 tok/s against
    8.0 and 8.2): ours 15.7x today, 15.3x mlx_lm.
  The float copy without OpenBLAS, or OpenBLAS without the float copy, gains nothing (1.1x):
  4-bit products do not use BLAS, and the float ones are as slow as them with the reference
  BLAS; together they do. The slow rows' steps swing with the load by up to 1.5x.

Both sides train the same 4-bit model (a copy quantized once with
`mlx_lm.convert`, group size 64, float32 scales; ours sees it is quantized and
does not quantize again), on the same texts (data/train.jsonl, data/val.jsonl;
mlx_lm gets a copy holding `text` only), with the same batch size, sequence
length, LoRA rank / scale / layers, learning rate, number of steps, Adam
(ours: AdamW with weight decay 0, warmup 0), validation and checkpoints out of
the way (intervals past the last step; both still validate at the end, mlx_lm
also before step 1, each over --val-batches batches), and seed 0.

What each side keeps of its own: ours its cosine decay, gradient clipping at
1.0, metrics.jsonl, TensorBoard, progress line and its final checkpoint; mlx_lm
its constant learning rate, rich progress UI and its final adapter save.

Each side runs as a child process:
  ours:   python src/train_qlora.py --model Q4DIR ...
  theirs: python -m mlx_lm lora --train --model Q4DIR ... -c lora.yaml
By default through a thin wrapper (the same program, run by `runpy`) that
times the phases (model load, data, validation, checkpoint, logging) by
wrapping those functions, and, for mlx_lm, receives its own training reports
(the dicts it would send to wandb: it/s, tok/s, peak memory); mlx_lm 0.32
prints neither it/s nor peak memory itself. `--plain` runs the bare commands
(total wall time, max RSS and what they print only).

Figures: wall time of the whole process (spawn to exit), MLX peak memory
(mx.get_peak_memory: ours `peak_memory_mb` of its last metrics.jsonl line,
mlx_lm's report), and the process's max RSS (os.wait4). Each side runs
--repeats times, alternating; the table shows the best (lowest wall time) run
and all runs are listed. Ratios are ours / theirs. On a shared machine wall times swing with the load
(other processes on the same cores); the child's CPU time (user+sys, from
wait4) swings less, so both are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BLAS_PRELUDE, REPO, SRC, bench_cache, medium_model, run_child  # noqa: E402

QUANT_BITS, QUANT_GROUP = 4, 64

# ---------------------------------------------------------------------------
# the models


def real_folder() -> tuple[Path, Path]:
    """(SmolLM2-135M's GGUF file, the 4-bit mlx-lm folder built from it once): ours is given the
    GGUF file, and resolves it to that folder; mlx_lm lora is given the folder."""
    from real_model import gguf_path

    gguf = gguf_path()
    if not gguf.is_file():
        sys.exit(f"--size real: {gguf} is not there; python bench/real_model.py fetches it")
    sys.path.insert(0, str(SRC))
    from base_model.loading import prepare_base, resolve_model

    return gguf, Path(prepare_base(resolve_model(str(gguf)), QUANT_BITS, shown=str(gguf)).path)


def base_model(size: str) -> Path:
    if size == "tiny":
        sys.path.insert(0, str(SRC))
        from base_model.tiny import ensure_tiny_model

        return ensure_tiny_model()
    return medium_model()


def quantized_copy(base: Path) -> Path:
    """A 4-bit copy (group 64, float32 kept) made once with mlx_lm.convert."""
    from mlx_lm import convert

    def build(scratch: Path) -> None:
        os.rmdir(scratch)  # convert refuses an existing folder
        convert(hf_path=str(base), mlx_path=str(scratch), quantize=True, q_bits=QUANT_BITS,
                q_group_size=QUANT_GROUP, dtype="float32")

    sys.path.insert(0, str(SRC))
    from base_model.builds import build_model_dir_once

    return build_model_dir_once(bench_cache() / f"{base.name}-q{QUANT_BITS}g{QUANT_GROUP}", build,
                                f"a {QUANT_BITS}-bit copy of {base.name}")


def text_only_copy(data_dir: Path, folder: Path) -> Path:
    """train.jsonl / valid.jsonl with only `text`, for mlx_lm."""
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in (("train.jsonl", "train.jsonl"), ("val.jsonl", "valid.jsonl")):
        with open(data_dir / src, encoding="utf-8") as fin, open(folder / dst, "w", encoding="utf-8") as fout:
            for line in fin:
                if line.strip():
                    fout.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return folder


# ---------------------------------------------------------------------------
# the wrappers: the same programs, run by runpy, with timers around phases.
# They print one line `BENCH_PHASES {json}` to stderr at exit.

_COMMON = BLAS_PRELUDE + r"""
import atexit, json, os, sys, time
T_START = time.time()
PH = {"t_start": T_START}
def timed(owner, name, key, count=False):
    fn = getattr(owner, name, None)
    if fn is None:
        return
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PH[key] = PH.get(key, 0.0) + time.perf_counter() - t
            if count:
                PH[key + "_calls"] = PH.get(key + "_calls", 0) + 1
    setattr(owner, name, wrapper)
def report():
    PH["t_exit"] = time.time()
    try:
        import mlx.core as mx
        PH["mlx_peak_bytes"] = mx.get_peak_memory()
    except Exception:
        pass
    sys.stderr.write("BENCH_PHASES " + json.dumps(PH) + "\n")
    sys.stderr.flush()
atexit.register(report)
"""

OURS_WRAPPER = _COMMON + r"""
import runpy
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
import mlx.core, mlx_lm
import base_model.loading, base_model.lora, training.trainer as trainer, corpus.index, monitoring.metrics_log, monitoring.progress
PH["t_imported"] = time.time()
timed(base_model.loading, "load_model", "load")
timed(base_model.lora, "attach_lora", "lora")
timed(corpus.index.CorpusIndex, "build", "index", count=True)
timed(trainer.DistrustTrainer, "__init__", "trainer_init")
timed(trainer.DistrustTrainer, "fit", "fit")
timed(trainer.DistrustTrainer, "validate", "validation", count=True)
timed(trainer.DistrustTrainer, "save_checkpoint", "checkpoint", count=True)
timed(trainer.DistrustTrainer, "_compile", "compile_build")
timed(monitoring.metrics_log.MetricsLog, "__init__", "metrics_init")
timed(monitoring.metrics_log.MetricsLog, "log", "metrics_log")
timed(monitoring.metrics_log.MetricsLog, "close", "metrics_close")
timed(monitoring.progress.ProgressLine, "update", "progress")
# the steps themselves are timed by the trainer (metrics.jsonl, per step)
runpy.run_path(sys.argv[0], run_name="__main__")
"""

THEIRS_WRAPPER = _COMMON + r"""
import runpy
import mlx.core, mlx_lm.lora, mlx_lm.tuner.trainer
PH["t_imported"] = time.time()
PH["reports"] = []
class Reports:
    def on_train_loss_report(self, info):
        PH["reports"].append(dict(info, t=time.time()))
    def on_val_loss_report(self, info):
        pass
mlx_lm.lora.get_reporting_callbacks = lambda *a, **k: Reports()
timed(mlx_lm.lora, "load", "load")
timed(mlx_lm.lora, "load_dataset", "index")
timed(mlx_lm.lora, "linear_to_lora_layers", "lora")
timed(mlx_lm.lora, "train", "fit")
timed(mlx_lm.tuner.trainer, "evaluate", "validation", count=True)
timed(mlx_lm.tuner.trainer.mx, "save_safetensors", "checkpoint", count=True)
sys.argv = ["mlx_lm"] + sys.argv[1:]
runpy.run_module("mlx_lm", run_name="__main__")
"""


# ---------------------------------------------------------------------------
# running one side


def run_side(cmd: list[str], env: dict, log_path: Path) -> dict:
    """One side's process, with the phase timings its wrapper printed."""
    result = run_child(cmd, log_path, env)
    result["phases"] = None
    for line in result["log"].splitlines():
        if line.startswith("BENCH_PHASES "):
            result["phases"] = json.loads(line[len("BENCH_PHASES "):])
    return result


def ours_command(args, model: Path, out: Path, plain: bool, *extra: str) -> list[str]:
    far = args.steps + 1 if not args.with_eval_checkpoints else args.eval_every
    cmd = ["src/train_qlora.py", "--model", str(model), "--data-dir", str(args.data_dir),
           "--output-dir", str(out), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-seq-length", str(args.max_seq_length), "--lora-rank", str(args.lora_rank),
           "--lora-alpha", str(args.lora_alpha), "--lora-layers", str(args.layers),
           "--learning-rate", str(args.learning_rate), "--warmup-steps", "0",
           "--eval-steps", str(far), "--checkpoint-interval", str(far), "--val-batches", str(args.val_batches),
           "--no-early-stopping", "--fresh", "--seed", "0", *extra]
    if plain:
        return [sys.executable] + cmd
    return [sys.executable, "-c", OURS_WRAPPER] + cmd


def theirs_command(args, model: Path, data: Path, out: Path, config: Path, plain: bool) -> list[str]:
    far = args.steps + 1 if not args.with_eval_checkpoints else args.eval_every
    cmd = ["lora", "--train", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
           "--batch-size", str(args.batch_size), "--iters", str(args.steps),
           "--max-seq-length", str(args.max_seq_length), "--num-layers", str(args.layers),
           "--learning-rate", str(args.learning_rate), "--optimizer", "adam",
           "--steps-per-report", str(args.report_every), "--steps-per-eval", str(far),
           "--save-every", str(far), "--val-batches", str(args.val_batches), "--seed", "0", "-c", str(config)]
    if plain:
        return [sys.executable, "-m", "mlx_lm"] + cmd
    return [sys.executable, "-c", THEIRS_WRAPPER] + cmd


def read_ours(result: dict, out: Path, warm: int) -> None:
    steps, end = [], None
    path = out / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "end":
                end = record
            elif "tokens_per_sec" in record and record.get("tokens"):
                steps.append(record["tokens"] / record["tokens_per_sec"])
    result["step_seconds"] = steps
    if end:
        result["steps"] = end["steps"]
        result["mlx_peak"] = end["peak_memory_mb"] * 1e6
        result["train_seconds"] = end["seconds"]
        result["tokens"] = end["tokens"]
    if len(steps) > warm:
        result["first"] = sum(steps[:warm])
        result["steady"] = sum(steps[warm:]) / len(steps[warm:])


def read_theirs(result: dict, warm: int) -> None:
    reports = (result["phases"] or {}).get("reports") or []
    windows, previous = [], 0
    for r in reports:
        n = r["iteration"] - previous
        previous = r["iteration"]
        windows.append((n, n / r["iterations_per_second"], r))
    if windows:
        result["steps"] = previous
        result["train_seconds"] = sum(w[1] for w in windows)
        result["tokens"] = reports[-1]["trained_tokens"]
        result["mlx_peak"] = max(r["peak_memory"] for r in reports) * 1e9
        result["first"] = windows[0][1] if windows[0][0] == warm else None
        rest = windows[1:]
        if rest:
            result["steady"] = sum(w[1] for w in rest) / sum(w[0] for w in rest)
    if result["phases"] and "mlx_peak_bytes" in result["phases"]:
        result["mlx_peak"] = max(result.get("mlx_peak", 0), result["phases"]["mlx_peak_bytes"])


def phase_rows(result: dict) -> dict:
    """Seconds per phase; `other` is the rest of the wall time."""
    p = result["phases"]
    if not p:
        return {}
    rows = {
        "interpreter start": p["t_start"] - result["t_spawn"],
        "imports (mlx, mlx_lm, ours)": p["t_imported"] - p["t_start"],
        "model load": p.get("load", 0.0),
        "LoRA attach": p.get("lora", 0.0),
        "data (read, tokenize, index)": p.get("index", 0.0),
    }
    steps = result.get("train_seconds") or 0.0
    first = result.get("first") or 0.0
    rows["steps: first (compile) window"] = first
    rows["steps: the rest"] = steps - first
    rows["validation"] = p.get("validation", 0.0)
    rows["checkpoint / adapter save"] = p.get("checkpoint", 0.0)
    if "metrics_log" in p:
        rows["logging (metrics.jsonl + TensorBoard)"] = (p.get("metrics_log", 0.0) + p.get("metrics_init", 0.0)
                                                        + p.get("metrics_close", 0.0))
        rows["progress line"] = p.get("progress", 0.0)
    if "trainer_init" in p:
        rows["trainer init + compile build"] = p.get("trainer_init", 0.0) + p.get("compile_build", 0.0)
    if "validation" in p and "index_calls" in p and p.get("index_calls", 0) > 1:
        pass  # the val index is built inside validate(): counted there
    rows["other (loop, UI, exit)"] = result["wall"] - sum(rows.values())
    return rows


# ---------------------------------------------------------------------------
# printing


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def fmt_ratio(a, b) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def pick(runs: list[dict]) -> dict:
    good = [r for r in runs if r["rc"] == 0] or runs
    return min(good, key=lambda r: r["wall"])


def print_block(title: str, ours_runs: list[dict], theirs_runs: list[dict], args) -> None:
    ours, theirs = pick(ours_runs), pick(theirs_runs)
    print(f"\n=== {title} ===")
    for name, runs in (("ours", ours_runs), ("mlx_lm", theirs_runs)):
        walls = ", ".join(f"{r['wall']:.2f}s wall / {r['cpu']:.2f}s CPU (rc {r['rc']})" for r in runs)
        print(f"{name:>7} runs: {walls}; median wall {statistics.median(r['wall'] for r in runs):.2f}s")
    rows = []

    def row(label, a, b, f, ratio=True):
        rows.append((label, f(a), f(b), fmt_ratio(a, b) if ratio else ""))

    sec = lambda v: "-" if v is None else f"{v:.2f} s"
    ms = lambda v: "-" if v is None else f"{1000 * v:.1f} ms"
    num = lambda v: "-" if v is None else f"{v:,.1f}"
    row("wall time, process (best run)", ours["wall"], theirs["wall"], sec)
    row("wall time, median of runs", statistics.median(r["wall"] for r in ours_runs),
        statistics.median(r["wall"] for r in theirs_runs), sec)
    row("CPU time (user+sys), best run", ours["cpu"], theirs["cpu"], sec)
    row("CPU time, lowest of runs", min(r["cpu"] for r in ours_runs), min(r["cpu"] for r in theirs_runs), sec)
    row("time in steps (own timers)", ours.get("train_seconds"), theirs.get("train_seconds"), sec)
    row(f"first {args.report_every} steps (compile)", ours.get("first"), theirs.get("first"), sec)
    row(f"per step after the first {args.report_every}", ours.get("steady"), theirs.get("steady"), ms)
    for who in (ours, theirs):
        who["sps"] = who["steps"] / who["train_seconds"] if who.get("train_seconds") else None
        who["tps"] = who["tokens"] / who["train_seconds"] if who.get("train_seconds") else None
        who["sps_wall"] = who["steps"] / who["wall"] if who.get("steps") else None
    row("steps/s (in steps)", ours.get("sps"), theirs.get("sps"), num)
    row("steps/s (whole process)", ours.get("sps_wall"), theirs.get("sps_wall"), num)
    row("tokens/s as each counts", ours.get("tps"), theirs.get("tps"), num, ratio=False)
    row("tokens counted (own way)", ours.get("tokens"), theirs.get("tokens"), lambda v: "-" if v is None else f"{v:,}",
        ratio=False)
    row("MLX peak memory", ours.get("mlx_peak"), theirs.get("mlx_peak"), fmt_bytes)
    row("max RSS (process)", ours["rss"], theirs["rss"], fmt_bytes)
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'ours':>14}  {'mlx_lm lora':>14}  {'ours/theirs':>11}")
    for label, a, b, r in rows:
        print(f"{label:<{width}}  {a:>14}  {b:>14}  {r:>11}")

    po, pt = phase_rows(ours), phase_rows(theirs)
    if po or pt:
        print("\nwhere the time goes (best run, seconds; share of wall time)")
        labels = list(dict.fromkeys(list(po) + list(pt)))
        width = max(len(l) for l in labels)
        for label in labels:
            a, b = po.get(label), pt.get(label)
            fa = "-" if a is None else f"{a:7.2f} {100 * a / ours['wall']:5.1f}%"
            fb = "-" if b is None else f"{b:7.2f} {100 * b / theirs['wall']:5.1f}%"
            print(f"{label:<{width}}  {fa:>15}  {fb:>15}")
        vo, vt = ours["phases"] or {}, theirs["phases"] or {}
        print(f"(validations: ours {vo.get('validation_calls', 0)}, mlx_lm {vt.get('validation_calls', 0)}; "
              f"saves: ours {vo.get('checkpoint_calls', 0)} checkpoint(s), "
              f"mlx_lm {vt.get('checkpoint_calls', 0)} adapter file write(s))")
    plain_log = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", theirs["log"])
    last = [l for l in plain_log.splitlines() if l.strip() and l.strip()[0].isdigit() and "val" not in l]
    if last:
        print(f"mlx_lm's last report line (iter, train_loss, tok/s, tokens): {last[-1].strip()}")
    summary = [l for l in ours["log"].splitlines() if "tok/s" in l and "tokens" in l]
    if summary:
        print(f"ours' summary line: {summary[-1].strip()}")


# ---------------------------------------------------------------------------
# --factors: where the speed comes from

BUNDLED = {"DISTRUST_QLORA_BLAS": "bundled"}  # cpu_blas.py: keep MLX's reference BLAS
# (side, label, environment, our flags). The first is ours as it ran before the optimized BLAS and
# the float copy existed; "today" in the table.
FACTORS = [
    ("ours", "ours: bundled BLAS, 4-bit base", BUNDLED, ["--float-base", "off"]),
    ("ours", "ours: bundled BLAS, float copy", BUNDLED, ["--float-base", "on"]),
    ("ours", "ours: OpenBLAS, 4-bit base", {}, ["--float-base", "off"]),
    ("ours", "ours: OpenBLAS, float copy (default)", {}, ["--float-base", "auto"]),
    ("mlx_lm", "mlx_lm lora: bundled BLAS", BUNDLED, []),
    ("mlx_lm", "mlx_lm lora: OpenBLAS", {}, []),
]


def run_factors(args, ours_model: Path, theirs_model: Path, data: Path, lora_yaml: Path, work: Path) -> dict:
    """Each variant of FACTORS --repeats times, the order rotated each round; the runs kept."""
    from run_safety.cpu_blas import blas_line

    if blas_line() is None or "bundled" in (blas_line() or ""):
        print(f"note: no optimized BLAS loaded here ({blas_line()}): the OpenBLAS rows multiply like the bundled ones")
    chosen = [FACTORS[n - 1] for n in args.variants]
    runs = {label: [] for _, label, _, _ in chosen}
    for i in range(args.repeats):
        order = chosen[i % len(chosen):] + chosen[:i % len(chosen)]
        for side, label, extra_env, flags in order:
            env = {k: v for k, v in os.environ.items() if k != "DISTRUST_QLORA_BLAS"}
            env.update(extra_env, TRANSFORMERS_VERBOSITY="error")
            out = work / f"{label.replace(' ', '_').replace(',', '').replace(':', '')}-{i}"
            if side == "ours":
                cmd = ours_command(args, ours_model, out, args.plain, *flags)
                shown = ours_command(args, ours_model, out, True, *flags)
            else:
                cmd = theirs_command(args, theirs_model, data, out, lora_yaml, args.plain)
                shown = theirs_command(args, theirs_model, data, out, lora_yaml, True)
            if i == 0:
                print(f"{label}: {' '.join(f'{k}={v}' for k, v in extra_env.items())} "
                      f"{' '.join(shown).replace(str(work) + '/', '')}", flush=True)
            result = run_side(cmd, env, work / f"{out.name}.log")
            if side == "ours":
                read_ours(result, out, args.report_every)
                result["tokens_per_step"] = result["tokens"] / result["steps"] if result.get("steps") else None
            else:
                read_theirs(result, args.report_every)
                result["tokens_per_step"] = result["tokens"] / result["steps"] if result.get("steps") else None
            if result["rc"] != 0:
                print(f"WARNING: {label} run {i} exited {result['rc']}; log tail:\n"
                      + "\n".join(result["log"].splitlines()[-15:]))
            runs[label].append(result)
            steady = result.get("steady")
            print(f"  ran {label} ({i + 1}/{args.repeats}): "
                  f"{'-' if steady is None else f'{steady:.2f}'} s a step after the first {args.report_every}", flush=True)
    return runs


def print_factors(runs: dict, args, title: str = "where the speed comes from",
                  against: tuple[tuple[str, str], ...] | None = None) -> None:
    """The table of `runs` ({label: runs}): seconds a step (the steps' own timings, the first
    --report-every steps left out: start-up and compilation excluded), tokens a step and a second,
    MLX peak; then, for each (column, label) of `against`, tokens a second as a ratio to that
    label's (default: today's ours, mlx_lm lora with its bundled BLAS and with OpenBLAS), and
    the MLX peak as a ratio to the last one's."""
    if against is None:  # those of the rows that were run
        against = tuple((column, label) for column, label in (
            ("x today", FACTORS[0][1]), ("x mlx_lm", FACTORS[4][1]), ("x mlx_lm+OpenBLAS", FACTORS[5][1]))
            if label in runs)
    best = {}
    for label, results in runs.items():
        good = [r for r in results if r["rc"] == 0 and r.get("steady")]
        if good:
            chosen = min(good, key=lambda r: r["steady"])
            chosen["tps"] = chosen["tokens_per_step"] / chosen["steady"] if chosen.get("tokens_per_step") else None
            best[label] = chosen

    def ratio(label: str, other: str, key: str) -> str:
        a, b = best.get(label, {}).get(key), best.get(other, {}).get(key)
        return "-" if not a or not b else f"{a / b:.{1 if key == 'tps' else 2}f}x"

    print(f"\n=== {title}: {args.steps} steps of {args.batch_size} x {args.max_seq_length} tokens, LoRA rank "
          f"{args.lora_rank} on {args.layers} blocks; best of {args.repeats} run(s) each; the first "
          f"{args.report_every} step(s) (compilation) left out ===")
    width = max(len(label) for label in runs)
    columns = [name for name, _ in against] + [f"peak {against[-1][0]}"]
    print(f"{'':<{width}}  {'s/step':>7}  {'tokens/step':>11}  {'tok/s':>8}  {'MLX peak':>10}  "
          + "  ".join(f"{c:>{max(8, len(c))}}" for c in columns))
    for label in runs:
        r = best.get(label)
        if r is None:
            print(f"{label:<{width}}  (no run finished)")
            continue
        cells = [ratio(label, other, "tps") for _, other in against] + [ratio(label, against[-1][1], "mlx_peak")]
        print(f"{label:<{width}}  {r['steady']:>7.3f}  {r['tokens_per_step'] or 0:>11,.0f}  {r['tps'] or 0:>8.1f}  "
              f"{fmt_bytes(r.get('mlx_peak')):>10}  "
              + "  ".join(f"{cell:>{max(8, len(c))}}" for cell, c in zip(cells, columns)))

    def seconds(values) -> str:
        return ", ".join("-" if v is None else f"{v:.3f}" for v in values)

    for label, results in runs.items():
        print(f"  {label}: s/step {seconds(r.get('steady') for r in results)}; first step(s) "
              f"{seconds(r.get('first') for r in results)} s")
    ours_rows = [label for label in best if label.startswith("ours") or ": ours" in label]
    shown = next((label for label in ours_rows if "(default)" in label), ours_rows[0] if ours_rows else None)
    said = best[shown].get("log", "") if shown else ""
    for line in said.splitlines():
        if line.startswith(("blas:", "base:")):
            print(f"  {shown} says: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "medium", "real"], default="tiny",
                        help="real: SmolLM2-135M from its GGUF (bench/real_model.py)")
    parser.add_argument("--steps", type=int, default=None, help="default: 200 tiny, 50 medium, 4 real")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-layers", type=int, default=-1, help="-1 = all")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--val-batches", type=int, default=2, help="batches per (end) validation, both sides")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--with-eval-checkpoints", action="store_true",
                        help="also validate and checkpoint every --eval-every steps (both sides)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--factors", action="store_true",
                        help="where the speed comes from: ours with MLX's bundled BLAS and with OpenBLAS, each with "
                             "the 4-bit base and its float copy, and mlx_lm lora with each BLAS (one table)")
    parser.add_argument("--variants", default="1,2,3,4,5,6",
                        help="--factors: which rows, by number: " + "; ".join(
                            f"{n} {label}" for n, (_, label, _, _) in enumerate(FACTORS, 1)))
    parser.add_argument("--full-batches", action="store_true",
                        help="the demo texts joined into records longer than --max-seq-length, so that every batch "
                             "of both sides is full (the default with --size real)")
    parser.add_argument("--plain", action="store_true", help="bare commands, no phase timers")
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    args = parser.parse_args()
    try:
        args.variants = sorted({int(n) for n in args.variants.split(",")})
    except ValueError:
        args.variants = []
    if not args.variants or not set(args.variants) <= set(range(1, len(FACTORS) + 1)):
        parser.error(f"--variants: numbers from 1 to {len(FACTORS)}, comma-separated")
    args.steps = args.steps or {"tiny": 200, "medium": 50, "real": 4}[args.size]
    args.report_every = max(1, args.steps // 10)
    while args.steps % args.report_every:
        args.report_every -= 1

    if args.size == "real":
        ours_model, model = real_folder()  # ours reads the GGUF file; both train the same 4-bit folder
    else:
        model = quantized_copy(base_model(args.size))
        ours_model = model
    model_config = json.loads((model / "config.json").read_text())
    total_layers = model_config["num_hidden_layers"]
    args.layers = total_layers if args.lora_layers < 0 else min(args.lora_layers, total_layers)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.full_batches or args.size == "real":
        from bench_grad_checkpoint import write_data

        args.data_dir = data = write_data(work / "full-batches", args.max_seq_length)
    else:
        data = text_only_copy(args.data_dir, work / "mlx-data")
    lora_yaml = work / "lora.yaml"
    lora_yaml.write_text(json.dumps({"lora_parameters": {
        "rank": args.lora_rank, "scale": args.lora_alpha / args.lora_rank, "dropout": 0.0}}))  # JSON is YAML

    import mlx.core as mx
    import mlx_lm
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}; mlx {mx.__version__}, mlx_lm {mlx_lm.__version__}; "
          f"device {mx.default_device()}")
    print(f"model: {model} ({model_config['num_hidden_layers']} layers, hidden {model_config['hidden_size']}, "
          f"vocab {model_config['vocab_size']}, {QUANT_BITS}-bit g{QUANT_GROUP})")
    print(f"settings: steps {args.steps}, batch {args.batch_size}, seq {args.max_seq_length}, LoRA rank "
          f"{args.lora_rank} scale {args.lora_alpha / args.lora_rank:g} on {args.layers} layers, lr "
          f"{args.learning_rate:g}, val batches {args.val_batches}, "
          + (f"validation+checkpoint every {args.eval_every}" if args.with_eval_checkpoints
             else "validation/checkpoints only at the end")
          + f"; mlx_lm reports every {args.report_every} steps")
    print(f"data: {args.data_dir}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)

    if args.factors:
        print_factors(run_factors(args, ours_model, model, data, lora_yaml, work), args)
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.keep:
            print(f"\nrun folders and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    variants = [("default", {})]

    printed_commands = False
    for name, extra in variants:
        env = dict(os.environ, **extra)
        env.setdefault("TRANSFORMERS_VERBOSITY", "error")
        ours_runs, theirs_runs = [], []
        for i in range(args.repeats):
            order = ["ours", "theirs"] if i % 2 == 0 else ["theirs", "ours"]
            for who in order:
                out = work / f"{name.replace(' ', '_')}-{who}-{i}"
                if who == "ours":
                    cmd = ours_command(args, ours_model, out, args.plain)
                else:
                    cmd = theirs_command(args, model, data, out, lora_yaml, args.plain)
                if not printed_commands:
                    shown = ours_command(args, ours_model, out, True) if who == "ours" else \
                        theirs_command(args, model, data, out, lora_yaml, True)
                    print(f"{who} command: {' '.join(shown)}")
                result = run_side(cmd, env, work / f"{out.name}.log")
                if who == "ours":
                    read_ours(result, out, args.report_every)
                    ours_runs.append(result)
                else:
                    read_theirs(result, args.report_every)
                    theirs_runs.append(result)
                if result["rc"] != 0:
                    print(f"WARNING: {who} run {i} exited {result['rc']}; log tail:\n"
                          + "\n".join(result["log"].splitlines()[-15:]))
                sys.stdout.flush()
            printed_commands = True
        print_block(f"{args.size}: {name}", ours_runs, theirs_runs, args)
    if args.keep:
        print(f"\nrun folders and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
