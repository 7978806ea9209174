"""The docs say only what the code does: the command-line reference is what the parsers
say (regenerated and compared), every relative link of README.md, docs/*.md and
data/README.md leads to a file and heading that exist, and every `python src/...`
(bench/, data/, docs/) command in them names a script that exists and is parsed whole by
that script's own parser: its flags, their values, the required ones (a training command's
settings are validated too, as the run would before loading anything). Nothing is trained
here: what the commands do is the other tests' business."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "data" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")
INDENTED = re.compile(r"^(?: {4}|\t)(.*)$", re.MULTILINE)  # a code block by indentation, outside lists
COMMAND = re.compile(r"\bpython3?\s+((?:src|bench|data|docs)/[\w/.-]+\.py)(.*)")
# Where a shell command line ends and the next (or a redirection, a comment) begins.
SHELL_BREAKS = {"|", "||", "&&", "&", ";", ">", ">>", "2>&1", "<"}
FLAG = re.compile(r"^\[?(--[A-Za-z0-9][\w-]*)")
SHELL_VARIABLE = re.compile(r"\$\{?\w+\}?")  # `for l in 0 1; do ... --lambda-weight $l`: parsed with 1


def cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCED.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def code_pieces(text: str) -> list[str]:
    """Each line of the fenced and indented blocks (continued lines joined) and each inline code span."""
    pieces = []
    for block in FENCED.findall(text):
        pieces += block.replace("\\\n", " ").splitlines()
    prose = FENCED.sub("", text)
    pieces += [line for line in INDENTED.findall(prose.replace("\\\n", " ")) if "`" not in line]
    pieces += [" ".join(span.split()) for span in INLINE.findall(prose)]
    return pieces


def test_the_command_line_reference_is_what_the_parsers_say():
    module = cli_reference()
    committed = module.PAGE.read_text(encoding="utf-8")
    assert committed == module.reference(), f"docs/cli.md is out of date: run {module.REFRESH}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    text = FENCED.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def command_words(piece_rest: str) -> list[str] | None:
    """The words of a command after its script, as the shell splits them, up to where the command
    line ends; None for a synopsis (`[--seed 0]`, `[options]`) or a bare mention of the script."""
    rest = SHELL_VARIABLE.sub("1", piece_rest)
    try:
        words = shlex.split(rest, comments=True)
    except ValueError:  # inside quotes, as `tmux new -s train 'python src/train_qlora.py ...'`
        words = shlex.split(rest[:_closing_quote(rest)], comments=True)
    args = []
    for word in words:
        if word in SHELL_BREAKS or word.startswith((">", "2>")):
            break
        args.append(word)
    if args and args[-1].endswith(")") and "(" not in args[-1]:  # a command quoted in a sentence's brackets
        args[-1] = args[-1][:-1]
    if not args or any(word.startswith("[") for word in args):
        return None
    return args


def _closing_quote(text: str) -> int:
    """Where the quote that the command sits inside closes: the first quote character that opens none."""
    for position, character in enumerate(text):
        if character in "'\"" and text.count(character, position + 1) % 2 == 0:
            return position
    return len(text)


def parse_problem(parser, script: str, args: list[str]) -> str | None:
    """What the script's parser (and, for a training command, the settings check) says of `args`."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            parsed = parser.parse_args(args)
    except SystemExit:
        return said.getvalue().strip().splitlines()[-1]
    if script == "src/train_qlora.py" and not parsed.config:  # a settings file named in the docs is not here
        from run_safety.errors import UserError
        from train_qlora import config_from_args

        try:
            config_from_args(parsed)
        except UserError as exc:
            return str(exc)
    return None


def test_every_command_names_a_script_that_exists_and_its_parser_takes_it_whole():
    module = cli_reference()
    parsers = {}
    wrong = []
    checked = parsed = 0
    for page in PAGES:
        for piece in code_pieces(page.read_text(encoding="utf-8")):
            for match in COMMAND.finditer(piece):
                script = match.group(1)
                where = f"{page.relative_to(REPO)}: python {script}"
                if not (REPO / script).is_file():
                    wrong.append(f"{where}: no such script")
                    continue
                if script not in parsers:
                    parsers[script] = module.parser_of(script)
                checked += 1
                args = command_words(match.group(2))
                if args is None:
                    continue
                problem = parse_problem(parsers[script], script, args)
                if problem:
                    wrong.append(f"{where} {' '.join(args)}: {problem}")
                parsed += 1
    assert not wrong, "\n".join(wrong)
    assert parsed >= 35 and "src/train_qlora.py" in parsers  # the check found the commands at all


def test_the_check_finds_a_wrong_flag_a_wrong_value_and_a_setting_out_of_range(tmp_path):
    page = ("```bash\npython src/train_qlora.py --model tiny \\\n    --max-stpes 3 > log 2>&1 --not-a-flag\n```\n"
            "`python src/train_qlora.py --model tiny --lora-rank 0`, `python src/evaluate.py --output-dir RUN --checkpoint`\n"
            "`tmux new -s t 'python src/train_qlora.py --model tiny --auto-resume' # or`, `python src/export.py`\n")
    found = [(match.group(1), command_words(match.group(2)))
             for piece in code_pieces(page) for match in COMMAND.finditer(piece)]
    assert found == [("src/train_qlora.py", ["--model", "tiny", "--max-stpes", "3"]),
                     ("src/train_qlora.py", ["--model", "tiny", "--lora-rank", "0"]),
                     ("src/evaluate.py", ["--output-dir", "RUN", "--checkpoint"]),
                     ("src/train_qlora.py", ["--model", "tiny", "--auto-resume"]),
                     ("src/export.py", None)]  # a bare mention is not a command to parse
    module = cli_reference()
    train, evaluate = module.parser_of("src/train_qlora.py"), module.parser_of("src/evaluate.py")
    assert "--max-stpes" in parse_problem(train, "src/train_qlora.py", found[0][1])
    assert "lora_rank" in parse_problem(train, "src/train_qlora.py", found[1][1]).replace("-", "_")
    assert "--checkpoint" in parse_problem(evaluate, "src/evaluate.py", found[2][1])
    assert parse_problem(train, "src/train_qlora.py", found[3][1]) is None


def test_the_readme_tests_with_the_command_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for words in ('pip install --quiet ".[cpu,test]"', "python -m pytest -q"):
        assert words in ci
        assert words.replace("--quiet ", "") in readme
