"""Byte units: IEC (GiB = 2^30), as torch reports them; bytes stay ints, only display divides."""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def gib(n_bytes: int | float) -> float:
    """Bytes to GiB (2^30)."""
    return n_bytes / GIB


def fmt_gib(n_bytes: int | None, *, unit: bool = False) -> str:
    """`12.34` (or `12.34 GiB` with `unit`); `-` for no number."""
    if n_bytes is None:
        return "-"
    return f"{n_bytes / GIB:.2f}" + (" GiB" if unit else "")


def fmt_size(n_bytes: int | None) -> str:
    """`12.34 GiB` from 1 GiB up, `56.78 MiB` below; `-` for no number."""
    if n_bytes is None:
        return "-"
    return fmt_gib(n_bytes, unit=True) if n_bytes >= GIB else f"{n_bytes / MIB:.2f} MiB"
