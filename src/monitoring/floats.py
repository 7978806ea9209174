"""Floats in state dicts, which go into a checkpoint's JSON: a non-finite one is written as
null (json_files' rule), and read back as what null means for that field (`null_means`):
infinity for a best-so-far that has none yet, NaN for a window entry that was not a number.

Checkpoints of earlier versions wrote the strings "inf", "-inf" and "nan" (and Python's json
reads their bare Infinity / NaN as floats): both still read back as the floats they name."""

from __future__ import annotations

import math

from run_safety.json_files import finite_or_none

OLD_NON_FINITE = ("inf", "-inf", "nan")  # what the previous encoding, str(x), wrote


def encode_float(x: float) -> float | None:
    return finite_or_none(float(x))


def decode_float(x: float | str | None, null_means: float) -> float:
    if x is None:
        return null_means
    if isinstance(x, str) and x in OLD_NON_FINITE:
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"expected a number or null, got {x!r}")
    return float(x)


def mean_finite(values) -> float:
    """The mean of the finite values (a NaN or infinite step left out); NaN when none is finite."""
    finite = [x for x in values if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan
