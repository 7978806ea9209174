"""The one exception type that means "the user gave us something wrong".

The command line turns it into a single line on stderr and exit code 2; any
other exception is a bug and keeps its traceback (exit 1).
"""

import argparse


class UserError(Exception):
    """Bad usage, config or data. The message is shown as is, on one line."""


def one_line(text: str | None) -> str:
    """`text` with its line breaks and runs of spaces made single spaces (it may quote a file)."""
    return " ".join((text or "").split())


def error_line(exc: BaseException, prefix: str = "") -> str:
    """`error: ...` on one line, whatever the message holds."""
    return f"{prefix}error: {one_line(str(exc))}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit 2; a flag
    must be written whole (no abbreviations: --max-step is not taken for --max-steps), and
    a mistyped one gets the flag it was close to."""

    # A command may name flags users bring from elsewhere ({"--lr": "--learning-rate"}), and
    # more problems to report with mistyped flags (its settings file's): one message for all.
    also_known_as: dict = {}
    more_problems = None  # (parsed namespace) -> [problem, ...]

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, unknown = super().parse_known_args(args, namespace)
        bad = [token + self.suggestion(token) for token in unknown
               if token.startswith("-") and len(token) > 1 and not _is_number(token)]
        if bad:
            more = self.more_problems(parsed) if self.more_problems else []
            self.error(f"unrecognized argument{'s' if len(bad) > 1 else ''} {', '.join(bad)}"
                       + "".join(f"; and {problem}" for problem in more))
        return parsed, unknown

    def suggestion(self, token: str) -> str:
        """' (did you mean --max-steps?)' for a mistyped flag, or nothing."""
        import difflib

        flag = token.split("=", 1)[0]
        known = [name for name in self._option_string_actions if name.startswith("--")]
        dashed = "--" + flag.lstrip("-").replace("_", "-")
        if dashed in self.also_known_as:
            return f" (did you mean {self.also_known_as[dashed]}?)"
        close = [dashed] if dashed in known else difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        return f" (did you mean {close[0]}?)" if close else ""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True
