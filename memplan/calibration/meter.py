"""What a worker reads while the step runs: peak bytes overall and per phase, by one small interface.

- `CudaMeter`: torch's caching-allocator statistics (`max_memory_allocated`, `max_memory_reserved`),
  reset at each phase boundary so each phase gets its own peak, plus NVML for what the device shows.
- `CpuMeter`: without CUDA, the tracer's `TorchDispatchMode` that counts the live bytes of every storage an op
  creates (rounded to 512 B, as the CUDA allocator rounds) and drops them when the storage dies. A cap
  turns it into a simulated card: past it, the op raises `torch.OutOfMemoryError`, like CUDA.

`CpuMeter` is the tracer's `LiveBytes` on real tensors, so the CPU path measures what a trace counts.
"""

from __future__ import annotations

import os

import torch

from memplan.result import Phase
from memplan.overhead import round_block
from memplan.tracker import LiveBytes


class Meter:
    """The interface: enter before the model is built, report phases, reset after warm-up, read."""

    name = "meter"

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def on_phase(self, phase: Phase) -> None:
        """A new phase starts; what came before belongs to the previous one."""

    @property
    def current_phase(self) -> Phase:
        """The phase running now (where an out-of-memory happened)."""
        current = getattr(self, "current", None)  # the tracker's, on the CPU
        return current if isinstance(current, Phase) else getattr(self, "phase", Phase.LOAD)

    def reset_peak(self) -> None:
        """Forget the peaks so far (after the warm-up steps)."""

    def allocated_bytes(self) -> int:
        """Bytes live now."""
        raise NotImplementedError

    def readings(self) -> dict:
        """Peaks since the last reset: allocated, reserved, device, per phase."""
        raise NotImplementedError


class CpuMeter(LiveBytes, Meter):
    """Live storage bytes on the CPU, counted as the tracer counts them, with an optional simulated card."""

    name = "cpu-live-bytes"

    def __init__(self, cap_bytes: int | None = None, *, distributed: bool = False):
        LiveBytes.__init__(self, distributed=distributed)
        self.cap_bytes = cap_bytes
        self.now = 0  # running total, for the cap (the reported peaks come from the tracker's replay)
        self._start = 0

    def _new(self, st, key: int, category, op: str):
        rec = super()._new(st, key, category, op)
        self._grow(rec.nbytes)
        return rec

    def _resize(self, rec, nbytes: int) -> None:
        self._grow(nbytes - rec.nbytes)
        super()._resize(rec, nbytes)

    def _free(self, key: int) -> None:
        rec = self.live.get(key)
        if rec is not None:
            self.now -= rec.nbytes
        super()._free(key)

    def _grow(self, n: int) -> None:
        self.now += n
        if self.cap_bytes is not None and self.now > self.cap_bytes:
            raise torch.OutOfMemoryError(
                f"simulated out of memory: {self.now} live bytes exceed the cap of {self.cap_bytes} "
                f"(cpu meter, phase {self.current.value})")

    def on_phase(self, phase: Phase) -> None:
        self.phase(phase)

    def reset_peak(self) -> None:
        self._start = self.mark()

    def allocated_bytes(self) -> int:
        return self.now

    def readings(self) -> dict:
        # No caching allocator and no CUDA context on the CPU: reserved and device are not measured.
        peak = self.peak(self._start)
        return {"peak_allocated_bytes": peak.allocated, "peak_reserved_bytes": None, "peak_device_bytes": None,
                "phases": {p.value: b for p, b in peak.phases.items()}}


def _nvml_handle(index: int):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None, None


class CudaMeter(Meter):
    """CUDA allocator statistics per phase, plus NVML device memory and the context it implies."""

    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device
        self.phase: Phase = Phase.LOAD
        self.phase_peaks: dict[Phase, int] = {}
        self.max_reserved = 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        # NVML before this process touches CUDA: what other processes already hold.
        self.nvml, self.handle = _nvml_handle(index)
        self.nvml_baseline_bytes = self._nvml_used()
        self.workspace_bytes: int | None = None

    def _nvml_used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def nvml_process_bytes(self) -> int | None:
        """This process's device memory as NVML counts it (context included); None where hidden."""
        if self.handle is None:
            return None
        try:
            for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return int(p.usedGpuMemory)
        except Exception:
            pass
        used = self._nvml_used()  # containers hide pids: fall back on the device-wide change
        return None if used is None or self.nvml_baseline_bytes is None else used - self.nvml_baseline_bytes

    def __enter__(self) -> CudaMeter:
        torch.cuda.init()
        torch.cuda.set_device(self.device)
        # cuBLAS workspace: allocated through torch's allocator when the first handle is made.
        before = torch.cuda.memory_allocated(self.device)
        a = torch.ones(64, 64, device=self.device)
        b = a @ a
        torch.cuda.synchronize(self.device)
        self.workspace_bytes = torch.cuda.memory_allocated(self.device) - before - 2 * round_block(64 * 64 * 4)
        del a, b
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _close_phase(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), peak)
        self.max_reserved = max(self.max_reserved, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def on_phase(self, phase: Phase) -> None:
        # Allocation happens on the host when a kernel is queued, so the statistics need no sync.
        self._close_phase()
        self.phase = phase

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.phase_peaks = {}
        self.max_reserved = 0

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def readings(self) -> dict:
        torch.cuda.synchronize(self.device)
        self._close_phase()
        allocated = max(self.phase_peaks.values(), default=0)
        reserved = self.max_reserved
        # NVML cannot see a peak between samples; at this instant it shows reserved + context, so
        # the context is their difference, and the device peak is the reserved peak plus it.
        process = self.nvml_process_bytes()
        reserved_now = torch.cuda.memory_reserved(self.device)
        context = None if process is None else process - reserved_now
        return {
            "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved,
            "peak_device_bytes": None if context is None else reserved + context,
            "context_bytes": context, "workspace_bytes": self.workspace_bytes,
            "nvml_process_bytes": process, "nvml_used_bytes": self._nvml_used(),
            "nvml_baseline_bytes": self.nvml_baseline_bytes, "reserved_at_nvml_bytes": reserved_now,
            "phases": {p.value: b for p, b in self.phase_peaks.items()},
        }
