"""The shell every command line runs in: its work, with a UserError anywhere as one line and
exit 2, a fault of the machine (machine.fault_line) as one line and exit 1, a Ctrl+C (even one a
library turned into another exception) as one line and exit 130; anything else is a bug and keeps
its traceback (exit 1)."""

import errno

from run_safety.errors import UserError, error_line


def run_command(work) -> int:
    """The shell of a command line tool: `work()` (its exit code, or None for 0), with
    no MLX backend or a UserError turned into one line on stderr and exit 2, a fault of
    the machine (machine.fault_line) into one line and exit 1, Ctrl+C into exit 130."""
    import sys

    from run_safety.early_interrupt import started_up

    sys.unraisablehook = interrupt_in_a_finalizer
    FINALIZER_INTERRUPTS.clear()
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
        from run_safety import machine

        try:
            machine.check_start()
            code = work()
            if FINALIZER_INTERRUPTS:  # a Ctrl+C that landed in a __del__ while the work went on
                raise KeyboardInterrupt
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


FINALIZER_INTERRUPTS = []  # Ctrl+C that landed in an object's __del__ (interrupt_in_a_finalizer)


def interrupt_in_a_finalizer(unraisable) -> None:
    """sys.unraisablehook: a Ctrl+C that lands in an object's __del__ (tqdm's, as garbage is collected
    after the run has ended) is not printed as "Exception ignored in ... Traceback": it is kept, and
    run_command ends the command as interrupted (one line, exit 130) once its work returns. Raising
    it again from here would only fail inside this hook; a second Ctrl+C interrupts at once. Anything
    else is reported as Python would."""
    import sys

    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        FINALIZER_INTERRUPTS.append(unraisable.object)
        return
    sys.__unraisablehook__(unraisable)


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


def exit_quietly(code: int) -> None:
    """sys.exit(code) for a command line whose work is done: a Ctrl+C from here on would only interrupt
    the interpreter's own shutdown, where a library's __del__ turns it into "Exception ignored in ...
    Traceback" after the run has said it finished; so it is ignored."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)
