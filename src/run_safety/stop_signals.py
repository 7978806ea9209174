"""Signals that ask a run to stop cleanly: finish the step, commit a checkpoint, exit.

SIGINT (Ctrl+C) exits 130, SIGTERM (kill, a scheduler) 143, SIGHUP (the
terminal closed, an ssh session dropped: the commonest way an overnight run
dies) 129. A second Ctrl+C exits at once: checkpoints commit by rename, so the
last committed one is intact and a half-written one is cleaned at the next start.

After SIGHUP the terminal is gone and writing to it fails (EIO): standard
output and error that were that terminal are pointed at /dev/null first, so
the run can finish its step and save. Output redirected to a file (nohup,
`> log`) is left as it is; a pipe whose reader is gone (`| tee log` killed with
its session) is pointed at /dev/null too.

A signal handler never writes through the buffered stream: the signal may have
interrupted a write on it (a stalled terminal or pipe: the run blocked in that
write), and a second write would raise "reentrant call". It writes to the
descriptor, and only when that can take the line at once; the run's summary and
the metrics' end line say the rest.

A launcher may start the run with stdin, stdout or stderr closed (`>&-`, `2>&-`,
some daemons): /dev/null is put at that descriptor first (occupy_closed_standard_streams),
so that a closed stream is a place where nothing is shown, and no file the run
opens takes the number 2 that C libraries write their messages to.

A signal that was ignored when the run started stays ignored: `nohup` ignores
SIGHUP so that the run outlives its terminal, and a shell without job control
(a script's `cmd &`) ignores SIGINT in its background jobs so that Ctrl+C of
the script does not reach them. Catching those would undo what the user asked.
"""

from __future__ import annotations

import errno
import os
import select
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


def point_at_null(fd: int) -> None:
    """/dev/null at descriptor `fd` (what was there is let go)."""
    try:
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
    except OSError:
        return
    if null != fd:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
        os.close(null)


class TolerantStream:
    """stdout or stderr that survives its terminal or its reader going away: a write that
    fails (EIO once the terminal has hung up, before SIGHUP is even handled; EPIPE once
    the pipe's reader is gone) points the stream at /dev/null and the run goes on, instead
    of dying with a traceback."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._let_go(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._let_go(exc)

    @property
    def wrapped(self):
        """The stream itself: for output that must not be lost quietly (a listing asked for)."""
        return self._stream

    def _let_go(self, exc: OSError) -> None:
        detach_from_terminal()
        if exc.errno == errno.EPIPE:  # nobody reads this pipe any more, nor will
            try:
                point_at_null(self._stream.fileno())
            except (OSError, ValueError):
                pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


STANDARD_STREAMS = (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w"))


def occupy_closed_standard_streams() -> None:
    """/dev/null at each of descriptors 0, 1 and 2 that the launcher left closed, and a Python
    stream on it where Python had none (it sets sys.stdout to None then, and a print fails).
    First thing in a command: until then the first file the process opens would get the number."""
    for name, fd, mode in STANDARD_STREAMS:
        try:
            os.fstat(fd)
            continue
        except OSError:
            point_at_null(fd)
        if getattr(sys, name) is None:
            try:
                stream = open(fd, mode, buffering=1 if fd else -1, closefd=False, encoding="utf-8",
                              errors="backslashreplace" if fd == 2 else "strict")
            except OSError:
                continue
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)


def guard_standard_streams() -> None:
    occupy_closed_standard_streams()
    if not isinstance(sys.stdout, TolerantStream):
        sys.stdout = TolerantStream(sys.stdout)
    if not isinstance(sys.stderr, TolerantStream):
        sys.stderr = TolerantStream(sys.stderr)


def _say(message: str) -> None:
    """A line from a signal handler: to stderr's descriptor, never through its buffered stream
    (the handler may have interrupted a write on it), and never blocking (a stalled pipe or
    terminal: the line is dropped; the summary and the metrics' end line say it)."""
    try:
        fd = sys.stderr.fileno()
        if select.select([], [fd], [], 0)[1]:
            os.write(fd, message.encode("utf-8", "backslashreplace"))
    except (OSError, ValueError, AttributeError):
        pass
