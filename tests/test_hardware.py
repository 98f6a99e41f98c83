"""GPU catalog, family overheads, name lookup and NVML detection (CPU only; NVML is faked where needed)."""

from __future__ import annotations

import sys
import types

import pytest

from memplan import hardware
from memplan.errors import MemplanError
from memplan.hardware import MIB, catalog, detect, families, family, get_gpu

GPUS = catalog()
REQUIRED = ("h100-80gb", "h100-pcie", "h100-nvl", "h200", "a100-40gb", "a100-80gb", "a10g", "l4", "l40s", "t4",
            "v100-16gb", "v100-32gb", "rtx-3090", "rtx-4090", "rtx-5090", "rtx-a6000", "rtx-6000-ada")
# torch CublasHandlePool default ':4096:2:16:8' = 2 x 4096 KiB + 8 x 16 KiB = 8,388,608 + 131,072
DEFAULT_WORKSPACE = 8_519_680


@pytest.mark.parametrize("gpu", GPUS, ids=[g.name for g in GPUS])
def test_entry(gpu):
    assert isinstance(gpu.total_bytes, int) and gpu.total_bytes > 0
    assert gpu.total_bytes % MIB == 0  # the driver reports whole MiB
    assert gpu.family in families()
    assert gpu.display and gpu.source
    for name in (gpu.name, *gpu.aliases):
        assert get_gpu(name) is gpu


def test_catalog_has_the_cards_users_rent():
    assert set(REQUIRED) <= {g.name for g in GPUS}


def test_names_do_not_collide_once_normalised():
    keys = [hardware._norm(n) for n in hardware.gpu_names()]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("typed, name", [
    ("h100-80gb", "h100-80gb"), ("H100-PCIE", "h100-pcie"), ("a100_40gb", "a100-40gb"), ("RTX 4090", "rtx-4090"),
    ("4090", "rtx-4090"), ("t4", "t4"), ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("A100 80G", "a100-80gb"),
    ("a100", "a100-80gb"), ("h100", "h100-80gb"), ("Tesla T4", "t4"),
])
def test_forgiving_names(typed, name):
    assert get_gpu(typed).name == name


def test_driver_totals():
    # nvidia-smi memory.total in MiB x 2^20
    assert get_gpu("h100-80gb").total_bytes == 81_559 * MIB == 85_520_809_984
    assert get_gpu("a100-40gb").total_bytes == 40_960 * MIB
    assert get_gpu("rtx-4090").total_bytes == 24_564 * MIB
    assert get_gpu("a10g").total_bytes == 23_028 * MIB
    assert get_gpu("t4").total_bytes == 15_360 * MIB


def test_unknown_gpu_names_close_matches():
    with pytest.raises(MemplanError, match=r"unknown GPU 'a100-40' \(did you mean .*a100-40gb.*`memplan gpus`"):
        get_gpu("a100-40")


@pytest.mark.parametrize("name", sorted(families()))
def test_family(name):
    f = families()[name]
    assert isinstance(f.context_bytes, int) and f.context_bytes > 0
    assert isinstance(f.cublas_workspace_bytes, int) and f.cublas_workspace_bytes > 0
    assert 0 <= f.allocator_slack < 0.5
    assert f.source


def test_cublas_workspace_by_generation():
    # 32 MiB on Hopper and Blackwell (torch: sm 9.x, 10.x, 12.x), the :4096:2:16:8 default elsewhere.
    assert family("hopper").cublas_workspace_bytes == family("blackwell").cublas_workspace_bytes == 32 * MIB
    for name in ("ampere", "ada", "turing", "volta", "default"):
        assert family(name).cublas_workspace_bytes == DEFAULT_WORKSPACE


def test_unknown_family_falls_back_to_default():
    assert family("rubin") is families()["default"]


# ---- detection ---------------------------------------------------------------------------------

def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def test_detect_without_a_driver_is_empty():
    if _nvml_present():
        pytest.skip("an NVIDIA driver is present")
    assert detect() == []


def test_auto_without_a_gpu_says_how_to_name_one(monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda: [])
    with pytest.raises(MemplanError, match=r"no NVIDIA GPU found.*--gpu a100-80gb"):
        get_gpu("auto")


def _fake_nvml(devices: list[tuple[str, int]]) -> types.ModuleType:
    """A pynvml stand-in reporting (name, total bytes) per device."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(devices)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: devices[h][0]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=devices[h][1])
    return nvml


def test_detect_maps_nvml_names_to_the_catalog(monkeypatch):
    devices = [(g.display, g.total_bytes) for g in GPUS]
    monkeypatch.setattr(hardware, "_driver_loaded", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(devices))
    found = detect()
    assert [(g.name, g.family, g.total_bytes) for g in found] == [(g.name, g.family, g.total_bytes) for g in GPUS]
    assert all(g.detected for g in found)


def test_detect_unknown_card_keeps_its_total(monkeypatch):
    monkeypatch.setattr(hardware, "_driver_loaded", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([("NVIDIA Quantum X9", 12_345 * MIB)]))
    (gpu,) = detect()
    assert (gpu.family, gpu.total_bytes) == ("default", 12_345 * MIB)
