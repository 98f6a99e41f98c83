"""Calibrated overhead corrections per GPU family (written by `memplan calibrate fit`)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PATH = Path(__file__).with_name("data") / "corrections.json"


@lru_cache(maxsize=1)
def _load() -> dict:
    if not PATH.is_file():
        return {}
    return json.loads(PATH.read_text()).get("families", {})


def for_family(family: str) -> dict | None:
    """The fitted overheads for a GPU family, or None when no calibration covers it."""
    return _load().get(family)
