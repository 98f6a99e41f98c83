"""Calibrated overhead corrections per GPU family (written by `memplan calibrate fit`)."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from memplan.hardware import Family

PATH = Path(__file__).with_name("data") / "corrections.json"
FIELDS = ("context_bytes", "allocator_slack", "cublas_workspace_bytes")  # what a correction may override


@lru_cache(maxsize=1)
def _load() -> dict:
    if not PATH.is_file():
        return {}
    return json.loads(PATH.read_text()).get("families", {})


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
    _load.cache_clear()
