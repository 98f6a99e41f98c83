"""GPUs: the catalog (memory sizes with sources), per-family overhead constants, NVML detection."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError, unknown

CATALOG_PATH = Path(__file__).with_name("data") / "gpus.json"
from memplan.units import MIB


@dataclass(frozen=True, slots=True)
class Family:
    """Overheads that depend on the GPU generation, before calibration corrects them."""

    name: str
    context_bytes: int  # CUDA context + loaded kernels, seen by NVML only
    cublas_workspace_bytes: int  # per cuBLAS handle and stream, allocated through torch
    allocator_slack: float  # reserved = allocated * (1 + slack) + segment rounding
    source: str


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str  # canonical short name, e.g. "h100-80gb"
    display: str  # marketing name
    total_bytes: int  # memory the driver reports as total
    family: str
    aliases: tuple[str, ...] = ()
    source: str = ""
    detected: bool = False


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(CATALOG_PATH.read_text())


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    return {k: Family(name=k, **v) for k, v in _data()["families"].items()}


@lru_cache(maxsize=1)
def catalog() -> tuple[Gpu, ...]:
    return tuple(
        Gpu(name=e["name"], display=e["display"], total_bytes=int(e["total_bytes"]), family=e["family"],
            aliases=tuple(e.get("aliases", ())), source=e.get("source", ""))
        for e in _data()["gpus"]
    )


def family(name: str) -> Family:
    return families().get(name) or families()["default"]


def _norm(text: str) -> str:
    """Forgiving key: case, spaces, underscores, 'nvidia' and 'GB'/'G' spellings do not matter."""
    t = text.strip().lower().replace("nvidia", "").replace("geforce", "")
    t = re.sub(r"[\s_]+", "-", t).strip("-")
    t = re.sub(r"(\d+)\s*-?g(?:b|ib)?\b", r"\1gb", t)
    return t


def gpu_names() -> list[str]:
    names = []
    for g in catalog():
        names.append(g.name)
        names.extend(g.aliases)
    return names


def get_gpu(name: str) -> Gpu:
    """A catalog GPU by name or alias (any case); `auto` is the first local GPU."""
    if name.strip().lower() == "auto":
        found = detect()
        if not found:
            raise MemplanError("--gpu auto: no NVIDIA GPU found (NVML not available); name one, e.g. --gpu a100-80gb")
        return found[0]
    key = _norm(name)
    for g in catalog():
        if key == _norm(g.name) or key in (_norm(a) for a in g.aliases):
            return g
    raise unknown("GPU", name, gpu_names(), listing="memplan gpus")


def _family_of(display: str, total_bytes: int) -> tuple[str, str]:
    """Match an NVML device name to the catalog: (family, catalog name or '')."""
    key = _norm(display)
    best = None
    for g in catalog():
        if _norm(g.display) == key:
            return g.family, g.name
        for alias in (g.name, *g.aliases):
            a = _norm(alias)
            if a.split("-")[0] in key and (best is None or abs(g.total_bytes - total_bytes) < best[0]):
                best = (abs(g.total_bytes - total_bytes), g)
    if best is not None:
        return best[1].family, best[1].name
    return "default", ""


def _driver_loaded() -> bool:
    """False where Linux shows no NVIDIA kernel driver: NVML would find nothing, and costs an import."""
    return not sys.platform.startswith("linux") or Path("/proc/driver/nvidia").exists()


def detect() -> list[Gpu]:
    """Local GPUs through NVML; empty where there is no NVIDIA driver."""
    if not _driver_loaded():
        return []
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            display = pynvml.nvmlDeviceGetName(handle)
            display = display.decode() if isinstance(display, bytes) else display
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            fam, name = _family_of(display, total)
            gpus.append(Gpu(name=name or _norm(display), display=display, total_bytes=total, family=fam,
                            source=f"NVML device {i}", detected=True))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus
