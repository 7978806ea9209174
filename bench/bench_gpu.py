"""Ours beside `mlx_lm lora` on an NVIDIA GPU (MLX's CUDA backend): SmolLM2-135M from its GGUF
and a random 4-bit model of Llama-3.2-1B's shape, in one run that fits a 10-minute call.

    python bench/bench_gpu.py [--wheels DIR] [--tiny] [--models smollm2,llama-1b] [--steps 12]
                              [--repeats 1] [--keep]

For each model, both sides train the same 4-bit mlx-lm folder on the same full batches (the
demo texts joined into records longer than the sequence, so that every batch of both sides is
batch x length tokens), with the same LoRA rank, blocks, learning rate, Adam and steps, each in
a process of its own, through bench_train's wrappers (ours' steps timed by its metrics.jsonl,
mlx_lm's by its own training reports). The table is bench_train --factors' table: seconds a
step with the first step (compilation) left out, tokens a step and a second, MLX peak, and
ours / mlx_lm's tokens a second and peak.

The models:
  smollm2   SmolLM2-135M-Instruct, from bench/real_model.py's GGUF file (ours is given the file,
            mlx_lm lora the 4-bit folder built from it); skipped, saying so, where it is not there.
  llama-1b  Llama-3.2-1B's shape (2,048 wide, 16 blocks, 32 heads of 64 with 8 key-value heads,
            MLP 8,192, 128,256 words, tied embedding), random weights from a fixed seed, quantized
            to 4 bits (group 64) once; the tiny model's tokenizer (the targets are the first 1,024
            words; the softmax runs over all 128,256).

--tiny: the whole path at a size the CPU runs in seconds (the tiny model in place of SmolLM2, a
Llama of the same family 64 wide in place of the 1B one, 3 steps of 2 x 16 tokens): what the
suite runs (tests/test_bench_gpu.py), so that the script works the day a GPU is lent.

On the device machine nothing can be downloaded: bring MLX's CUDA wheel as files. Here (the same
Python minor version as there):

    pip download "mlx==0.32.4" "mlx-cuda-12==0.32.4" "mlx-lm==0.32.2" --no-deps \
        --only-binary :all: --platform manylinux_2_35_x86_64 -d wheels/
    f=$(ls wheels/mlx_cuda_12-*.whl); split -b 40M "$f" "$f.part-" && rm "$f"   # too big to travel whole

and there: `python bench/bench_gpu.py --wheels wheels/`, which joins the parts (NAME.whl.part-aa,
-ab, ... back into NAME.whl), installs every wheel of the folder with pip --no-index --no-deps
into this Python (mlx-lm's own dependencies are the project's, already installed), and runs the
benchmark in a fresh process. mlx-cuda-12 also asks for NVIDIA's CUDA libraries as wheels
(nvidia-cublas-cu12, nvidia-cudnn-cu12 9, ...: hundreds of MB); --no-deps leaves them out and
MLX loads the machine's own CUDA libraries; where it cannot, bring those wheels in the folder too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import print_factors, read_ours, read_theirs, run_side, ours_command, theirs_command  # noqa: E402
from common import SRC, random_model, scratch_dir  # noqa: E402

LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "tie_word_embeddings": True}
# The same family at the tiny model's scale (--tiny): grouped-query attention, a tied embedding.
LLAMA_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096, "max_position_embeddings": 512,
              "rope_theta": 500000.0, "tie_word_embeddings": True}
# (batch size, tokens a row, steps) of each model: a few minutes in all on an H100-class GPU.
SETTINGS = {"smollm2": (8, 512, 12), "llama-1b": (4, 1024, 12)}
TINY_SETTINGS = (2, 16, 3)


def install_wheels(folder: Path) -> None:
    """Join split wheels (NAME.whl.part-aa, -ab, ... written by `split`) and pip install every
    wheel of `folder` with no index: the device machine reaches no package registry."""
    parts: dict[str, list[Path]] = {}
    for part in sorted(folder.glob("*.whl.part-*")):  # split's suffixes sort in its order
        parts.setdefault(part.name.split(".whl.part-")[0], []).append(part)
    for wheel, pieces in parts.items():
        with open(folder / f"{wheel}.whl", "wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        sys.exit(f"--wheels {folder}: no wheels there")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def model_folders(args) -> dict[str, tuple[Path, Path]]:
    """{name: (what ours is given, the 4-bit folder mlx_lm lora is given)} for --models."""
    from base_model.tiny import ensure_tiny_model
    from base_model.loading import prepare_base, resolve_model

    folders = {}
    for name in args.models:
        if name == "smollm2":
            if args.tiny:
                tiny = Path(prepare_base(str(ensure_tiny_model()), 4).path)
                folders["tiny (for smollm2)"] = (tiny, tiny)
                continue
            from real_model import gguf_path

            gguf = gguf_path()
            if not gguf.is_file():
                print(f"smollm2: skipped: {gguf} is not there (python bench/real_model.py fetches it)")
                continue
            folders[name] = (gguf, Path(prepare_base(resolve_model(str(gguf)), 4, shown=str(gguf)).path))
        else:
            shape, label = (LLAMA_TINY, "llama-tiny (for llama-1b)") if args.tiny else (LLAMA_1B, name)
            started = time.perf_counter()
            base = random_model(shape, "llama-tiny" if args.tiny else "llama-3.2-1b-shape")
            folder = Path(prepare_base(str(base), 4).path)
            print(f"{label}: {folder} ({time.perf_counter() - started:.1f} s to build or find)", flush=True)
            folders[label] = (folder, folder)
    return folders


def bench_model(args, label: str, ours_model: Path, theirs_model: Path, work: Path) -> dict:
    """Ours and mlx_lm lora on one model, --repeats times each: bench_train's runs."""
    from bench_grad_checkpoint import write_data

    batch, length, steps = TINY_SETTINGS if args.tiny else SETTINGS[label.split(" ")[0]]
    layers = json.loads((theirs_model / "config.json").read_text())["num_hidden_layers"]
    folder = work / label.split(" ")[0]
    data = write_data(folder / "data", length)
    lora_yaml = folder / "lora.yaml"
    lora_yaml.write_text(json.dumps({"lora_parameters": {"rank": args.lora_rank, "scale": 2.0, "dropout": 0.0}}))
    settings = SimpleNamespace(steps=args.steps or steps, batch_size=batch, max_seq_length=length,
                               lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, layers=layers,
                               learning_rate=1e-4, val_batches=1, data_dir=data, with_eval_checkpoints=False,
                               eval_every=0, report_every=1, plain=False, repeats=args.repeats)
    runs = {f"{label}: ours": [], f"{label}: mlx_lm lora": []}
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    for i in range(args.repeats):
        for side in ("ours", "mlx_lm lora") if i % 2 == 0 else ("mlx_lm lora", "ours"):
            out = folder / f"{side.split(' ')[0]}-{i}"
            if side == "ours":
                cmd = ours_command(settings, ours_model, out, False)
            else:
                cmd = theirs_command(settings, theirs_model, data, out, lora_yaml, False)
            result = run_side(cmd, env, folder / f"{out.name}.log")
            (read_ours(result, out, 1) if side == "ours" else read_theirs(result, 1))
            result["tokens_per_step"] = result["tokens"] / result["steps"] if result.get("steps") else None
            if result["rc"] != 0:
                print(f"WARNING: {label}, {side}, run {i} exited {result['rc']}; log tail:\n"
                      + "\n".join(result["log"].splitlines()[-15:]), flush=True)
            runs[f"{label}: {side}"].append(result)
            print(f"  ran {label}, {side} ({i + 1}/{args.repeats}) in {result['wall']:.1f} s", flush=True)
    return {"runs": runs, "settings": settings}


def device_text() -> str:
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:  # an MLX without it
        info = {}
    name = info.get("device_name") or info.get("architecture") or ""
    memory = info.get("memory_size")
    return f"{mx.default_device()}{f' {name}' if name else ''}{f', {memory / 2**30:.0f} GiB' if memory else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="install the wheels of this folder first (parts joined), "
                                                    "then run the benchmark in a fresh process")
    parser.add_argument("--tiny", action="store_true", help="the whole path at a size the CPU runs in seconds")
    parser.add_argument("--models", default="smollm2,llama-1b", help="comma-separated: smollm2, llama-1b")
    parser.add_argument("--steps", type=int, help="steps of every run (default: each model's own)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SETTINGS]
    if unknown or not args.models:
        parser.error(f"--models: {', '.join(unknown) or 'none given'}: choose among {', '.join(SETTINGS)}")
    if args.wheels:
        install_wheels(args.wheels)
        given = list(argv if argv is not None else sys.argv[1:])
        rest = [a for i, a in enumerate(given) if not a.startswith("--wheels") and
                not (i and given[i - 1] == "--wheels")]
        # The benchmark itself in a fresh process, which imports what was just installed.
        return subprocess.run([sys.executable, __file__, *rest]).returncode

    sys.path.insert(0, str(SRC))
    import mlx.core as mx
    import mlx_lm

    started = time.perf_counter()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}; python "
          f"{platform.python_version()}; mlx {mx.__version__}, mlx_lm {mlx_lm.__version__}; device {device_text()}",
          flush=True)
    with scratch_dir("bench-gpu-", args.keep) as work:
        results = {label: bench_model(args, label, ours_model, theirs_model, work)
                   for label, (ours_model, theirs_model) in model_folders(args).items()}
        for label, result in results.items():
            print_factors(result["runs"], result["settings"], title=label,
                          against=(("x mlx_lm", f"{label}: mlx_lm lora"),))
    print(f"\nall of it: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
