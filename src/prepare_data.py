"""Data preparation command line: raw records -> scored train.jsonl / val.jsonl.

    python src/prepare_data.py --input RAW --output DIR [--val-fraction 0.1] [--seed 0]
                               [--explain] [--force] [--rescore] [--strict]

Exit 0 on success; 2 with one line on stderr for bad usage or data; 1 with one
line for a fault of the machine (a full disk: nothing is left in the output
folder); 130 after Ctrl+C, one line, the output folder as it was. The work
lives in corpus/prepare.py and corpus/scoring.py.
"""

from __future__ import annotations

from run_safety.early_interrupt import interrupt_quietly_while_starting  # first: Ctrl+C while starting is one line

if __name__ == "__main__":
    interrupt_quietly_while_starting()

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from corpus.prepare import format_report, prepare  # noqa: E402
from run_safety.early_interrupt import started_up  # noqa: E402
from run_safety.errors import OneLineArgumentParser, UserError, error_line  # noqa: E402
from run_safety.command import exit_quietly, reader_gone  # noqa: E402
from run_safety.machine import fault_line  # noqa: E402
from run_safety.stop_signals import occupy_closed_standard_streams  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="prepare_data.py",
        description="Score, deduplicate and split raw records into train.jsonl and val.jsonl.")
    parser.add_argument("--input", required=True, type=Path,
                        help="a JSONL file, a .txt document, or a folder of them (read recursively)")
    parser.add_argument("--output", required=True, type=Path, help="folder for train.jsonl and val.jsonl")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of records for validation, stratified by source type (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--explain", action="store_true", help="print what made each record's scores")
    parser.add_argument("--force", action="store_true", help="overwrite existing train.jsonl / val.jsonl")
    parser.add_argument("--rescore", action="store_true", help="recompute scores that the input already has")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    return parser


def main(argv: list[str] | None = None) -> int:
    occupy_closed_standard_streams()  # a launcher's `>&-`: a place where nothing is shown
    args = build_parser().parse_args(argv)
    started_up()  # from here a Ctrl+C is a KeyboardInterrupt, said in one line below
    try:
        result = prepare(args.input, args.output, val_fraction=args.val_fraction, seed=args.seed,
                         rescore=args.rescore, strict=args.strict, force=args.force,
                         explain=print if args.explain else None)
    except UserError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # prepare() has removed what it had written
        print("\ninterrupted; nothing was written, the output folder is as it was", file=sys.stderr)
        return 130
    except BrokenPipeError:  # --explain | head
        return reader_gone()
    except Exception as exc:
        line = fault_line(exc)  # a full disk, an I/O error: one line
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.skipped_total > len(result.warnings):
        print(f"warning: ... and {result.skipped_total - len(result.warnings)} more skipped records", file=sys.stderr)
    print(format_report(result))
    return 0


if __name__ == "__main__":
    exit_quietly(main())
