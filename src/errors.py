"""The one exception type that means "the user gave us something wrong".

The command line turns it into a single line on stderr and exit code 2; any
other exception is a bug and keeps its traceback (exit 1).
"""


class UserError(Exception):
    """Bad usage, config or data. The message is shown as is, on one line."""
