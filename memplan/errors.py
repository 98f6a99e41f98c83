"""Errors that mean "the user asked for something invalid" (exit code 2, one line, no traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemplanError(Exception):
    """Bad input: the message says what is wrong and what is valid."""


def unknown(kind: str, name: str, valid: Iterable[str], *, listing: str | None = None) -> MemplanError:
    """The error for an unknown `name`: close matches, then all valid names or the command that lists them."""
    valid = sorted(set(valid))
    by_lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=4, cutoff=0.6)
    head = f"unknown {kind} {name!r}"
    if close:
        head += f" (did you mean {', '.join(by_lower[c] for c in close)}?)"
    tail = f"`{listing}` lists them all" if listing else f"valid: {', '.join(valid)}"
    return MemplanError(f"{head}; {tail}")
