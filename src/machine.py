"""Faults of the machine, as opposed to bad input (errors.UserError) or a bug: each becomes
one line on stderr, never a traceback.

Checked at start, before minutes of loading, and refused in one line with exit 2 (the
user can fix them):

- the working directory deleted (the libraries under mlx-lm resolve relative paths when
  imported, and a relative path of the run would name nothing);
- a hard limit of open files below 4096 (`ulimit -n 1024`): mlx-lm sets the limit to
  (2048, 4096) when imported and raises where it cannot; here it is imported within the
  hard limit instead;
- the folder MLX's CPU backend compiles its kernels in (the C++ temporary directory:
  $TMPDIR, else /tmp, as libstdc++'s temp_directory_path finds it) missing, not a folder,
  not writable or full;
- an address-space or data-size limit (`ulimit -v`, `ulimit -d`) below what loading the
  model needs: MLX and the tokenizer then abort or crash without a word (SIGABRT, SIGSEGV),
  which no handler can turn into a message, so the limit is compared first.

Met at any later point (a disk filling up, an I/O error, memory running out, a kernel that
cannot be compiled): one line naming what failed, exit 1 (`fault_line`).
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from pathlib import Path

from errors import UserError, one_line

# errno values that say the machine failed, never the code: the disk, the file system, the
# process's limits.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EFBIG,
                  getattr(errno, "EDQUOT", errno.ENOSPC), getattr(errno, "ESTALE", errno.EIO)}
# The environment variables libstdc++'s temp_directory_path reads, in its order.
TEMP_VARIABLES = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")
KERNEL_ROOM = 16 << 20  # a run's compiled kernels take about 1 MB; g++ writes its temporaries there too
MLX_LM_OPEN_FILES = 4096  # the hard limit mlx_lm.utils asks for when imported
ADDRESS_SPACE_FLOOR = 1 << 30  # the tiny model's run peaks at about 660 MB of address space (Linux x86_64)


class MachineFault(Exception):
    """A fault of the machine (disk full, I/O error, out of memory): one line, exit 1."""


# --------------------------------------------------------------------------- at start


def check_start() -> None:
    """What every command checks first: the working directory exists, the BLAS that
    DISTRUST_QLORA_BLAS names could be loaded (cpu_blas.py), and mlx-lm can be imported
    under this process's open-files limit."""
    from cpu_blas import check_blas

    check_working_directory()
    check_blas()  # a DISTRUST_QLORA_BLAS that cannot be loaded: one line, exit 2
    import_mlx_lm_within_open_files_limit()


def check_working_directory() -> None:
    try:
        os.getcwd()
    except FileNotFoundError:
        where = os.environ.get("PWD")
        raise UserError(f"the working directory{f' {where}' if where else ''} no longer exists (deleted or moved "
                        f"while the shell was in it): cd to an existing folder and run the command again") from None


def import_mlx_lm_within_open_files_limit() -> None:
    """mlx_lm.utils calls setrlimit(RLIMIT_NOFILE, (2048, 4096)) when imported, which raises
    ValueError where the hard limit is below 4096 and may not be raised (`ulimit -n 1024`,
    a container's default). Then it is imported with that one call kept within the hard
    limit: the soft limit goes as high as the hard one allows, which the toolkit's own few
    files never reach."""
    if "mlx_lm.utils" in sys.modules:
        return
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= MLX_LM_OPEN_FILES:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, MLX_LM_OPEN_FILES))  # allowed to a privileged process
        return
    except (ValueError, OSError):
        pass
    original = resource.setrlimit

    def within_hard_limit(which, limits):
        if which == resource.RLIMIT_NOFILE:
            current_hard = resource.getrlimit(which)[1]
            limits = tuple(min(limit, current_hard) for limit in limits)
        return original(which, limits)

    resource.setrlimit = within_hard_limit
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = original


def kernel_temp_dir() -> tuple[str, str | None]:
    """(the C++ temporary directory, the variable that named it or None for the default), found
    as libstdc++'s temp_directory_path finds it: the first of TMPDIR, TMP, TEMP, TEMPDIR that is
    set, even to "", else /tmp. MLX compiles its CPU kernels under <it>/mlx/<version>/cpu."""
    for name in TEMP_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return value, name
    return "/tmp", None


def check_kernel_folder() -> None:
    """UserError unless MLX's CPU backend can compile kernels where it will try: the C++
    temporary directory exists, is a folder, and takes a file, with room to spare. Only on the
    CPU device (Metal and CUDA compile elsewhere)."""
    import shutil

    import mlx.core as mx

    if mx.default_device().type != mx.cpu or shutil.which("g++") is None:
        return  # without g++ on the PATH, MLX runs its kernels uncompiled and writes nothing there
    base, variable = kernel_temp_dir()
    named = f"{variable}={base}" if variable else f"{base} (the default, no TMPDIR set)"
    fix = "set TMPDIR to a writable folder with some room (export TMPDIR=/some/folder)"
    why = "MLX compiles its CPU kernels there"
    if not base:
        raise UserError(f"{variable} is set but empty; {why}: {fix}")
    if not os.path.isdir(base):
        state = "is not a folder" if os.path.exists(base) else "does not exist"
        raise UserError(f"{named} {state}; {why}: {fix}")
    folder = Path(base) / "mlx" / mx.__version__ / "cpu"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
        info = os.statvfs(folder)
    except OSError as exc:
        raise UserError(f"{named}: cannot write in {folder} ({exc.strerror or exc}); {why}: {fix}") from None
    if info.f_flag & getattr(os, "ST_NOEXEC", 0):
        raise UserError(f"{named} is on a file system mounted noexec: MLX compiles its CPU kernels there and "
                        f"cannot load them: {fix.replace('writable folder', 'writable folder on another mount')}")
    free = info.f_bavail * info.f_frsize
    if free < KERNEL_ROOM:
        raise UserError(f"{named}: {free / 1e6:.1f} MB free in {folder}, and {why} (it needs a few MB): free some "
                        f"space there or {fix}")


def check_address_space(model_bytes: int, what: str) -> None:
    """UserError when `ulimit -v` or `ulimit -d` is below what loading `what` (its weight files
    `model_bytes` long) and training on it need: about 1 GB, plus twice the weights (a base
    quantized on load holds both forms for a moment)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    needed = ADDRESS_SPACE_FLOOR + 2 * model_bytes
    for limit, flag, name in ((getattr(resource, "RLIMIT_AS", None), "-v", "address-space"),
                              (getattr(resource, "RLIMIT_DATA", None), "-d", "data-size")):
        if limit is None:
            continue
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and soft < needed:
            raise UserError(f"the {name} limit (ulimit {flag}) is {soft >> 20:,} MiB, and {what} needs about "
                            f"{needed >> 20:,} MiB of address space here (MLX and the tokenizer abort without a "
                            f"message below it): raise it, e.g. ulimit {flag} unlimited, and run again")


# --------------------------------------------------------------------------- at any point


def write_fault(exc: OSError, message: str) -> Exception:
    """`message` (which names what could not be written and why) as the exception for a failed
    write: MachineFault for a full disk or an I/O error, UserError for a place that cannot be
    written (read-only, not allowed, not a folder), which the user chose and can change."""
    if exc.errno in MACHINE_ERRNOS - {errno.EROFS}:
        return MachineFault(message)
    return UserError(message)


def check_writable_folder(folder: Path, what: str) -> None:
    """UserError unless a file can be created in `folder`, or in its nearest existing ancestor
    when it does not exist yet (it would be created): found before minutes of work, with
    nothing left behind."""
    probe_in = Path(folder)
    while not os.path.lexists(probe_in) and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not os.path.isdir(probe_in):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(probe_in))
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=probe_in)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what}: cannot write in {probe_in} ({exc.strerror or exc})") from None



def fault_line(exc: BaseException) -> str | None:
    """The one line for an exception that is a fault of the machine; None for anything else
    (a bug keeps its traceback)."""
    if isinstance(exc, MachineFault):
        return f"error: {one_line(str(exc))}"
    if isinstance(exc, MemoryError):
        detail = f" ({one_line(str(exc))})" if str(exc) else ""
        return (f"error: out of memory{detail}; committed checkpoints are intact: free memory, or use a smaller "
                f"--batch-size or --max-seq-length, and run again")
    if isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"error: {where}{exc.strerror or exc} (a fault of the machine, not of the input); {after_a_fault()}"
    if isinstance(exc, RuntimeError):
        text = one_line(str(exc))
        broken = re.search(r"Could not load C\+\+ shared library (\S+\.so): (.*)", text)
        if broken:  # a compile cut short (kill -9, a full disk) leaves a broken library that every later run loads
            return (f"error: MLX cannot load its compiled kernel {broken[1]} ({broken[2][:120]}): remove that file "
                    f"(MLX compiles it again) and run the same command again; {after_a_fault()}")
        if "temp_directory_path" in text or "[Compile::eval_cpu]" in text:
            base, variable = kernel_temp_dir()
            named = f"{variable}={base}" if variable else base
            return (f"error: MLX could not compile a CPU kernel in {named} ({text[:300]}); set TMPDIR to a "
                    f"writable folder with room; {after_a_fault()}")
        if text.startswith(("[write]", "[save", "[load]")) or "Unable to write" in text:
            return f"error: {text[:300]} (a failed write or read: full disk or I/O error?); {after_a_fault()}"
    return None


def after_a_fault() -> str:
    return "committed checkpoints are intact"
