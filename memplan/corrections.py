"""Calibrated overhead corrections per GPU family (written by `memplan calibrate fit`).

Where memplan reads them, the first that applies:
1. `$MEMPLAN_CORRECTIONS`, a path (when set, nothing else is read, even if the file is missing);
2. the user's file, `$XDG_CONFIG_HOME/memplan/corrections.json` (`~/.config/...`), which
   `memplan calibrate fit --activate` writes;
3. `memplan/data/corrections.json`, shipped with a release. memplan never writes it.
A damaged file is ignored, with one warning line on stderr: an estimate never fails on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

from memplan.hardware import Family

ENV = "MEMPLAN_CORRECTIONS"
PACKAGED = Path(__file__).with_name("data") / "corrections.json"
FIELDS = ("context_bytes", "allocator_slack", "cublas_workspace_bytes")  # what a correction may override


def user_path() -> Path:
    """The user's corrections file: `$MEMPLAN_CORRECTIONS`, else under `$XDG_CONFIG_HOME` (`~/.config`)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "memplan" / "corrections.json"


def active_path() -> Path | None:
    """The file memplan reads corrections from, or None."""
    if os.environ.get(ENV):
        p = user_path()
        return p if p.exists() else None
    for p in (user_path(), PACKAGED):
        if p.is_file():
            return p
    return None


def invalid(doc) -> str | None:
    """Why a corrections document cannot be used (None when it can)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("families", {}), dict):
        return "expected an object with a `families` object"
    for fam, c in doc.get("families", {}).items():
        if not isinstance(c, dict):
            return f"families.{fam}: expected an object"
        for k in ("context_bytes", "cublas_workspace_bytes"):
            v = c.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                return f"families.{fam}.{k}: expected a byte count (an int >= 0), got {v!r}"
        v = c.get("allocator_slack")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
            return f"families.{fam}.allocator_slack: expected a number in [0, 1], got {v!r}"
    return None


@lru_cache(maxsize=4)
def _read(path: str, _version: tuple) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        why = f"cannot read ({e.strerror})" if isinstance(e, OSError) else "not valid JSON"
    else:
        why = invalid(doc)
        if why is None:
            return doc.get("families", {})
    sys.stderr.write(f"memplan: warning: {path}: {why}; ignored, no calibration corrections applied\n")
    return {}


def _load() -> dict:
    # Where the corrections live depends only on the environment: look once per process (a sweep
    # estimates thousands of configurations), again after `reload()` or a change of those variables.
    key = tuple(os.environ.get(k) for k in (ENV, "XDG_CONFIG_HOME", "HOME"))
    if key not in _LOADED:
        _LOADED[key] = _load_from(active_path())
    return _LOADED[key]


_LOADED: dict[tuple, dict] = {}


def _load_from(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        st = path.stat()
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = ()
    return _read(str(path), version)


def for_family(family: str) -> dict | None:
    """The fitted overheads for a GPU family, or None when no calibration covers it."""
    return _load().get(family)


def apply(fam: Family, correction: dict | None) -> Family:
    """The family's overhead constants with a correction's fitted values in their place."""
    if not correction:
        return fam
    return dataclasses.replace(fam, **{k: correction[k] for k in FIELDS if correction.get(k) is not None})


def reload() -> None:
    """Forget the cached file (after `memplan calibrate fit` rewrote it)."""
    _LOADED.clear()
    _read.cache_clear()
