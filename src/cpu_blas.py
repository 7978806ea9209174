"""An optimized BLAS for MLX's CPU backend on Linux, loaded before MLX is.

MLX's Linux CPU wheel (mlx[cpu]) multiplies float matrices with the *reference* BLAS it
bundles (mlx_cpu.libs/libblas-*.so, netlib): 29-37x slower than OpenBLAS on a float32
product the size of a small model's output layer. MLX calls `cblas_sgemm` by name, so a
CBLAS loaded into the process globally (RTLD_GLOBAL) before `mlx.core` is first imported
takes those calls: no LD_PRELOAD, no re-exec. Every command calls `load_optimized_blas()`
right after early_interrupt, before anything imports MLX.

Which library: the environment variable DISTRUST_QLORA_BLAS names one (a path to any CBLAS
that exports cblas_sgemm, e.g. MKL's libmkl_rt.so), or `bundled` keeps MLX's own; else an
installed OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread). Not on macOS
(Accelerate) and not where MLX's CPU wheel is not installed (mlx[cuda]): there nothing is
loaded and nothing is said.

OpenBLAS splits a product among its threads differently for different thread counts, and
the sums then round differently (measured: 1 thread and 2 threads give other bits on the
same product). A run and its resume must multiply alike, so the thread count is pinned:
OPENBLAS_NUM_THREADS, where the user has not set it, is set to the CPUs this process may
use, before the library starts its threads, and the start line names it. Child processes
(the tests' runs, mlx.launch's ranks) inherit it.

This module imports only what the interpreter has already loaded, plus ctypes when it loads
a library: it runs while a Ctrl+C is still meant to be one line (early_interrupt).
"""

import os
import sys

BLAS_VARIABLE = "DISTRUST_QLORA_BLAS"
BUNDLED = "bundled"
THREADS_VARIABLE = "OPENBLAS_NUM_THREADS"
# Where the usual packages install OpenBLAS's CBLAS (Debian/Ubuntu's libopenblas0-pthread and
# -openmp, Fedora's openblas), tried in order after the loader's own search by name.
OPENBLAS_PLACES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)
FIX_COMMAND = "sudo apt-get install libopenblas0-pthread"
SLOWER = "29-37x"  # measured: float32 products, reference BLAS against OpenBLAS (2 cores, MLX 0.32.4)

_state = {"checked": False, "library": None, "problem": None, "applies": False}


def load_optimized_blas() -> None:
    """Load the CBLAS this process multiplies with, if MLX's CPU wheel is installed and has not
    been imported yet. Never raises: a problem (a DISTRUST_QLORA_BLAS that cannot be loaded) is
    kept for check_blas(), which a command calls where it can say it in one line."""
    if _state["checked"]:
        return
    _state["checked"] = True
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules or not _bundled_blas():
        return
    _state["applies"] = True
    chosen = os.environ.get(BLAS_VARIABLE, "").strip()
    if chosen == BUNDLED:
        return
    os.environ.setdefault(THREADS_VARIABLE, str(_usable_cpus()))
    import ctypes

    for place in [chosen] if chosen else OPENBLAS_PLACES:
        try:
            library = ctypes.CDLL(place, mode=os.RTLD_GLOBAL)
            library.cblas_sgemm  # noqa: B018 - a library without it would leave MLX on its own
        except (OSError, AttributeError) as exc:
            if chosen:
                _state["problem"] = (f"{BLAS_VARIABLE}={chosen}: cannot be used as MLX's BLAS ({exc}); give the "
                                     f"path to a CBLAS library (one with cblas_sgemm), or {BUNDLED} for MLX's own")
            continue
        _state["library"] = (place, library)
        return


def check_blas() -> None:
    """UserError (one line, exit 2) where DISTRUST_QLORA_BLAS names a library that cannot be used."""
    if _state["problem"]:
        from errors import UserError

        raise UserError(_state["problem"])


def blas_line() -> str | None:
    """The start line that says which BLAS the run multiplies with; None where it does not
    apply (macOS, a CUDA build). Where only MLX's reference BLAS is there, it says how much
    slower that is and the one command that fixes it."""
    if not _state["applies"]:
        return None
    if _state["library"] is None:
        chosen = os.environ.get(BLAS_VARIABLE, "").strip() == BUNDLED
        why = f" ({BLAS_VARIABLE}={BUNDLED})" if chosen else " (no OpenBLAS found)"
        fix = "" if chosen else f"; to fix: {FIX_COMMAND}, or {BLAS_VARIABLE}=/path/to/a/cblas/library"
        return (f"blas: MLX's bundled reference BLAS{why}: float32 matrix products about {SLOWER} slower than "
                f"OpenBLAS{fix}")
    place, library = _state["library"]
    return f"blas: {_describe(place, library)}, {os.environ.get(THREADS_VARIABLE, '?')} threads ({THREADS_VARIABLE})"


def multiplies_slowly() -> bool:
    """Whether this process's float products go through MLX's bundled reference BLAS."""
    return _state["applies"] and _state["library"] is None


def blas_identity() -> dict:
    """What the products' bits depend on, for a checkpoint to compare on resume: the library
    and the thread count (None where MLX's bundled BLAS or no CPU BLAS is used)."""
    if _state["library"] is None:
        return {"blas": BUNDLED if _state["applies"] else None}
    place, library = _state["library"]
    return {"blas": _describe(place, library), "blas_threads": os.environ.get(THREADS_VARIABLE)}


def _describe(place: str, library) -> str:
    """The library's name and version: OpenBLAS says its own (openblas_get_config)."""
    import ctypes

    try:
        config = library.openblas_get_config
        config.restype = ctypes.c_char_p
        words = config().decode(errors="replace").split()
        version = words[1] if len(words) > 1 and words[0] == "OpenBLAS" else ""
        return f"OpenBLAS {version} ({_real_path(place)})".replace("  ", " ")
    except AttributeError:
        return _real_path(place)


def _real_path(place: str) -> str:
    """Where the loader found a library named without a folder (libopenblas.so.0): the first
    mapped file of that stem in /proc/self/maps."""
    if "/" in place:
        return place
    stem = place.split(".so")[0]
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(stem):
                    return path
    except OSError:
        pass
    return place


def _bundled_blas() -> bool:
    """Whether MLX's Linux CPU wheel, with its reference BLAS, is installed (found without
    importing mlx: mlx_cpu.libs/libblas-*.so beside the mlx package)."""
    for folder in sys.path:
        libs = os.path.join(folder or ".", "mlx_cpu.libs")
        try:
            if any(name.startswith("libblas") for name in os.listdir(libs)):
                return True
        except OSError:
            continue
    return False


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
