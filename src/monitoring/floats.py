"""State dicts are JSON: it has no NaN or infinity, so they travel as the strings float() reads back."""

import math


def encode_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def decode_float(x: float | str | None) -> float:
    return math.inf if x is None else float(x)
