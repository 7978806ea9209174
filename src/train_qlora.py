"""Train LoRA adapters on a quantized base model with the Empirical Distrust objective.

    python src/train_qlora.py --model tiny
    python src/train_qlora.py --model mlx-community/Qwen2.5-7B-Instruct-4bit --auto-resume
    python src/train_qlora.py --config examples/lora_config.yaml     # an mlx_lm lora config works too
    mlx.launch -n 2 --backend ring -- python src/train_qlora.py --model tiny --auto-resume   # 2 processes

Exit codes: see EXIT_CODES (printed by --help).
"""

from __future__ import annotations

from run_safety.early_interrupt import interrupt_quietly_while_starting  # first: Ctrl+C while starting is one line

if __name__ == "__main__":
    interrupt_quietly_while_starting()

from run_safety.cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

import argparse
import contextlib
import json
import sys
from pathlib import Path

from run_safety.errors import OneLineArgumentParser, UserError, error_line
from run_safety.command import exit_quietly, run_command
from command_line.mlx_lm_flags import add_mlx_lm_flags, settings_from_mlx_lm_flags
from monitoring.wandb_log import WANDB_INSTALL

FLAGS = [
    # flag, config name, type, help (the default is added from config.py)
    ("--model", "model", str, "HF id, local mlx-lm model dir, GGUF file (LM Studio's, an Ollama blob), or 'tiny' "
                              "(the built-in demo model); required"),
    ("--data-dir", "data_dir", str, "holds train.jsonl, and val.jsonl or mlx-lm's valid.jsonl for validation"),
    ("--output-dir", "output_dir", str, "everything a run writes (default: models/distrust-<model name>)"),
    ("--max-steps", "max_steps", int, "optimizer steps"),
    ("--epochs", "epochs", int, "passes over the training data, in place of the max steps: the steps follow from "
                                "the corpus and the global batch (batch size x grad accum); 0: max steps decide"),
    ("--batch-size", "batch_size", int, "micro-batch size"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--learning-rate", "learning_rate", float, "peak learning rate"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps, then cosine decay to 0 at the last step; -1: "
                                            "fitted to the run, 5%% of its steps, at most 50 (none under 40 "
                                            "steps, as mlx_lm lora)"),
    ("--max-seq-length", "max_seq_length", int, "longer samples are truncated"),
    ("--learn-assistant-turns", "learn_assistant_turns", str, "the assistant turns of a chat record that are "
                                                              "learned: all, or last (only the final answer, as "
                                                              "mlx_lm lora); system, user and tool turns never are"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm"),
    ("--optimizer", "optimizer", str, "adamw, adam, sgd or adafactor (mlx.optimizers); adafactor takes its "
                                      "step size from the schedule"),
    ("--weight-decay", "weight_decay", float, "weight decay (adamw, sgd, adafactor)"),
    ("--adam-beta1", "adam_beta1", float, "Adam's first-moment decay (adamw, adam)"),
    ("--adam-beta2", "adam_beta2", float, "Adam's second-moment decay (adamw, adam)"),
    ("--adam-eps", "adam_eps", float, "Adam's epsilon (adamw, adam)"),
    ("--sgd-momentum", "sgd_momentum", float, "momentum (sgd)"),
    ("--fine-tune-type", "fine_tune_type", str, "lora, or dora (weight-decomposed LoRA)"),
    ("--lora-rank", "lora_rank", int, "LoRA rank"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha; scale = alpha / rank"),
    ("--lora-layers", "lora_layers", int, "the last N blocks get LoRA; -1 = all"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout"),
    ("--lora-keys", "lora_keys", str, "the linear layers of each block that get LoRA, named as mlx-lm names them "
                                      "(self_attn.q_proj self_attn.v_proj, or with commas); a wrong name lists "
                                      "the model's"),
    ("--init-adapters", "init_adapters", str, "start a new run from these adapters: a run or mlx-lm adapter "
                                              "folder, or an adapters .safetensors file (shapes must match)"),
    ("--quantize-bits", "quantize_bits", int, "quantize a non-quantized base on load; 0 keeps it"),
    ("--float-base", "float_base", str, "auto, on or off: the frozen quantized layers of the base compute with "
                                        "float32 copies of their dequantized weights (auto: on MLX's CPU backend "
                                        "where the copy fits; much faster there; the adapters stay adapters of "
                                        "the quantized base)"),
    ("--alpha", "alpha", float, "Empirical Distrust alpha"),
    ("--lambda-weight", "lambda_weight", float, "Empirical Distrust lambda; 0 = plain cross-entropy"),
    ("--distrust-mode", "distrust_mode", str, "weighted (the score weights each sample) or reference (as published)"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints"),
    ("--keep-checkpoints", "keep_checkpoints", int, "rolling checkpoints kept, besides best and final"),
    ("--eval-steps", "eval_steps", int, "steps between validations (and plateau checks)"),
    ("--val-batches", "val_batches", int, "validation batches, the same each time"),
    ("--probes", "probes", str, "when the data folder's probes.jsonl is scored: 'every N' validations (and at "
                                "the last), or 'off'"),
    ("--early-stopping-patience", "early_stopping_patience", int, "plateau checks without improvement that stop "
                                                                  "the run"),
    ("--early-stopping-min-delta", "early_stopping_min_delta", float, "improvement of the smoothed objective that "
                                                                      "counts"),
    ("--early-stopping-window", "early_stopping_window", int, "steps the plateau check averages the training "
                                                              "objective over"),
    ("--grad-spike-threshold", "grad_spike_threshold", float, "gradient norm that counts as a spike"),
    ("--grad-spike-patience", "grad_spike_patience", int, "consecutive spikes that stop the run"),
    ("--seed", "seed", int, "every random choice follows from it"),
    ("--loss-chunk-size", "loss_chunk_size", int, "the output layer and the loss over chunks of this many tokens, "
                                                  "so the batch's logits never exist at once: -1 automatic (about "
                                                  "4M logits a chunk), 0 off; the same result within float rounding"),
    ("--report-to", "report_to", str, f"wandb: the metrics of metrics.jsonl to Weights & Biases too ({WANDB_INSTALL}; "
                                      f"files in OUTPUT/wandb; WANDB_MODE=offline needs no network)"),
    ("--project-name", "project_name", str, "the W&B project (mlx-lm's project_name)"),
]
SWITCHES = [
    # flag, config name, the value it sets, help (with the default)
    ("--grad-checkpoint", "grad_checkpoint", True, "recompute each block's activations in the backward pass: much "
                                                   "less memory for long sequences, some more time (default: off)"),
    ("--sgd-nesterov", "sgd_nesterov", True, "Nesterov momentum (sgd; default: off)"),
    ("--no-early-stopping", "early_stopping", False, "never stop on a plateau; non-finite steps and gradient spikes "
                                                     "still stop (default: plateaus stop the run)"),
    ("--no-tensorboard", "tensorboard", False, "write no TensorBoard logs (default: they go to OUTPUT/logs)"),
    ("--no-streaming", "streaming", False, "load the corpus into memory (default: read by byte offset as needed)"),
    ("--no-memory-check", "memory_check", False, "skip the pre-flight (default: before step 1, one forward and "
                                                 "backward pass on the longest batch measures its peak memory, and a "
                                                 "batch that cannot fit is refused with settings measured to fit)"),
    ("--trust-remote-code", "trust_remote_code", True, "let a model's own code run (default: never)"),
]
EXIT_CODES = """exit codes:
  0    finished, or stopped early (the reason is printed and is the last line of metrics.jsonl)
  2    bad usage, config or data: one line naming the file, line and problem; nothing is lost
  1    a fault of the machine (full disk, I/O error, out of memory: one line), checkpoints
       failing to save 3 times in a row, or anything unexpected (a traceback: a bug)
  130  after Ctrl+C, 143 after SIGTERM, 129 after SIGHUP (the terminal closed): each once a
       checkpoint is committed; a second Ctrl+C exits at once, the last checkpoint intact
"""


def _default_text(name: str) -> str:
    from config import FLAT_NAMES, Config

    if name in ("model", "output_dir", "init_adapters"):
        return ""
    section, field_name = FLAT_NAMES[name]
    value = getattr(getattr(Config(), section), field_name)
    if value in ("", []):
        value = {"lora_keys": "every linear layer", "report_to": "none", "project_name": "W&B's"}[name]
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="train_qlora.py",
        description="QLoRA fine-tuning with the Empirical Distrust objective, made for long unattended runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="RUN.YAML",
                        help="YAML file of settings, flags override it: the flag names with underscores (switches "
                             "too: no_tensorboard: true), or an mlx_lm lora config (iters, num_layers, "
                             "lora_parameters, ...); see examples/")
    for flag, name, kind, help_text in FLAGS:
        # Values are checked by config.py, for the flags and the YAML file alike.
        parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text + _default_text(name),
                            **({"nargs": "+", "metavar": "KEY"} if name == "lora_keys" else
                               {"nargs": "+", "metavar": "WHEN"} if name == "probes" else {}))
    for flag, name, value, help_text in SWITCHES:
        parser.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=help_text)
    add_mlx_lm_flags(parser, {name: kind for _, name, kind, _ in FLAGS})
    # Names users bring from elsewhere, that no closeness finds: said with the flag they mean.
    parser.also_known_as = {"--lr": "--learning-rate", "--rank": "--lora-rank", "--warmup": "--warmup-steps",
                            "--steps": "--max-steps", "--output": "--output-dir"}
    # Every mistyped flag and every mistake of the settings file, in one message.
    parser.more_problems = lambda parsed: settings_file_problems(parsed.config)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--auto-resume", action="store_true",
                        help="resume from the newest valid checkpoint without asking; start anew if there is none")
    resume.add_argument("--resume", metavar="latest|best|PATH", help="resume from that checkpoint")
    resume.add_argument("--fresh", action="store_true",
                        help="start anew; existing checkpoints, metrics.jsonl and logs/ are moved aside, never deleted")
    resume.add_argument("--list-checkpoints", action="store_true", help="print the checkpoints of --output-dir and exit")
    parser.epilog = EXIT_CODES + ("\nWithout --auto-resume, --resume or --fresh, a run that finds checkpoints asks "
                                  "at a terminal\nand exits 2 without one.")
    return parser


def config_from_args(args: argparse.Namespace):
    return settings_from_args(args)[0]


def settings_from_args(args: argparse.Namespace):
    """(Config, SettingsFile): the file's settings with the flags over them, validated."""
    from command_line.settings_file import SettingsFile, read_settings_file
    from config import FLAT_NAMES, Config

    flags = {name: flag for flag, name, _, _ in FLAGS + SWITCHES}
    theirs, notes, refused = settings_from_mlx_lm_flags(args, flags)  # mlx_lm lora's flags, as ours
    if refused:  # with the settings file's mistakes, if any: all in one message
        more = "".join(f"; and {problem}" for problem in settings_file_problems(args.config))
        raise UserError(f"command line: {'; '.join(refused)}{more}")
    settings = read_settings_file(args.config) if args.config else SettingsFile(values={})
    settings.notes += notes
    values = settings.values
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    given.update({name: value for name, (value, _) in theirs.items()})
    flags.update({name: flag for name, (_, flag) in theirs.items()})  # errors name the flag the user typed
    # A flag overrides that one setting of the file, wherever the file put it.
    for name, value in given.items():
        section, field_name = FLAT_NAMES[name]
        if isinstance(values.get(section), dict):
            values[section][field_name] = value
            if name != section:
                values.pop(name, None)
        else:
            values[name] = value
        settings.names[(section, field_name)] = ("command line", flags[name])
    choose_steps_or_epochs(values, given, settings.names)
    source = f"{args.config} + command line" if args.config and given else args.config or "command line"
    config = Config.from_dict(values, source=source, names=settings.names)
    if settings.lora_scale is not None and "lora_alpha" not in given:
        # mlx-lm's scale is alpha / rank here, whichever rank the file and flags ended with.
        if "lora_alpha" in values or "alpha" in (values.get("lora") or {}):
            raise UserError(f"{args.config}: give lora_parameters.scale or lora_alpha, not both")
        config.lora.alpha = settings.lora_scale * config.lora.rank
        config.validate(source, settings.names)
    return config, settings


def settings_file_problems(path: str | None) -> list[str]:
    """The mistakes of the settings file, for the message that names a mistyped flag too."""
    from command_line.settings_file import read_settings_file

    if not path:
        return []
    try:
        read_settings_file(path)
    except UserError as exc:
        return [str(exc)]
    return []


def choose_steps_or_epochs(values: dict, given: dict, names: dict) -> None:
    """--epochs and --max-steps both say how long to train: a flag overrides the file's
    other one (--epochs over the file's iters, say); both in the same place is an error."""
    from config import FLAT_NAMES

    def setting(name: str):
        section, field_name = FLAT_NAMES[name]
        inner = values.get(section) if isinstance(values.get(section), dict) else {}
        return values.get(name, inner.get(field_name))

    if setting("max_steps") is None or setting("epochs") in (None, 0):  # epochs 0: --max-steps decides
        return
    (steps_at, steps), (epochs_at, epochs) = (names.get(FLAT_NAMES[name], ("", f"'{name}'"))
                                              for name in ("max_steps", "epochs"))
    if steps_at == epochs_at:
        raise UserError(f"{steps_at}: {steps} and {epochs} both say how long to train: give one of them")
    dropped = "max_steps" if "epochs" in given else "epochs"
    section, field_name = FLAT_NAMES[dropped]
    values.pop(dropped, None)
    if isinstance(values.get(section), dict):
        values[section].pop(field_name, None)


def apply_start_choices(args: argparse.Namespace, start: dict, source: str) -> None:
    """auto_resume / resume / fresh from the file, unless the command line chose."""
    if args.auto_resume or args.resume or args.fresh or not start:
        return
    chosen = {key: value for key, value in start.items() if value not in (None, False)}
    if len(chosen) > 1:
        raise UserError(f"{source}: {', '.join(sorted(chosen))}: choose one of them")
    for key, value in chosen.items():
        if key == "resume":
            if not isinstance(value, str):
                raise UserError(f"{source}: 'resume' must be latest, best or a path, got {value!r}")
            args.resume = value
        elif value is not True:
            raise UserError(f"{source}: '{key}' must be true or false, got {value!r}")
        else:
            setattr(args, key, True)


def main(argv: list[str] | None = None) -> int:
    from run_safety.stop_signals import guard_standard_streams

    guard_standard_streams()  # a terminal closing mid-run must not kill it with EIO
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on bad usage

    def work() -> int:
        import os

        from training.process_group import PeerLost, ProcessGroup, ReportedByRankZero

        group = ProcessGroup.from_environment()
        stderr = sys.stderr
        if not group.is_writer:
            # Rank 0 speaks for the run; the others print only their own errors.
            sys.stdout = sys.stderr = open(os.devnull, "w")
        try:
            return run(args, group)
        except KeyboardInterrupt:
            print("\ninterrupted outside the training loop; committed checkpoints are intact", file=sys.stderr)
            return 130
        except ReportedByRankZero:
            return 2  # rank 0 has printed it
        except UserError as exc:
            if group.is_writer:
                raise
            print(error_line(exc, prefix=f"rank {group.rank}: "), file=stderr)
            return 2
        except PeerLost as exc:
            if not exc.reported:
                print(error_line(exc, prefix="" if group.is_writer else f"rank {group.rank}: "), file=stderr)
            return 1

    return run_command(work)


def run(args: argparse.Namespace, group=None) -> int:
    from checkpoints import CheckpointManager
    from checkpoints.resume import RunLock, choose_start, describe_checkpoints
    from checkpoints.run_dir import check_path_lengths
    from corpus.precheck import check_data_files
    from training.process_group import ProcessGroup

    group = group or ProcessGroup()
    if args.list_checkpoints and args.output_dir and not args.model:
        # Listing needs only where to look: no model, no other setting.
        print_listing(describe_checkpoints(CheckpointManager(Path(args.output_dir) / "checkpoints")))
        return 0
    config, settings = settings_from_args(args)
    apply_start_choices(args, settings.start, args.config)
    if config.paths.report_to:
        from monitoring.wandb_log import check_wandb_installed

        check_wandb_installed()
    for note in settings.notes:
        print(f"note: {note}", file=sys.stderr)
    output_dir = config.output_dir
    manager = CheckpointManager(output_dir / "checkpoints", keep=config.training.keep_checkpoints)
    if args.list_checkpoints:
        print_listing(describe_checkpoints(manager))
        return 0

    group.on_writer(lambda: check_batch_divides(config.training.batch_size, group.size))
    # Before the lock, the model (minutes) and any move aside: what would stop the run anyway.
    check_path_lengths(output_dir)
    probes = check_data_files(config)  # (probes.jsonl of the data folder, its probes as read)
    if config.training.memory_check:
        from training.memory_check import memory_limit

        memory_limit()  # a DISTRUST_QLORA_MEMORY_LIMIT that is no size: one line now, not once the model has loaded
    # Rank 0 alone writes to the output dir (the lock, checkpoints, logs); the others only read their data.
    with RunLock(output_dir) if group.is_writer else contextlib.nullcontext():
        inputs = run_inputs(config)
        manager.run_inputs = inputs  # stamped on each checkpoint, compared on resume
        if group.distributed:
            # Validation and every step are collectives: the processes must read the same things.
            from corpus.index import content_signature

            val = config.val_file
            group.check_same("the training and validation data, model and settings", json.dumps(
                [inputs, config.fingerprint(), content_signature(val) if val.is_file() else None]))
        # May ask at a terminal, or exit 2 without one; several processes: rank 0 chooses for all.
        # What the choice moves aside (--fresh: the earlier run) is moved once the model has
        # loaded and the data is checked: `later`, run by train().
        later: list = []
        start = group.on_writer(lambda: choose_start(manager, config, args, inputs, later=later))
        return train(config, output_dir, manager, start, inputs, group, settings.names, later, probes)


def print_listing(text: str) -> None:
    """The listing is what --list-checkpoints is for: printed past the run's tolerant stdout (made
    for a terminal that goes away mid-run), so that a listing that cannot be written (> FILE on a
    full disk) is one line and exit 1, not lost with exit 0."""
    print(text, file=getattr(sys.stdout, "wrapped", sys.stdout), flush=True)


def check_batch_divides(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise UserError(f"--batch-size {batch_size} is the global batch: it must divide among the {processes} "
                        f"processes (try {processes * max(batch_size // processes, 1)} or "
                        f"{processes * (batch_size // processes + 1)})")


def run_inputs(config) -> dict:
    """What the run reads, by identity: the training file's content, the resolved
    model, and the adapters it started from (if any); the SHA-256 of the base's files
    and of the training and validation files (file_identity: read once, then cached).
    A resume from other inputs would not continue the same run."""
    from corpus.index import content_signature
    from run_safety.file_identity import base_identity, data_identity
    from base_model.lora import adapters_signature
    from base_model.builds import local_model_dir
    from base_model.loading import resolve_model

    train_path = config.train_file
    if not train_path.is_file():
        raise UserError(f"{train_path}: training file not found (--data-dir {config.paths.data_dir} must hold train.jsonl)")
    try:
        signature = content_signature(train_path)
    except OSError as exc:
        raise UserError(f"{train_path}: cannot read ({exc.strerror})") from None
    inputs = {"train_data": signature, "model": resolve_model(config.model.model)}
    inputs.update(base=base_identity(local_model_dir(inputs["model"])), train_content=data_identity(train_path),
                  val_content=data_identity(config.val_file if config.val_file.is_file() else None))
    if config.paths.init_adapters:
        inputs["init_adapters"] = adapters_signature(config.paths.init_adapters)
    return inputs


def train(config, output_dir: Path, manager, start, inputs: dict, group, names: dict | None = None,
          later=(), probes=(None, [])) -> int:
    """The run: `names` says how the user wrote each setting they gave (config.setting_name); `later`,
    what the start moves aside, once the model has loaded and the data is checked; `probes`, the data
    folder's probe file and its probes as the pre-check read them (corpus/precheck.py)."""
    from checkpoints.resume import restore_with_fallback
    from corpus.index import CorpusIndex, check_records
    from run_safety.file_identity import check_unchanged
    from base_model.lora import adapter_config, attach_lora, load_init_adapters
    from base_model.weights import bits_text, layer_bits, parameter_counts
    from base_model.loading import load_model, tokenizer_key
    from config import probe_interval
    from monitoring.probes import encode_probes, headline_form, model_context, start_line, taught_form
    from training.trainer import CheckpointingFailed, DistrustTrainer
    from command_line.start_lines import (compute_with, learned_share_line, length_said, said_as,
                                          scored_at_load_line, scored_from_text_line, steps_for_epochs,
                                          warmup_too_long_line)

    t, lo = config.training, config.lora
    train_path = config.train_file
    # inputs["model"] is the model already resolved (for `tiny`: already built).
    loaded = load_model(inputs["model"], config.model.quantize_bits, config.model.trust_remote_code)
    quant = bits_text(layer_bits(loaded.model).values())  # before LoRA: the base's layers, each width counted
    num_layers, note = attach_lora(loaded.model, lo.rank, lo.alpha, lo.layers, lo.dropout, t.seed,
                                   fine_tune_type=lo.fine_tune_type, keys=lo.keys,
                                   keys_named=said_as(names, ("lora", "keys"), "--lora-keys"))
    if note and ("lora", "layers") in (names or {}):  # the default (16) is no request to note
        print(f"note: {said_as(names, ('lora', 'layers'), '--lora-layers')} {note}", file=sys.stderr)
    if config.paths.init_adapters and start is None:  # a resume restores the checkpoint's adapters instead
        source = load_init_adapters(loaded.model, config.paths.init_adapters)
        print(f"adapters: starting from {source}", file=sys.stderr)
    trainable, total = parameter_counts(loaded.model)
    if loaded.base.quantization:
        quant += f"; {'its mlx-lm folder' if Path(loaded.path).is_file() else 'its quantized copy'} {loaded.base.path}"
    kind = "DoRA" if lo.fine_tune_type == "dora" else "LoRA"
    where = f" ({', '.join(lo.keys)})" if lo.keys else ""
    print(f"model: {loaded.path} ({quant}); {kind} on {num_layers} blocks{where}; trainable parameters "
          f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)", file=sys.stderr)
    arithmetic = compute_with(loaded.model, config.model.float_base, bits_text(layer_bits(loaded.model).values()))

    index = CorpusIndex.build(train_path, loaded.tokenizer, t.max_seq_length + 1, in_memory=not config.paths.streaming,
                              cache_dir=output_dir / "cache" if group.is_writer else None,
                              tokenizer_key=tokenizer_key(loaded), turns=t.learn_assistant_turns)
    check_unchanged(train_path, inputs.get("train_content"), "training file")  # edited while the model loaded?
    index.content_sha256 = (inputs.get("train_content") or {}).get("sha256")
    print(f"data: {len(index):,} training samples from {train_path}", file=sys.stderr)
    if index.scored_at_load:
        print(scored_at_load_line(index.scored_at_load, len(index), "training", train_path), file=sys.stderr)
    if index.scored_from_text:
        print(scored_from_text_line(index.scored_from_text, config.distrust), file=sys.stderr)
    if t.epochs:
        t.max_steps, said = steps_for_epochs(t.epochs, len(index), t.batch_size, t.grad_accum, group.size)
        print(said, file=sys.stderr)
    if t.warmup() >= t.max_steps:
        print(warmup_too_long_line(t, names), file=sys.stderr)
    if index.truncated:
        print(f"note: {index.truncated} of {len(index)} samples are longer than --max-seq-length "
              f"{t.max_seq_length} and were truncated", file=sys.stderr)
    if index.no_target:
        answers = "last answer" if t.learn_assistant_turns == "last" else "answers"
        print(f"note: {len(index.no_target)} records are left out: what they teach (a chat's {answers}, a "
              f"completion) lies past --max-seq-length {t.max_seq_length} and truncation cut it off (lines "
              f"{', '.join(map(str, index.no_target[:5]))}{' ...' if len(index.no_target) > 5 else ''})",
              file=sys.stderr)
    learned, processed, counted = index.learned_tokens()  # read once: the line below, and the probes' form
    learned_line = learned_share_line(learned, processed, counted, len(index), t.learn_assistant_turns)
    if learned_line:
        print(learned_line, file=sys.stderr)
    data_summary = {"train_file": str(train_path), "train_samples": len(index),
                    "train_scored_at_load": index.scored_at_load, "train_scored_from_text": index.scored_from_text}
    if t.epochs:
        data_summary.update(epochs=t.epochs, max_steps=t.max_steps)
    val_path = config.val_file
    data_dir = Path(config.paths.data_dir)
    probes_path, probes = probes
    # A measurement, not an input: checked whole now (a bad one stops the run before its first
    # step), and kept out of run_inputs, so a resume with another probe file is the same run.
    # Asked first in the form the training records teach (plain text, or the chat template's).
    probes = encode_probes(probes, probes_path, loaded.tokenizer, model_context(loaded.model),
                           taught_form(learned, processed)) if probes else []
    if probes:
        print(start_line(probes, probes_path, t.probes), file=sys.stderr)
        data_summary.update(probe_file=str(probes_path), probes=len(probes), probe_form=headline_form(probes))
    elif probes_path is not None and probe_interval(t.probes) == 0:
        print(f"data: {probes_path} is not scored (--probes off)", file=sys.stderr)
    if not val_path.is_file():
        scored = "; the probes are still scored every --eval-steps" if probes else ""
        print(f"note: no val.jsonl or valid.jsonl in {data_dir}; training without validation{scored}", file=sys.stderr)
        val_path = None
    else:
        # The whole file is checked now (a bad line stops the run before its first step);
        # its samples are read at the first validation.
        records, scored = check_records(val_path, loaded.tokenizer)
        why = " (mlx-lm's name; there is no val.jsonl)" if val_path.name != "val.jsonl" else ""
        ignored = f"; {data_dir / 'valid.jsonl'} is not used" if why == "" and (data_dir / "valid.jsonl").is_file() \
            else ""
        used = "all used" if records <= t.batch_size * t.val_batches else \
            f"the first {t.batch_size * t.val_batches:,} used (--val-batches {t.val_batches} x --batch-size {t.batch_size})"
        print(f"data: validation on {val_path}{why}: {records:,} records checked, {used}{ignored}", file=sys.stderr)
        if scored:
            print(scored_at_load_line(scored, records, "validation", val_path), file=sys.stderr)
        data_summary.update(val_file=str(val_path), val_records=records, val_scored_at_load=scored)
    if (data_dir / "test.jsonl").is_file():
        print(f"data: {data_dir / 'test.jsonl'} is not used in training; src/evaluate.py takes it by default",
              file=sys.stderr)
    for move_aside in later:  # the model loaded, the data checked: now what the start chose is moved aside
        move_aside()

    trainer = DistrustTrainer(
        config, loaded.model, loaded.tokenizer,
        # Names the base as trained (its quantized copy, if quantized on load), so
        # mlx_lm.load(that, adapter_path=output_dir) is the model being trained.
        adapter_config(loaded.path, num_layers, lo.rank, lo.alpha, lo.dropout, base=loaded.base,
                       fine_tune_type=lo.fine_tune_type, keys=lo.keys),
        index, val_path, output_dir, manager, log=lambda msg: print(msg, file=sys.stderr),
        group=group, probes=probes, arithmetic=arithmetic, length_said=length_said(config, names),
        data_summary=data_summary,
    )

    def restore() -> None:
        # A checkpoint whose content this run cannot use is skipped like a damaged one.
        point = restore_with_fallback(manager, start, lambda p: trainer.restore(p.state, p.path), config, inputs)
        print(f"resumed from {point.path} at step {point.state.step}", file=sys.stderr)

    if start is not None or group.distributed:  # several processes: rank 0 restores, then shares
        group.on_writer(lambda: restore() if start is not None else None)
        trainer.share_resume_point()
    try:
        trainer.check_memory()  # the longest batch's peak memory, before step 1 (exit 2 if it cannot fit)
        end = trainer.fit()
    except CheckpointingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return end.exit_code


if __name__ == "__main__":
    exit_quietly(main())
