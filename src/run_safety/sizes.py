"""The one way a size is printed: decimal units (kB, MB, GB), as disks, `df` and MLX's memory figures give them."""

from __future__ import annotations

UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def size_text(count: float, smallest: str = "bytes") -> str:
    """'4.52 GB', '512 MB', '43.8 MB', '1.0 kB', '12 bytes'. `smallest="MB"` keeps small figures in MB
    ('0.0 MB'), where a column of them (memory on the progress line) reads best in one unit."""
    sign = "-" if count < 0 else ""
    count = abs(count)
    if count >= 1e9:
        return f"{sign}{count / 1e9:.2f} GB"
    if count >= 1e6 or smallest == "MB":
        mb = count / 1e6
        return f"{sign}{mb:.1f} MB" if mb < 100 else f"{sign}{mb:.0f} MB"
    if count >= 1e3:
        return f"{sign}{count / 1e3:.1f} kB"
    return f"{sign}{count:.0f} bytes"
