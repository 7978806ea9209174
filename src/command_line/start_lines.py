"""The lines a training run says at its start, about its data, its length and how it computes.

Each is a plain function of what it describes, so a test can read it without a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

def compute_with(model, float_base: str, bits: str) -> dict:
    """How the run's products are computed, said in the start lines: the BLAS of MLX's CPU
    backend (run_safety/cpu_blas.py), and the base in its quantized form or with float32 copies of its
    quantized layers (base_model/float_base.py, --float-base), made here. Returns what a checkpoint
    records of it (DistrustTrainer.arithmetic)."""
    import mlx.core as mx

    from run_safety.cpu_blas import blas_identity, blas_line
    from base_model.float_base import apply, copy_sizes, float_base_line

    line = blas_line()
    if line:
        print(line, file=sys.stderr)
    sizes = copy_sizes(model)  # before: the quantized layers are gone once the copies are in
    on, why = apply(float_base, model)
    if on or sizes[0] and mx.default_device() == mx.cpu:  # on Metal and CUDA, the quantized form says nothing
        print(float_base_line(on, why, sizes, bits), file=sys.stderr)
    return {"float_base": on, **blas_identity()}


def length_said(config, names: dict | None) -> str:
    """How long the run trains, in the words the user said it: `--epochs 2 (20 steps)`, `--iters 20`,
    `iters: 20 (lora.yaml)`, or `--max-steps 20` (also when nothing was said: the default)."""
    from config import setting_name

    t = config.training
    if t.epochs:
        key, flag, value = ("training", "epochs"), "--epochs", f"{t.epochs} ({t.max_steps:,} steps)"
    else:
        key, flag, value = ("training", "max_steps"), "--max-steps", f"{t.max_steps}"
    where, name = setting_name(key, names, ("command line", flag))
    return f"{name} {value}" if where == "command line" else f"{name.strip(chr(39))}: {value} ({where})"




def learned_share_line(learned: int, processed: int, samples: int, total: int, turns: str) -> str | None:
    """What a run with chat or prompt + completion records learns, and how many tokens that is of
    those it processes (`CorpusIndex.learned_tokens`: over its first `samples` of `total`); None
    when every token is learned."""
    if learned >= processed:
        return None  # text records only: learned whole
    which = ("the last assistant turn of each chat (as mlx_lm lora --mask-prompt)" if turns == "last" else
             "every assistant turn of each chat, those that call tools too (--learn-assistant-turns last: only "
             "the final one)")
    first = f"the first {samples:,} samples" if samples < total else f"the {samples:,} samples"
    return (f"data: learned: {which}, and completions; system, user and tool turns and prompts are context: "
            f"{learned:,} of the {processed:,} tokens of {first} ({100 * learned / processed:.0f}%)")


def warmup_too_long_line(t, names: dict | None) -> str:
    """Said when the warmup given is as long as the run: the rate never reaches its peak."""
    from training.optimization import learning_rate_schedule

    last = float(learning_rate_schedule(t.learning_rate, t.warmup(), t.max_steps)(t.max_steps - 1))
    return (f"note: {said_as(names, ('training', 'warmup_steps'), '--warmup-steps')} {t.warmup_steps} is as long as "
            f"the run ({t.max_steps} steps): the learning rate climbs to {last:.3g} at the last step and never "
            f"reaches its peak {t.learning_rate:g}; give fewer warmup steps, or -1 to fit them to the run "
            f"(5% of its steps, at most 50; none under 40 steps)")


def said_as(names: dict | None, key: tuple, flag: str) -> str:
    """A setting as the user gave it: `--lora-keys`, or `lora.yaml: 'lora_parameters.keys'`."""
    from config import setting_name

    where, name = setting_name(key, names, ("command line", flag))
    return name if where == "command line" else f"{where}: {name}"


def scored_from_text_line(count: int, distrust) -> str:
    """Said when records bring neither scores nor metadata: their weights are a guess from their wording."""
    acting = distrust.mode == "weighted" and distrust.lambda_weight > 0
    how = (f"they weight the loss at --lambda-weight {distrust.lambda_weight:g}; to train plainly, without weights: "
           f"--lambda-weight 0") if acting else "they do not weight the loss here (plain cross-entropy)"
    return (f"data: {count:,} of them have no metadata either (source_type, year, publisher, url, citation_count, "
            f"evidence): their scores are guessed from their wording alone; {how}")


def steps_for_epochs(epochs: int, samples: int, batch_size: int, grad_accum: int, processes: int) -> tuple[int, str]:
    """(optimizer steps, the line that says so) for `epochs` passes over `samples`: each epoch
    is ceil(samples / batch) batches (the last one filled up), `grad_accum` of them per step;
    --batch-size is the global batch, whatever the number of processes."""
    per_epoch = -(-samples // batch_size)
    steps = -(-epochs * per_epoch // grad_accum)
    shared = f" (the global batch, over {processes} processes)" if processes > 1 else ""
    return steps, (f"steps: {epochs} epoch{'s' if epochs != 1 else ''} of {samples:,} training samples, "
                   f"{per_epoch:,} batches of {batch_size}{shared} each, {grad_accum} batch"
                   f"{'es' if grad_accum != 1 else ''} per step: {steps:,} steps")


def scored_at_load_line(scored: int, total: int, what: str, path: Path) -> str:
    """The one line that says how many records were scored at load, and how to see why."""
    return (f"data: {scored:,} of {total:,} {what} records have no auth_weight/prov_entropy: scored at load from "
            f"their metadata, else their text, as src/prepare_data.py scores them (to see why: python "
            f"src/prepare_data.py --input {path} --output SOME_DIR --explain)")
