"""The one exception type that means "the user gave us something wrong".

The command line turns it into a single line on stderr and exit code 2; any
other exception is a bug and keeps its traceback (exit 1).
"""

import argparse


class UserError(Exception):
    """Bad usage, config or data. The message is shown as is, on one line."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
