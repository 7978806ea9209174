"""The docs say only what the code does: the command-line reference is what the parsers
say (regenerated and compared), every relative link of README.md, docs/*.md and
data/README.md leads to a file and heading that exist, and every `python src/...`
(bench/, data/, docs/) command in them names a script that exists, with flags that
script's parser has. Nothing is trained: the parsers are built, never run."""

from __future__ import annotations

import importlib.util
import re
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


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(script, its flags) for every `python src/...` (bench/, data/, docs/) command on the page."""
    found = []
    for piece in code_pieces(page.read_text(encoding="utf-8")):
        for match in COMMAND.finditer(piece):
            flags = []
            for word in match.group(2).split():
                if word in SHELL_BREAKS or word.startswith(("#", ">", "2>")):
                    break
                flag = FLAG.match(word)
                if flag:
                    flags.append(flag.group(1))
            found.append((match.group(1), flags))
    return found


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


def test_every_command_names_a_script_that_exists_with_flags_it_has():
    module = cli_reference()
    parsers = {}
    wrong = []
    checked = 0
    for page in PAGES:
        for script, flags in commands(page):
            where = f"{page.relative_to(REPO)}: python {script}"
            if not (REPO / script).is_file():
                wrong.append(f"{where}: no such script")
                continue
            if script not in parsers:
                parsers[script] = module.flags_of(module.parser_of(script))
            wrong += [f"{where}: no flag {flag}" for flag in flags if flag not in parsers[script]]
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 10 and "src/train_qlora.py" in parsers  # the check found the commands at all


def test_the_check_finds_a_wrong_flag_and_a_missing_script(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\npython src/train_qlora.py --model tiny \\\n    --max-stpes 3 > log 2>&1 --not-a-flag\n"
                    "```\nand `python bench/no_such.py --x` inline\n", encoding="utf-8")
    assert commands(page) == [("src/train_qlora.py", ["--model", "--max-stpes"]), ("bench/no_such.py", ["--x"])]
    module = cli_reference()
    assert "--max-stpes" not in module.flags_of(module.parser_of("src/train_qlora.py"))


def test_the_readme_tests_with_the_command_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for words in ('pip install --quiet ".[cpu,test]"', "python -m pytest -q"):
        assert words in ci
        assert words.replace("--quiet ", "") in readme
