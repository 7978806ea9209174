"""The one exception type that means "the user gave us something wrong".

The command line turns it into a single line on stderr and exit code 2; any
other exception is a bug and keeps its traceback (exit 1).
"""

import argparse
import errno


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


def run_command(work) -> int:
    """The shell of a command line tool: `work()` (its exit code, or None for 0), with
    no MLX backend or a UserError turned into one line on stderr and exit 2, a fault of
    the machine (machine.fault_line) into one line and exit 1, Ctrl+C into exit 130."""
    import sys

    from early_interrupt import started_up

    try:
        try:
            # Still under the quiet exit of early_interrupt: a Ctrl+C inside MLX's extension
            # comes out as an ImportError ("error while initializing the extension"), not as
            # a KeyboardInterrupt, and would read as a missing backend.
            import mlx.core  # noqa: F401
        except ImportError as exc:
            print(f"error: MLX has no backend here ({exc}); install with pip install '.[cpu]' (Linux CPU) "
                  f"or '.[cuda]' (NVIDIA); on a Mac, pip install . is enough", file=sys.stderr)
            return 2
        started_up()  # from here a Ctrl+C is a KeyboardInterrupt, said in one line below
        import machine

        try:
            machine.check_start()
            code = work()
        except Exception as exc:
            if interrupted(exc):  # a library turned the KeyboardInterrupt into another exception
                raise KeyboardInterrupt from None
            if isinstance(exc, BrokenPipeError):  # the reader of the output went away (generate | head)
                return reader_gone()
            if isinstance(exc, UserError) or isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
                print(error_line(exc), file=sys.stderr)  # a name too long: a path the user gave
                return 2
            line = machine.fault_line(exc)
            if line is None:
                raise
            print(line, file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("\ninterrupted; committed checkpoints are intact", file=sys.stderr)
        return 130
    return 0 if code is None else code


def interrupted(exc: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is among the causes of `exc` (a Ctrl+C during an import can
    come out as "RuntimeError: Error calling __set_name__", a library's error, or our own
    UserError raised from it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def reader_gone() -> int:
    """Stop quietly, as a process killed by SIGPIPE does (exit 141): what is left to print goes to
    /dev/null, so that Python's flush at exit does not fail again."""
    import os
    import sys

    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):
        pass
    return 141
