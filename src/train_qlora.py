"""Train LoRA adapters on a quantized base model with the Empirical Distrust objective.

    python src/train_qlora.py --model tiny
    python src/train_qlora.py --model mlx-community/Qwen2.5-7B-Instruct-4bit --auto-resume

Exit codes: 0 finished or stopped early; 2 bad usage, config or data;
130 after SIGINT, 143 after SIGTERM (each once a checkpoint is committed);
1 anything unexpected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import OneLineArgumentParser, UserError, run_command

FLAGS = [
    # flag, config name, type, help
    ("--model", "model", str, "HF id, local mlx-lm model dir, or 'tiny' (the built-in demo model)"),
    ("--data-dir", "data_dir", str, "holds train.jsonl and optionally val.jsonl (default: data)"),
    ("--output-dir", "output_dir", str, "everything a run writes (default: models/distrust-<model name>)"),
    ("--max-steps", "max_steps", int, "optimizer steps (default: 2000)"),
    ("--batch-size", "batch_size", int, "micro-batch size (default: 8)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default: 1)"),
    ("--learning-rate", "learning_rate", float, "peak learning rate (default: 1e-4)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps before cosine decay (default: 50)"),
    ("--max-seq-length", "max_seq_length", int, "longer samples are truncated (default: 1024)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (default: 1.0)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default: 0.0)"),
    ("--lora-rank", "lora_rank", int, "LoRA rank (default: 16)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha; scale = alpha / rank (default: 32)"),
    ("--lora-layers", "lora_layers", int, "last N blocks get LoRA; -1 = all (default: 16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default: 0.0)"),
    ("--quantize-bits", "quantize_bits", int, "quantize a non-quantized base on load; 0 keeps it (default: 4)"),
    ("--alpha", "alpha", float, "Empirical Distrust alpha (default: 2.7)"),
    ("--lambda-weight", "lambda_weight", float, "Empirical Distrust lambda (default: 1.0)"),
    ("--distrust-mode", "distrust_mode", str, "weighted (the score weights each sample) or reference (as published)"),
    ("--checkpoint-interval", "checkpoint_interval", int, "steps between checkpoints (default: 250)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "rolling checkpoints kept, besides best and final (default: 3)"),
    ("--eval-steps", "eval_steps", int, "steps between validations (default: 250)"),
    ("--val-batches", "val_batches", int, "validation batches, the same each time (default: 50)"),
    ("--early-stopping-patience", "early_stopping_patience", int, "plateau checks without improvement (default: 5)"),
    ("--early-stopping-min-delta", "early_stopping_min_delta", float, "improvement that counts (default: 0.01)"),
    ("--grad-spike-threshold", "grad_spike_threshold", float, "gradient norm that counts as a spike (default: 1000)"),
    ("--grad-spike-patience", "grad_spike_patience", int, "consecutive spikes that abort the run (default: 3)"),
    ("--seed", "seed", int, "every random choice follows from it (default: 0)"),
]
SWITCHES = [
    ("--no-early-stopping", "early_stopping", False, "never stop on a plateau (non-finite steps still stop)"),
    ("--no-tensorboard", "tensorboard", False, "write no TensorBoard logs"),
    ("--no-streaming", "streaming", False, "load the corpus into memory instead of reading by offset"),
    ("--trust-remote-code", "trust_remote_code", True, "let a model's own code run (never by default)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="train_qlora.py",
        description="QLoRA fine-tuning with the Empirical Distrust objective, made for long unattended runs.",
    )
    parser.add_argument("--config", metavar="RUN.YAML", help="YAML file of settings; flags override it")
    for flag, name, kind, help_text in FLAGS:
        parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    for flag, name, value, help_text in SWITCHES:
        parser.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=help_text)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--auto-resume", action="store_true", help="resume from the newest valid checkpoint without asking")
    resume.add_argument("--resume", metavar="latest|best|PATH", help="resume from that checkpoint")
    resume.add_argument("--fresh", action="store_true", help="start anew; existing checkpoints are moved aside, never deleted")
    resume.add_argument("--list-checkpoints", action="store_true", help="print the checkpoints of --output-dir and exit")
    return parser


def config_from_args(args: argparse.Namespace):
    from config import FLAT_NAMES, Config

    values = Config.from_yaml(args.config) if args.config else {}
    names = [name for _, name, _, _ in FLAGS] + [name for _, name, _, _ in SWITCHES]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    # A flag overrides that one setting of the file, wherever the file put it.
    for name, value in given.items():
        section, field_name = FLAT_NAMES[name]
        if isinstance(values.get(section), dict):
            values[section][field_name] = value
            if name != section:
                values.pop(name, None)
        else:
            values[name] = value
    source = f"{args.config} + command line" if args.config else "command line"
    return Config.from_dict(values, source=source)


def main(argv: list[str] | None = None) -> int:
    from stop_signals import guard_standard_streams

    guard_standard_streams()  # a terminal closing mid-run must not kill it with EIO
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on bad usage

    def work() -> int:
        try:
            return run(args)
        except KeyboardInterrupt:
            print("\ninterrupted outside the training loop; committed checkpoints are intact", file=sys.stderr)
            return 130

    return run_command(work)


def run(args: argparse.Namespace) -> int:
    from checkpoints import CheckpointManager
    from checkpoints.resume import RunLock, choose_start, describe_checkpoints

    if args.list_checkpoints and args.output_dir and not args.model:
        # Listing needs only where to look: no model, no other setting.
        print(describe_checkpoints(CheckpointManager(Path(args.output_dir) / "checkpoints")))
        return 0
    config = config_from_args(args)
    output_dir = config.output_dir
    manager = CheckpointManager(output_dir / "checkpoints", keep=config.training.keep_checkpoints)
    if args.list_checkpoints:
        print(describe_checkpoints(manager))
        return 0

    with RunLock(output_dir):
        inputs = run_inputs(config)
        start = choose_start(manager, config, args, inputs)  # may ask at a terminal, or exit 2 without one
        return train(config, output_dir, manager, start, inputs)


def run_inputs(config) -> dict:
    """What the run reads, by identity: the training file's content and the
    resolved model. A resume from other inputs would not continue the same run."""
    from corpus.index import content_signature
    from modeling import resolve_model

    train_path = config.train_file
    if not train_path.is_file():
        raise UserError(f"{train_path}: training file not found (--data-dir {config.paths.data_dir} must hold train.jsonl)")
    try:
        signature = content_signature(train_path)
    except OSError as exc:
        raise UserError(f"{train_path}: cannot read ({exc.strerror})") from None
    return {"train_data": signature, "model": resolve_model(config.model.model)}


def train(config, output_dir: Path, manager, start, inputs: dict) -> int:
    from corpus.index import CorpusIndex
    from modeling import adapter_config, attach_lora, load_model, parameter_counts, tokenizer_key
    from checkpoints.resume import restore_with_fallback
    from trainer import CheckpointingFailed, DistrustTrainer

    t = config.training
    train_path = config.train_file
    # inputs["model"] is the model already resolved (for `tiny`: already built).
    loaded = load_model(inputs["model"], config.model.quantize_bits, config.model.trust_remote_code)
    num_layers, note = attach_lora(loaded.model, config.lora.rank, config.lora.alpha, config.lora.layers,
                                   config.lora.dropout, t.seed)
    if note:
        print(f"note: {note}", file=sys.stderr)
    trainable, total = parameter_counts(loaded.model)
    quant = f"{loaded.quantized_bits}-bit" if loaded.quantized_bits else "not quantized"
    if loaded.base is not None and loaded.base.quantization:
        quant += f"; its quantized copy {loaded.base.path}"
    print(f"model: {loaded.path} ({quant}); LoRA on {num_layers} blocks; trainable parameters "
          f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)", file=sys.stderr)

    index = CorpusIndex.build(train_path, loaded.tokenizer, t.max_seq_length + 1, in_memory=not config.paths.streaming,
                              cache_dir=output_dir / "cache", tokenizer_key=tokenizer_key(loaded))
    print(f"data: {len(index):,} training samples from {train_path}", file=sys.stderr)
    if index.truncated:
        print(f"note: {index.truncated} of {len(index)} samples are longer than --max-seq-length "
              f"{t.max_seq_length} and were truncated", file=sys.stderr)
    if index.no_target:
        print(f"note: {len(index.no_target)} samples have nothing to learn after truncation and are left out "
              f"(lines {', '.join(map(str, index.no_target[:5]))}{' ...' if len(index.no_target) > 5 else ''})",
              file=sys.stderr)
    val_path = config.val_file
    if not val_path.is_file():
        print(f"note: no {val_path}; training without validation", file=sys.stderr)
        val_path = None

    trainer = DistrustTrainer(
        config, loaded.model, loaded.tokenizer,
        # Names the base as trained (its quantized copy, if quantized on load), so
        # mlx_lm.load(that, adapter_path=output_dir) is the model being trained.
        adapter_config(loaded.path, num_layers, config.lora.rank, config.lora.alpha, config.lora.dropout,
                       base=loaded.base),
        index, val_path, output_dir, manager, inputs=inputs, log=lambda msg: print(msg, file=sys.stderr),
    )
    if start is not None:
        # A checkpoint whose content this run cannot use is skipped like a damaged one.
        start = restore_with_fallback(manager, start, lambda point: trainer.restore(point.state, str(point.path)),
                                      config, inputs)
        print(f"resumed from {start.path} at step {start.state.step}", file=sys.stderr)
    try:
        end = trainer.fit()
    except CheckpointingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return end.exit_code


if __name__ == "__main__":
    sys.exit(main())
