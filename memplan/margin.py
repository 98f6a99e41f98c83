"""Margin: the part of a GPU a plan keeps free, as a share of its memory (`5%`) or an amount (`2GiB`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from memplan.errors import MemplanError

# IEC units are what torch and nvidia-smi mean; SI units are accepted with their SI meaning.
UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
HINT = "write a share such as 5% or an amount with its unit such as 2GiB, 512MiB or 1000000B"
MAX_BYTES = 1 << 50  # 1 PiB, far above any GPU; also keeps byte counts exact in a float (< 2^53)


def _shown(value) -> str:
    """`value` for a message: its repr cut short (a YAML alias can expand to gigabytes)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too long to read"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class Margin:
    """Bytes kept free on a GPU: `percent` of its memory, or a fixed number of bytes."""

    percent: float = 0.0
    fixed_bytes: int = 0

    @classmethod
    def parse(cls, value: str | int | Margin) -> Margin:
        """`5%`, `2GiB`, `2 GiB`, `512MiB`, `1.5GB` (10^9 bytes), `1000000B`, or 0.

        A bare number other than 0 is refused: `margin: 5` could mean 5% or 5 bytes.
        """
        if isinstance(value, Margin):
            return value
        if value == 0 and not isinstance(value, bool) or value == "0":
            return cls()
        if not isinstance(value, str):
            raise ValueError(f"{HINT}; got {_shown(value)}")
        text = value.strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ValueError(f"{HINT}; got {_shown(value)}") from None
            if not 0 <= pct < 100:  # also NaN
                raise ValueError(f"a share must be in [0%, 100%), got {_shown(value)}")
            return cls(percent=pct)
        m = _AMOUNT.match(text)
        if not m or m.group(2).lower() not in UNITS:
            raise ValueError(f"{HINT}; got {_shown(value)}")
        number = float(m.group(1))  # at most a few hundred digits (the regex); inf only past ~308 of them
        if number * UNITS[m.group(2).lower()] > MAX_BYTES:
            raise ValueError(f"an amount must be at most 1024TiB, got {_shown(value)}")
        return cls(fixed_bytes=int(number * UNITS[m.group(2).lower()]))

    def bytes_of(self, total_bytes: int) -> int:
        """Bytes kept free on a GPU of `total_bytes`."""
        return self.fixed_bytes + int(total_bytes * self.percent / 100)

    def budget(self, total_bytes: int) -> int:
        """Bytes a run may use: total minus the margin."""
        return total_bytes - self.bytes_of(total_bytes)

    def check_against(self, total_bytes: int, gpu_name: str) -> None:
        """Refuse (bad input, not a misfit) a margin that keeps all of a GPU of `total_bytes` free."""
        kept = self.bytes_of(total_bytes)
        if kept >= total_bytes:
            raise MemplanError(f"margin {self} ({kept / 2**30:.2f} GiB) is not less than {gpu_name}'s "
                               f"{total_bytes / 2**30:.2f} GiB; a margin must leave room for the run")

    def __str__(self) -> str:
        if self.percent:
            short = f"{self.percent:g}"  # 5%, 2.5%; repr when :g would round (99.99999 -> 100)
            return f"{short if float(short) == self.percent else repr(self.percent)}%"
        for unit in ("TiB", "GiB", "MiB"):
            if self.fixed_bytes and self.fixed_bytes % UNITS[unit.lower()] == 0:
                return f"{self.fixed_bytes // UNITS[unit.lower()]}{unit}"
        return f"{self.fixed_bytes}B"


DEFAULT = Margin(percent=5.0)
