"""Bytes and seconds as people read them, for plans, errors and reports."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``10000`` -> ``'9.8 KiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_seconds(t: float) -> str:
    """``0.0123`` -> ``'12.3 ms'``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"
