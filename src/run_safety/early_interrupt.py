"""Ctrl+C while a command line is still starting (importing MLX, mlx-lm and transformers takes
seconds): one line and exit 130, not the traceback of a half-done import.

A command line calls interrupt_quietly_while_starting() first thing; command.run_command
calls started_up() once it can say more (a KeyboardInterrupt there is one line too), and
the training loop installs its own handling (stop_signals.StopRequests). This module imports
only what the interpreter has already loaded: `signal` alone would cost tens of ms (its
enums), a window in which Ctrl+C would still end in a traceback. So it uses `_signal`, the
C module under `signal`.
"""

import _signal
import os


def interrupt_quietly_while_starting() -> None:
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not where it is ignored (a job run with &)
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)


def _interrupted_while_starting(signum, frame) -> None:
    try:  # no buffered stream: one may be in the middle of a write
        os.write(2, b"\ninterrupted while starting; nothing was written\n")
    except OSError:
        pass
    os._exit(130)


def started_up() -> None:
    """Python's own Ctrl+C handling (KeyboardInterrupt) back, where the quiet exit was set."""
    if _signal.getsignal(_signal.SIGINT) is _interrupted_while_starting:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
