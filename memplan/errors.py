"""Errors that mean "the user asked for something invalid" (exit code 2, one line, no traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemplanError(Exception):
    """Bad input: the message says what is wrong and what is valid."""


def unknown(kind: str, name: str, valid: Iterable[str], *, listing: str | None = None) -> MemplanError:
    """The error for an unknown `name`: close matches, then all valid names or the command that lists them."""
    valid = sorted(set(valid))
    head = f"unknown {kind} {name!r}{did_you_mean(name, valid)}"
    tail = f"`{listing}` lists them all" if listing else f"valid: {', '.join(valid)}"
    return MemplanError(f"{head}; {tail}")


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """` (did you mean a, b?)` naming up to four close matches of `name` (any case), or ''."""
    by_lower = {v.lower(): v for v in sorted(set(valid))}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=4, cutoff=0.6)
    return f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""


def one_line(exc: BaseException, *, limit: int = 300, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters;
    with `with_type`, prefixed by the type name (`OutOfMemoryError: ...`)."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {first}" if with_type else (first or type(exc).__name__)
    return text[:limit]
