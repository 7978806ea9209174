"""Signals that ask a run to stop cleanly: finish the step, commit a checkpoint, exit.

SIGINT (Ctrl+C) exits 130, SIGTERM (kill, a scheduler) 143, SIGHUP (the
terminal closed, an ssh session dropped: the commonest way an overnight run
dies) 129. A second Ctrl+C exits at once: checkpoints commit by rename, so the
last committed one is intact and a half-written one is cleaned at the next start.

After SIGHUP the terminal is gone and writing to it fails (EIO): standard
output and error that were that terminal are pointed at /dev/null first, so
the run can finish its step and save. Output redirected to a file (nohup,
`> log`) is left as it is.

A signal that was ignored when the run started stays ignored: `nohup` ignores
SIGHUP so that the run outlives its terminal, and a shell without job control
(a script's `cmd &`) ignores SIGINT in its background jobs so that Ctrl+C of
the script does not reach them. Catching those would undo what the user asked.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
if hasattr(signal, "SIGHUP"):  # not on Windows
    EXIT_CODES[signal.SIGHUP] = 129


class StopRequests:
    """A context manager: while inside, the signals above set `signal` instead of killing the
    process; one ignored on entry (nohup's SIGHUP, say) is left ignored."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in EXIT_CODES
                          if signal.getsignal(sig) != signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.signal)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def _on_signal(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            _say("\nSecond interrupt: exiting now; the last committed checkpoint is intact.\n")
            os._exit(130)
        if signum == getattr(signal, "SIGHUP", None):
            detach_from_terminal()
        if self.signal is None:
            self.signal = signum
        _say(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
             f"(Ctrl+C again to exit at once)\n")


def detach_from_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal (one that has hung up)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


class TolerantStream:
    """stdout or stderr that survives its terminal going away: a write that fails
    (EIO once the terminal has hung up, before SIGHUP is even handled) points the
    stream at /dev/null and the run goes on, instead of dying with a traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            detach_from_terminal()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            detach_from_terminal()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_standard_streams() -> None:
    if not isinstance(sys.stdout, TolerantStream):
        sys.stdout = TolerantStream(sys.stdout)
    if not isinstance(sys.stderr, TolerantStream):
        sys.stderr = TolerantStream(sys.stderr)


def _say(message: str) -> None:
    try:
        sys.stderr.write(message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # no terminal to tell: the metrics' end line says it
