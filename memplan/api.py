"""The Python API: `estimate(...)` returns an `Estimate`, judged against a GPU when one is given."""

from __future__ import annotations

from memplan import analytic, corrections, hardware
from memplan.errors import MemplanError
from memplan.result import Estimate, GpuRef, Tier
from memplan.options import Config, Method
from memplan.overhead import add_overheads
from memplan.spec import ModelSpec, resolve

SEARCH_LIMIT = 1 << 24  # no batch or seq search beyond 16M


def gpu_ref(gpu: hardware.Gpu) -> GpuRef:
    return GpuRef(name=gpu.name, total_bytes=gpu.total_bytes, family=gpu.family, detected=gpu.detected)


def _family(gpu: hardware.Gpu | None) -> hardware.Family:
    return hardware.family(gpu.family if gpu else "default")


def device_bytes(cfg: Config, spec: ModelSpec, gpu: hardware.Gpu | None) -> int:
    """Peak device bytes of one configuration (the number a fit verdict uses)."""
    fam = _family(gpu)
    correction = corrections.for_family(fam.name)
    _, comps, _ = analytic.peak(cfg, spec, corrections.apply(fam, correction))
    return add_overheads(comps, fam, correction=correction)[3]


def _largest(cfg: Config, spec: ModelSpec, gpu: hardware.Gpu, field: str, budget: int | None = None) -> int:
    """Largest value of `field` (batch or seq) whose peak is within `budget` (default: the whole GPU).

    Exponential then binary search; the peak grows monotonically with batch and seq, so the boundary is exact.
    """
    budget = gpu.total_bytes if budget is None else budget

    def fits(n: int) -> bool:
        return device_bytes(cfg.model_copy(update={field: n}), spec, gpu) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= SEARCH_LIMIT and fits(hi):
        lo, hi = hi, hi * 2
    if hi > SEARCH_LIMIT:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate_config(cfg: Config, gpu: hardware.Gpu | None = None, *, search: bool = True,
                    spec: ModelSpec | None = None) -> Estimate:
    """Analytic estimate of one configuration; with a GPU: verdict, headroom, max batch and seq."""
    spec = spec or resolve(cfg.model)
    fam = _family(gpu)
    correction = corrections.for_family(fam.name)
    phase, comps, totals = analytic.peak(cfg, spec, corrections.apply(fam, correction))
    comps, allocated, reserved, device = add_overheads(comps, fam, correction=correction)
    warnings = []
    if cfg.seq > spec.max_positions:
        warnings.append(f"seq {cfg.seq} is beyond {spec.name}'s {spec.max_positions} positions")
    if cfg.grad_checkpointing and not cfg.method.is_fo:
        warnings.append(f"--grad-checkpointing has no effect on {cfg.method.value} (no backward pass)")
    est = Estimate.model_construct(  # built from validated values: skip re-validation (sweeps are hot)
        model=spec.name, method=cfg.method, scheme=cfg.scheme, dtype=cfg.dtype, batch=cfg.batch, seq=cfg.seq,
        attention=cfg.attention, tier=Tier.ANALYTIC, peak_phase=phase, components=comps, phases=totals,
        peak_allocated_bytes=allocated, peak_reserved_bytes=reserved, peak_device_bytes=device,
        trainable_params=analytic.trainable(cfg, spec).params, total_params=spec.param_count,
        correction=correction.get("source") if correction else None, warnings=warnings,
        gpu=None, fits=None, headroom_bytes=None, max_batch=None, max_seq=None,
    )
    if gpu is not None:
        judge(est, gpu)
        if search:
            est.max_batch = _largest(cfg, spec, gpu, "batch")
            est.max_seq = _largest(cfg, spec, gpu, "seq")
    return est


def judge(est: Estimate, gpu: hardware.Gpu) -> Estimate:
    """Set the verdict of an estimate against a GPU (device view)."""
    est.gpu = gpu_ref(gpu)
    est.headroom_bytes = gpu.total_bytes - est.peak_device_bytes
    est.fits = est.headroom_bytes >= 0
    return est


def resolve_gpu(name: str | None) -> hardware.Gpu | None:
    """A GPU by name, `auto`, or (None) the local GPU when NVML finds one, else None."""
    if name is None:
        found = hardware.detect()
        return found[0] if found else None
    return hardware.get_gpu(name)


def estimate(model: str, method: str | Method = "zo-sgd", *, gpu: str | None = None, search: bool = True,
             **options) -> Estimate:
    """Estimate one configuration: `estimate("opt-13b", "zo-sgd", batch=16, seq=512, gpu="a100-80gb")`.

    Options are `Config` fields (scheme, dtype, batch, seq, attention, lora_rank, ...).
    """
    try:
        cfg = Config(model=model, method=method, **options)
    except TypeError as e:
        raise MemplanError(str(e)) from None
    return estimate_config(cfg, resolve_gpu(gpu) if gpu is not None else None, search=search)
