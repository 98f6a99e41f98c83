"""The records store: one JSON object per line, appended atomically, read back tolerating a torn tail.

A runner killed mid-write leaves at most one torn last line (no trailing newline). Reading skips it;
the next append cuts it off first, so a record is never glued onto a fragment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

# Version of the record layout. 2: `world_size` and `rank` (a multi-GPU configuration writes one
# record per rank, each with its own peaks); a record without them (version 1) is one GPU, rank 0.
SCHEMA = 2


def world_of(record: dict) -> tuple[int, int]:
    """(world size, rank) of a record; 1 and 0 for records written before multi-GPU runs."""
    return int(record.get("world_size") or 1), int(record.get("rank") or 0)


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


def append(path: str | Path, *record: dict) -> None:
    """Append records (one per rank of a multi-GPU run) as complete lines: a single write, flushed and fsynced."""
    line = b"".join((json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n").encode() for r in record)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time, should two runners share a file
        _cut_torn_tail(fd)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def parse(data: bytes, damaged: list[int] | None = None) -> list[dict]:
    """The records of a file's bytes. Lines that are not a JSON object are skipped; their 1-based
    numbers go into `damaged`, except a torn last line (no newline after it), which a kill leaves."""
    out = []
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        elif damaged is not None and n < len(lines):
            damaged.append(n)
    return out


def read(path: str | Path, damaged: list[int] | None = None) -> list[dict]:
    """Every complete record of one file (see `parse`); a missing file has none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return parse(data, damaged)


def files(where: str | Path | Iterable[str | Path]) -> list[Path]:
    """JSONL files named, or held in the folders named, sorted."""
    items = [where] if isinstance(where, (str, Path)) else list(where)
    out: list[Path] = []
    for item in map(Path, items):
        out.extend(sorted(item.glob("*.jsonl")) if item.is_dir() else [item])
    return out


def damaged_note(path: str | Path, lines: list[int]) -> str:
    """`path: 2 damaged lines skipped (lines 3, 9)`, the numbers cut after ten."""
    shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
    s = "s" if len(lines) != 1 else ""
    return f"{path}: {len(lines)} damaged line{s} skipped (line{s} {shown})"


def read_all(where: str | Path | Iterable[str | Path], notes: list[str] | None = None) -> list[dict]:
    """Records of every file; for a key seen twice, the later record wins. Damaged lines in the
    middle of a file are skipped, and a note saying where goes into `notes`."""
    by_key: dict[str, dict] = {}
    loose = []
    for f in files(where):
        damaged: list[int] = []
        recs = read(f, damaged)
        if damaged and notes is not None:
            notes.append(damaged_note(f, damaged))
        for rec in recs:
            if isinstance(rec.get("key"), str):
                by_key.pop(rec["key"], None)
                by_key[rec["key"]] = rec
            else:
                loose.append(rec)
    return list(by_key.values()) + loose


class Claims:
    """Claims on configurations of one records file, so that runs sharing the file never measure one
    configuration twice.

    A claim is a POSIX record lock (`lockf`) on one byte of the records file, at an offset far past
    any data that the key picks. Record locks are not data: nothing is written, and the kernel drops
    them when the process dies, so a killed run's claims are free for the next run. (They are also
    dropped when this process closes *any* descriptor of the file, as `append` does: a claim lasts
    until its result is appended, which is exactly as long as it must.) Appends keep using `flock`,
    which on Linux is independent of record locks.
    """

    BASE = 1 << 40  # past any records file

    def __init__(self, path: str | Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def _offset(self, key: str) -> int:
        import hashlib

        return self.BASE + int(hashlib.sha256(key.encode()).hexdigest()[:10], 16)  # the same in every process

    def take(self, key: str) -> bool:
        """Claim `key`; False when another live process holds it."""
        import fcntl

        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._offset(key))
        except OSError:
            return False
        return True

    def release(self, key: str) -> None:
        import fcntl

        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self._offset(key))

    def records(self) -> list[dict]:
        """The file's records, read through the held descriptor (opening another would drop the claims)."""
        size = os.fstat(self.fd).st_size
        return parse(os.pread(self.fd, size, 0)) if size else []

    def close(self) -> None:
        os.close(self.fd)