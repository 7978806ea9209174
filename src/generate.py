"""Generate text with the model a run trained: its base as trained, with the
chosen checkpoint's adapters, streamed token by token to the terminal.

    python src/generate.py --output-dir RUN --prompt "..." [--checkpoint latest|best|final|PATH]
                           [--max-tokens N] [--temp T] [--seed S] [--prompt-format auto|chat|text]

The base is loaded as it was trained (base_model.trained_run.run_base_model: its quantized
copy when it was quantized on load) and mlx-lm puts the adapters on and
generates (mlx_lm.stream_generate). The prompt goes through the model's chat
template as a user message when it has one, as `mlx_lm generate` does (an
instruct model asked in plain text often answers nothing), and as plain text
otherwise; which one is said on stderr, with what the run trained on, and
--prompt-format chat|text chooses. An empty answer says why and what to try.
The text goes to stdout, the rest to stderr.

Exit codes: 0 done; 2 bad usage or input (one line).
"""

from __future__ import annotations

from run_safety.early_interrupt import interrupt_quietly_while_starting  # first: Ctrl+C while starting is one line

if __name__ == "__main__":
    interrupt_quietly_while_starting()

from run_safety.cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from run_safety.errors import OneLineArgumentParser, UserError  # noqa: E402
from run_safety.command import exit_quietly, run_command  # noqa: E402
from run_safety.stop_signals import occupy_closed_standard_streams  # noqa: E402

DATA_SAMPLE_LINES = 1000  # the records looked at to tell chat training data from plain text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="generate.py", description="Generate text with the model a run trained (base + its adapters).")
    parser.add_argument("--output-dir", required=True, type=Path, help="the run's folder (its --output-dir)")
    parser.add_argument("--prompt", required=True, help="the text to continue, or the user's message in chat format")
    parser.add_argument("--checkpoint", default="latest", metavar="latest|best|final|PATH",
                        help="which checkpoint's adapters (default: latest)")
    parser.add_argument("--allow-changed-base", action="store_true",
                        help="go on with a base whose files changed since the run trained on it (refused otherwise: "
                             "the adapters were trained on the earlier one)")
    parser.add_argument("--max-tokens", type=int, default=100, help="tokens to generate at most (default: 100)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    parser.add_argument("--prompt-format", choices=("auto", "chat", "text"), default="auto",
                        help="auto: the chat template if the model has one, as mlx_lm generate; text: the prompt "
                             "continued as plain text, as text records were trained (default: auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    occupy_closed_standard_streams()  # a launcher's `>&-`: a place where nothing is shown
    args = build_parser().parse_args(argv)

    def work() -> None:
        generate(args)  # it returns the text, already streamed

    return run_command(work)


def generate(args: argparse.Namespace, out=None) -> str:
    """Stream the generated text to `out` (stdout); returns it."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from base_model.trained_run import load_trained_model, open_run

    out = out or sys.stdout
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.temp < float("inf"):
        raise UserError(f"--temp must be a finite number, 0 or more, got {args.temp}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), as for training, got {args.seed}")
    if not args.prompt.strip():
        raise UserError("--prompt is empty")
    trained = open_run(args.output_dir, args.checkpoint, "generate from", args.allow_changed_base)
    model, tokenizer, _ = load_trained_model(trained)
    use_chat, why = prompt_format(args.prompt_format, tokenizer, trained.config.train_file)
    if use_chat:
        prompt = chat_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = list(tokenizer.encode(args.prompt))  # as a plain-text record was encoded in training
    print(f"model: {trained.base.path} + adapters of {trained.checkpoint} (step {trained.step}); "
          f"prompt: {'chat template' if use_chat else 'plain text'} ({why})", file=sys.stderr, flush=True)

    mx.random.seed(args.seed)
    pieces, last = [], None
    try:
        for last in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=args.max_tokens,
                                    sampler=make_sampler(args.temp)):
            pieces.append(last.text)
            out.write(last.text)
            out.flush()
        out.write("\n")
        out.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) or exc.errno is None:
            raise  # the reader gone (generate | head): command.run_command stops quietly
        from run_safety.machine import write_fault

        # > FILE on a full disk: say that it is the text that could not be written
        name = getattr(out, "name", None)
        shown = "standard output" if name in (None, 1, "<stdout>") else name
        raise write_fault(exc, f"could not write the generated text to {shown} ({exc.strerror})") from None
    if last is not None:
        ended = "the end-of-sequence token" if last.finish_reason == "stop" else f"--max-tokens {args.max_tokens}"
        print(f"{last.generation_tokens} tokens ({last.generation_tps:.1f} tokens/s); ended by {ended}",
              file=sys.stderr)
    text = "".join(pieces)
    if not text.strip():
        print(empty_answer_line(use_chat, tokenizer, last is None or last.finish_reason == "stop"), file=sys.stderr)
    return text


def empty_answer_line(use_chat: bool, tokenizer, ended_at_once: bool) -> str:
    """Why the answer is empty, and what to try."""
    why = ("the model ended its answer at once (the end-of-sequence token came first)" if ended_at_once
           else "the model wrote only spaces or line breaks")
    if not use_chat and getattr(tokenizer, "chat_template", None):
        tries = "--prompt-format chat (an instruct model answers through its chat template, as mlx_lm generate asks it)"
    elif use_chat:
        tries = "--prompt-format text (the prompt continued as plain text, as the run's text records were learned)"
    else:
        tries = "a longer prompt"
    return f"note: the answer is empty: {why}; try {tries}, a sampling --temp 0.7, or another --checkpoint"


def prompt_format(choice: str, tokenizer, train_file: Path) -> tuple[bool, str]:
    """(use the chat template?, why) for --prompt-format: by default the chat template when the
    model has one, as `mlx_lm generate` does (an instruct model asked in plain text often answers
    nothing), the run's training data named beside it when it was plain text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if choice == "chat":
        if not has_template:
            raise UserError("--prompt-format chat: this model's tokenizer has no chat template")
        return True, "--prompt-format chat"
    if choice == "text":
        return False, "--prompt-format text"
    if not has_template:
        return False, "the model has no chat template"
    if training_data_kind(train_file) == "text":
        return True, ("the model has one, as mlx_lm generate uses it; the run trained on plain text records: "
                      "--prompt-format text continues the prompt as they were")
    return True, "the model has one, as mlx_lm generate uses it"


def training_data_kind(train_file: Path) -> str | None:
    """"chat" when most of the first records are `messages` or `prompt` + `completion`
    (both were encoded with the chat template), "text" otherwise; None if unreadable."""
    from run_safety.durable import open_regular_file

    chat = text = 0
    try:
        with open_regular_file(train_file, follow_links=True) as handle:  # a FIFO there would block
            for line in handle:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # not JSON, or not UTF-8
                    continue
                if isinstance(record, dict):
                    if "messages" in record or "completion" in record:
                        chat += 1
                    else:
                        text += 1
                if chat + text >= DATA_SAMPLE_LINES:
                    break
    except OSError:
        return None
    if chat + text == 0:
        return None
    return "chat" if chat > text else "text"


def chat_ids(tokenizer, messages: list) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict):  # newer transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


if __name__ == "__main__":
    exit_quietly(main())
