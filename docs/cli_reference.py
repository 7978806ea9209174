"""Writes docs/cli.md, the command-line reference, from the commands' own argparse parsers,
so that the page cannot drift from the flags: tests/test_docs.py regenerates it and fails
when the committed page differs.

    python docs/cli_reference.py            # rewrite docs/cli.md
    python docs/cli_reference.py --check    # exit 1 if docs/cli.md is not what the parsers say

The page is built from each parser's actions (flags, metavars, choices, help), not from
the text of --help, whose layout changes with the terminal's width and Python's version.
`parser_of` gives any script's parser (the commands' build_parser(), or a benchmark's
parser caught as its main() is about to parse), for the docs check of tests/test_docs.py.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "cli.md"
REFRESH = "python docs/cli_reference.py"
# The user's commands, in the order a run meets them.
COMMANDS = ["src/train_qlora.py", "src/evaluate.py", "src/generate.py", "src/export.py", "src/prepare_data.py"]


class _Caught(Exception):
    """Raised in place of parsing: carries the parser a script built."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser caught")
        self.parser = parser


@contextmanager
def _script_folders_on_path(script: Path):
    """As `python SCRIPT` runs it: its own folder first on sys.path (bench/ imports `common`), and src/."""
    saved = list(sys.path)
    sys.path[:0] = [str(script.parent), str(REPO / "src")]
    try:
        yield
    finally:
        sys.path[:] = saved


def parser_of(script: str | Path) -> argparse.ArgumentParser:
    """The argparse parser of `script` (a path under the repository), without running it:
    its build_parser() where it has one, else its main() stopped where it would parse."""
    path = REPO / script
    with _script_folders_on_path(path):
        names = runpy.run_path(str(path), run_name="docs_reference")  # not __main__: nothing runs
        if "build_parser" in names:
            return names["build_parser"]()
        real = argparse.ArgumentParser.parse_known_args

        def catch(self, *args, **kwargs):
            raise _Caught(self)

        argparse.ArgumentParser.parse_known_args = catch  # parse_args goes through it too
        try:
            names["main"]()
        except _Caught as caught:
            return caught.parser
        finally:
            argparse.ArgumentParser.parse_known_args = real
    raise RuntimeError(f"{script}: main() returned without parsing its arguments")


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}


def _cell(text: str) -> str:
    """One table cell: white space made single spaces, pipes escaped (GitHub reads them inside code too)."""
    return " ".join(text.split()).replace("|", "\\|")


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    if not action.option_strings:
        return formatter._format_args(action, action.dest)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    value = formatter._format_args(action, action.dest.upper())
    return ", ".join(f"{name} {value}" for name in action.option_strings)


def section(script: str) -> str:
    parser = parser_of(script)
    name = Path(script).name
    lines = [f"## {name}", "", f"`python {script} [options]`: {_cell(parser.description or '')}", ""]
    lines += ["| flag | what it does |", "|---|---|"]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        text = formatter._expand_help(action) if action.help else ""
        if action.required:
            text = f"(required) {text}"
        lines.append(f"| `{_cell(_invocation(parser, action))}` | {_cell(text)} |")
    lines.append("")
    for group in parser._mutually_exclusive_groups:
        names = [action.option_strings[0] for action in group._group_actions]
        lines += [f"At most one of {', '.join(f'`{n}`' for n in names)}.", ""]
    if parser.epilog:
        lines += ["```", parser.epilog.strip("\n"), "```", ""]
    return "\n".join(lines)


def reference() -> str:
    head = [
        "# Command-line reference",
        "",
        f"Generated from the commands' own parsers by `{REFRESH}`; do not edit it by hand",
        "(tests/test_docs.py fails when it differs from what the parsers say). `--help` on each",
        "command prints the same. How the flags are used, by task: [the docs](../README.md#the-docs).",
        "",
        "`src/train_qlora.py` also takes `--config FILE.yaml`: its keys are the flag names with",
        "underscores (switches too: `no_tensorboard: true`, `grad_checkpoint: true`, and where a run",
        "starts: `auto_resume: true`), or nested sections as in `src/config.py`, or an `mlx_lm lora`",
        "config ([coming from mlx_lm lora](mlx-lm.md)); flags override the file.",
        "`examples/run.yaml` lists every key with its default. Exit codes: below, and all of them in",
        "[overnight runs](overnight.md#exit-codes).",
        "",
    ]
    return "\n".join(head) + "\n" + "\n".join(section(script) for script in COMMANDS)


def main() -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from the commands' parsers.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs; write nothing")
    args = parser.parse_args()
    text = reference()
    if args.check:
        if PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE.relative_to(REPO)} is out of date: run {REFRESH}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
