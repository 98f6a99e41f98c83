"""Writing output files: to the path asked, atomically for regular files, through devices, FIFOs and links.

- A regular file (or a new one): a temp file in the same folder, fsynced, then `os.replace`d over
  it, so a reader sees the old file or the whole new one. An existing file keeps its permissions.
- A symlink: its final target is written that way; the link stays a link.
- A FIFO, a character device (`/dev/null`, `/dev/stdout`, a process substitution's `/dev/fd/N`) or
  any other file that is not regular: opened and written through, never replaced.
- A directory, an empty path or a missing parent folder: bad input (MemplanError). Parent folders
  are never created here; memplan creates only the folders it owns, before calling this.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from memplan.errors import MemplanError


# A path under these names an open file of some process (`/dev/stdout` -> /proc/self/fd/1): even when
# it is a regular file, replacing it would detach it from that process, so it is written through.
_OPEN_FILES = ("/proc/", "/dev/fd/")


def _fail(label: str, why: str) -> MemplanError:
    return MemplanError(f"{label}: cannot write ({why})")


def _replace(target: str, data: bytes) -> None:
    """Atomically replace (or create) the regular file `target`, keeping an existing file's mode."""
    folder = os.path.dirname(target) or "."
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _through(target: str, data: bytes) -> None:
    """Write into a FIFO, a device or another process's open file as it is: appended, never truncated or replaced."""
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, label: str | None = None) -> None:
    """Write `data` to `path` (see the module docstring); `label` names the path in errors (e.g. `--junit X`)."""
    raw = os.fspath(path)
    label = label or (raw if raw else "output path")
    if not raw:
        raise MemplanError(f"{label}: empty path; name a file")
    data = data.encode() if isinstance(data, str) else data
    try:
        st = os.stat(raw)  # follows links, including /proc's magic ones (/dev/stdout, /dev/fd/N)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _fail(label, e.strerror or str(e)) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise MemplanError(f"{label}: is a directory; name a file")
    try:
        target = os.path.realpath(raw)  # a symlink (or a chain, or a dangling one): write its final target
        if st is not None and (not stat.S_ISREG(st.st_mode) or target.startswith(_OPEN_FILES)):
            _through(raw, data)
            return
        if st is None and not os.path.isdir(os.path.dirname(target) or "."):
            raise MemplanError(f"{label}: no such folder {os.path.dirname(raw) or '.'!r}")
        _replace(target, data)
    except OSError as e:
        raise _fail(label, e.strerror or str(e)) from None
