"""The records store: one JSON object per line, appended atomically, read back tolerating a torn tail.

A runner killed mid-write leaves at most one torn last line (no trailing newline). Reading skips it;
the next append cuts it off first, so a record is never glued onto a fragment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

SCHEMA = 1  # version of the record layout


def _cut_torn_tail(fd: int) -> None:
    """Truncate the file after its last newline (drops a line a kill left half-written)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) == b"\n":
        return
    pos, chunk = size, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        os.lseek(fd, start, os.SEEK_SET)
        data = os.read(fd, pos - start)
        nl = data.rfind(b"\n")
        if nl >= 0:
            os.ftruncate(fd, start + nl + 1)
            return
        pos = start
    os.ftruncate(fd, 0)


def append(path: str | Path, record: dict) -> None:
    """Append one record as one complete line: a single write, flushed and fsynced."""
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time, should two runners share a file
        _cut_torn_tail(fd)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str | Path) -> list[dict]:
    """Every complete record of one file; lines that are not a JSON object (a torn tail) are skipped."""
    out = []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return out
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def files(where: str | Path | Iterable[str | Path]) -> list[Path]:
    """JSONL files named, or held in the folders named, sorted."""
    items = [where] if isinstance(where, (str, Path)) else list(where)
    out: list[Path] = []
    for item in map(Path, items):
        out.extend(sorted(item.glob("*.jsonl")) if item.is_dir() else [item])
    return out


def read_all(where: str | Path | Iterable[str | Path]) -> list[dict]:
    """Records of every file; for a key seen twice, the later record wins."""
    by_key: dict[str, dict] = {}
    loose = []
    for f in files(where):
        for rec in read(f):
            if "key" in rec:
                by_key.pop(rec["key"], None)
                by_key[rec["key"]] = rec
            else:
                loose.append(rec)
    return list(by_key.values()) + loose
