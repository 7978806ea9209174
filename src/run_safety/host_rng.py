"""Python's and numpy's global random generators, as JSON a checkpoint can hold.

The training loop itself draws nothing from them (MLX's generator is reseeded
from the step), but user code and libraries may: a checkpoint keeps both so a
resumed run continues their streams exactly.
"""

from __future__ import annotations

import random

import numpy as np


def host_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def check_host_rng_state(state: dict) -> None:
    """Raises unless `state` is a generator state that set_host_rng_state can put back."""
    version, internal, gauss = state["python"]
    random.Random().setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def set_host_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
