"""Where the project lives and where it keeps what it builds (models, sums, indexes)."""

from __future__ import annotations

import os
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[2]  # src/run_safety/paths.py -> the project


def cache_dir() -> Path:
    """Built models (tiny, quantized copies of bases): the project's .cache/ unless
    DISTRUST_QLORA_CACHE names another folder."""
    return Path(os.environ.get("DISTRUST_QLORA_CACHE", REPO_ROOT / ".cache"))
