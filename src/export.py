"""Fuse a run's adapters into its base: the model that was trained, as a standard
mlx-lm model folder (mlx_lm.load, mlx_lm generate, LM Studio's MLX engine), and
with --gguf a GGUF file for llama.cpp, LM Studio and Ollama.

    python src/export.py --output-dir RUN --save-path DIR [--checkpoint latest|best|final|PATH]
                         [--dequantize | --requantize] [--gguf [--gguf-type f16|q8_0|q4_0]] [--force]

The chosen checkpoint is verified against its manifest, its base loaded as it
was trained (base_model.trained_run.run_base_model) and its adapters put on by mlx-lm; then
mlx-lm's own fuse (LoRALinear.fuse, dequantize_model, save) writes DIR with the
base's tokenizer and chat template:

- default: each layer that carries adapters becomes one unquantized layer
  (its quantized base weight dequantized, plus the adapters' product); every
  other layer stays exactly as trained (4-bit; a base of mixed widths, as a
  GGUF's Q8_0 and Q4_0 layers, keeps each layer's own, and the line export
  prints counts them per width). The logits are those of the
  trained model up to float rounding; mlx-lm loads layers without scales as
  unquantized, so this is an ordinary mlx-lm folder.
- --dequantize: every layer unquantized (mlx_lm fuse --dequantize): the same
  model, bigger, readable by tools that take only float weights.
- --requantize: the fused layers quantized again (mlx_lm fuse's default): the
  smallest, but quantizing the sum anew moves every weight of those layers by
  up to half a quantization step, so it is no longer exactly the trained model.

--gguf also writes DIR/<DIR name>-<type>.gguf (gguf_out.py: llama incl.
SmolLM and Llama 3, mistral, mixtral, qwen2, qwen3, gemma2, gemma3, phi3) from
the fused model unquantized, as --gguf-type says: f16 (default), q8_0 or
q4_0; with the tokenizer, special tokens, BOS flag and chat template in its
metadata. Other architectures and vocabularies are refused in one line before
anything is written.

DIR is written under a temporary name beside it, flushed and renamed: it is
whole or not there. An existing DIR is replaced only with --force.

Exit codes: 0 written; 2 bad usage or input (one line, nothing written).
"""

from __future__ import annotations

from run_safety.early_interrupt import interrupt_quietly_while_starting  # first: Ctrl+C while starting is one line

if __name__ == "__main__":
    interrupt_quietly_while_starting()

from run_safety.cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from run_safety.errors import OneLineArgumentParser, UserError  # noqa: E402
from run_safety.command import exit_quietly, run_command  # noqa: E402
from run_safety.sizes import size_text  # noqa: E402
from run_safety.stop_signals import occupy_closed_standard_streams  # noqa: E402
from base_model.gguf_out import GGUF_TYPES  # noqa: E402

EXPORT_RECORD_FILE = "distrust_qlora_export.json"
TEMP_MARK = ".tmp-export-"  # DIR is written as .<DIR name>.tmp-export-<pid> beside it
ASIDE_MARK = ".replaced-"  # with --force, the old DIR waits as .<DIR name>.replaced-<pid> until the new one is in
NAME_MAX = 255


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="export.py",
        description="Fuse a run's adapters into its base: an mlx-lm model folder, and optionally a GGUF file.")
    parser.add_argument("--output-dir", required=True, type=Path, help="the run's folder (its --output-dir)")
    parser.add_argument("--save-path", required=True, type=Path,
                        help="the folder to write (must not exist, or --force)")
    parser.add_argument("--checkpoint", default="latest", metavar="latest|best|final|PATH",
                        help="which checkpoint's adapters (default: latest)")
    parser.add_argument("--allow-changed-base", action="store_true",
                        help="go on with a base whose files changed since the run trained on it (refused otherwise: "
                             "the adapters were trained on the earlier one)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--dequantize", action="store_true",
                     help="every layer unquantized (default: only the layers with adapters)")
    how.add_argument("--requantize", action="store_true",
                     help="quantize the fused layers again: smallest, but no longer exactly the trained model")
    parser.add_argument("--gguf", action="store_true",
                        help="also write a GGUF file in the folder (llama, mistral, mixtral, qwen2, qwen3, gemma2, "
                             "gemma3, phi3)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                        help="the GGUF's weights: f16 (default), q8_0 or q4_0 (smallest); implies --gguf")
    parser.add_argument("--force", action="store_true", help="replace an existing --save-path")
    return parser


def main(argv: list[str] | None = None) -> int:
    occupy_closed_standard_streams()  # a launcher's `>&-`: a place where nothing is shown
    args = build_parser().parse_args(argv)
    if args.gguf_type is not None:
        args.gguf = True
    args.gguf_type = args.gguf_type or "f16"
    return run_command(lambda: print(export_run(args), flush=True))


def export_run(args: argparse.Namespace) -> str:
    from run_safety.durable import commit_directory
    from base_model.builds import local_model_dir, read_model_config
    from base_model.trained_run import open_run

    started = time.perf_counter()
    trained = open_run(args.output_dir, args.checkpoint, "export", args.allow_changed_base)
    save_path = args.save_path.expanduser()
    base_dir = local_model_dir(trained.base.path)
    if save_path.parent.is_dir():
        remove_leftovers(save_path)  # before the checks: it may put back a folder a killed --force moved aside
    check_save_path(save_path, args.force, trained.run, base_dir, folders_read(trained))
    base_config = read_model_config(base_dir)
    gguf_plan = plan_gguf_export(base_dir, base_config, args.gguf_type) if args.gguf else None

    parent_made = make_parent(save_path.parent)
    temp = save_path.with_name(f".{save_path.name}{TEMP_MARK}{os.getpid()}")
    try:
        temp.mkdir()
        details = write_export(trained, base_dir, temp, args, gguf_plan, save_path.name)
        # Flushed and renamed into place; an existing one (with --force) is renamed
        # aside first and removed only once the new one is there.
        commit_directory(temp, save_path, aside=save_path.with_name(f".{save_path.name}{ASIDE_MARK}{os.getpid()}"))
    except BaseException as exc:
        failed = written_fault(exc, save_path)  # before the clean-up: the free space it names is the failure's
        shutil.rmtree(temp, ignore_errors=True)
        for made in reversed(parent_made):
            with contextlib.suppress(OSError):
                made.rmdir()
        if failed is not None:
            raise failed from None
        raise
    seconds = time.perf_counter() - started
    lines = [f"fused model: {save_path} ({details['layout']}; {size_text(details['model_bytes'])})"]
    if details.get("gguf"):
        lines.append(f"GGUF: {save_path / details['gguf']} ({args.gguf_type}; {size_text(details['gguf_bytes'])})")
    lines.append(f"from {trained.checkpoint} (step {trained.step}) on {trained.base.path}; {seconds:.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# checks made before anything is written


def folders_read(trained) -> list[tuple[Path, str]]:
    """What the run reads besides its own folder and the base as trained, each with what it is:
    the base as it was given (a local folder; its quantized copy is the base as trained), the
    data folder, the adapters it started from. Replacing one changes what a resume trains on."""
    paths = trained.config.paths
    read = [(Path(trained.base.source), "the base as given to --model"), (Path(paths.data_dir), "the data folder")]
    if paths.init_adapters:
        read.append((Path(paths.init_adapters), "the adapters it started from"))
    return [(path.expanduser(), what) for path, what in read if path.expanduser().exists()]


def check_save_path(save_path: Path, force: bool, run: Path, base_dir: Path, also_read=()) -> None:
    if save_path.is_symlink() or (save_path.exists() and not save_path.is_dir()):
        raise UserError(f"--save-path {save_path} exists and is not a folder; give another --save-path")
    target = save_path.resolve()
    # Before --force is asked for: no flag makes replacing these right.
    for path, what in ((run, "the run's folder"), (base_dir, "the base the run trained on"), *also_read):
        path = path.resolve()
        if target == path or target in path.parents:
            replaced = what if target == path else f"a folder holding {what}"
            raise UserError(f"--save-path {save_path} would replace {replaced} ({path}): the run reads it, and a "
                            f"resume would train on the fused model; give another --save-path")
    if save_path.exists() and not force:
        raise UserError(f"--save-path {save_path} exists; give --force to replace it, or another --save-path")
    longest = len(os.fsencode(f".{save_path.name}{ASIDE_MARK}{4194304}"))  # the names written beside it
    if longest > NAME_MAX:
        raise UserError(f"--save-path {save_path}: the name is {len(os.fsencode(save_path.name))} bytes; the export "
                        f"writes beside it under names {longest - len(os.fsencode(save_path.name))} bytes longer, "
                        f"over the limit of {NAME_MAX}: give a shorter name")
    checkpoints = run.resolve() / "checkpoints"
    if target == checkpoints or checkpoints in target.parents:
        raise UserError(f"--save-path {save_path} is inside the run's checkpoints; give another --save-path")


# ---------------------------------------------------------------------------
# writing


def plan_gguf_export(base_dir: Path, base_config: dict, gguf_type: str):
    """What --gguf will write, or UserError (architecture, vocabulary) before anything is written."""
    from base_model.gguf_out import plan_gguf
    from mlx_lm.utils import load_tokenizer

    return plan_gguf(base_config, base_dir, load_tokenizer(base_dir), gguf_type)


def write_export(trained, base_dir: Path, temp: Path, args: argparse.Namespace, gguf_plan, name: str) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save

    from run_safety.json_files import json_text
    from base_model.weights import layer_bits
    from base_model.trained_run import load_trained_model

    model, tokenizer, model_config = load_trained_model(trained)
    # mlx_lm.fuse's loop; the LoRA layers are kept, to fuse again for the GGUF.
    lora_layers = [(path, module) for path, module in model.named_modules() if hasattr(module, "fuse")]
    exact = not args.requantize
    model.update_modules(tree_unflatten([(path, module.fuse(dequantize=exact)) for path, module in lora_layers]))
    if exact:
        # A base of mixed widths (a GGUF's Q8_0 and Q4_0 tensors) names its layers of the less common
        # width in config.json's quantization section; mlx_lm.load quantizes a layer named there
        # whatever the weights hold, so a fused layer, now unquantized, must not be named.
        for key in ("quantization", "quantization_config"):
            if isinstance(model_config.get(key), dict):
                model_config[key] = {name: value for name, value in model_config[key].items()
                                     if name not in {path for path, _ in lora_layers}}
    if args.dequantize:
        model = dequantize_model(model)
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints progress with the temporary name
        save(temp, str(base_dir), model, tokenizer, dict(model_config), donate_model=False)
    layout = describe_layout(args, layer_bits(model), {path for path, _ in lora_layers})
    details = {"layout": layout, "model_bytes": folder_bytes(temp)}

    if gguf_plan is not None:
        from base_model.gguf_out import write_gguf

        if args.requantize:
            # The GGUF holds the trained model itself: the adapters fused into
            # the dequantized weights, never a quantization of their sum.
            model.update_modules(tree_unflatten([(path, module.fuse(dequantize=True)) for path, module in lora_layers]))
        model = dequantize_model(model)
        gguf_name = f"{name}-{args.gguf_type}.gguf"
        written = write_gguf(gguf_plan, model, temp / gguf_name, name)  # name: what LM Studio and Ollama show
        details["gguf"], details["gguf_bytes"] = gguf_name, written["bytes"]
    del model
    mx.clear_cache()

    record = {
        "run": str(trained.run.resolve()), "checkpoint": str(trained.checkpoint.resolve()), "step": trained.step,
        "base_model": {"path": trained.base.path, "source": trained.base.source,
                       "quantized_on_load": trained.base.quantization},
        "fused": "dequantize" if args.dequantize else "requantize" if args.requantize else "exact",
        "layout": layout, "gguf": details.get("gguf"), "gguf_type": args.gguf_type if args.gguf else None,
    }
    (temp / EXPORT_RECORD_FILE).write_text(json_text(record, indent=2) + "\n", encoding="utf-8")
    return details


def describe_layout(args, bits: dict, fused: set) -> str:
    """The fused model's layers in words: `bits` {path: bits or None} of its layers
    (base_model.weights.layer_bits), `fused` the paths of those that carried adapters. A base may mix
    widths (a GGUF's Q8_0 and Q4_0 tensors): each is counted, as the folder holds it."""
    from base_model.weights import bits_text

    if args.dequantize or not any(bits.values()):
        return "every layer unquantized"
    if args.requantize:
        widths = [bits[path] for path in fused]
        again = f"to {bits_text(widths)}" if len(set(widths)) <= 1 else f"to their own bits ({bits_text(widths)})"
        return f"{len(fused)} fused layers quantized again {again}: not exactly the trained model"
    widths = [width for path, width in bits.items() if path not in fused]
    return (f"{len(fused)} fused layers unquantized, the others {bits_text(widths)} as trained"
            if len(set(widths)) <= 1 else
            f"{len(fused)} fused layers unquantized, the others as trained: {bits_text(widths)}")


def written_fault(exc: BaseException, save_path: Path) -> Exception | None:
    """One line for a fused model that could not be written (a full disk: exit 1; a place that
    cannot be written: exit 2); None for anything else."""
    from run_safety.durable import free_space
    from run_safety.machine import MachineFault, unsaid_write_fault, write_fault
    from base_model.builds import first_line

    if isinstance(exc, BrokenPipeError):
        return None
    if (reason := unsaid_write_fault(exc)) is not None:  # the tokenizer's save, the GGUF's tensor data
        return MachineFault(f"could not write the fused model to {save_path} ({reason}; "
                            f"{free_space(save_path.parent)}); nothing was left there")
    if isinstance(exc, OSError) and exc.errno is not None:
        return write_fault(exc, f"could not write the fused model to {save_path} ({exc.strerror}; "
                                f"{free_space(save_path.parent)}); nothing was left there")
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        return MachineFault(f"could not write the fused model to {save_path} ({first_line(exc)}; "
                            f"{free_space(save_path.parent)}); nothing was left there")
    return None


def make_parent(parent: Path) -> list[Path]:
    """Create the folder --save-path goes in; returns what was made, to remove it on failure."""
    made = []
    for path in [parent, *parent.parents]:
        if path.exists():
            break
        made.append(path)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--save-path: cannot create {parent} ({exc.strerror})") from None
    return list(reversed(made))


def remove_leftovers(save_path: Path) -> None:
    """The temporary folders of exports to the same place that were killed."""
    from run_safety.durable import process_is_alive, remove_leftover

    marks = f"(?:{re.escape(TEMP_MARK)}|{re.escape(ASIDE_MARK)})"
    pattern = re.compile(re.escape(f".{save_path.name}") + marks + r"(\d+)$")
    names = {entry.name for entry in os.scandir(save_path.parent)}
    for name in sorted(names):
        match = pattern.match(name)
        if not match or process_is_alive(int(match[1])):
            continue
        path = save_path.with_name(name)
        # Killed between the two renames of a --force: the new folder is still under its
        # temporary name, so the old one is put back. Without it the replacement arrived
        # (and the old one's removal failed): the old one is a leftover.
        if ASIDE_MARK in name and not save_path.exists() and f".{save_path.name}{TEMP_MARK}{match[1]}" in names:
            os.rename(path, save_path)
        else:
            remove_leftover(path, "leftover of an export that was interrupted")


def folder_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())


if __name__ == "__main__":
    exit_quietly(main())
