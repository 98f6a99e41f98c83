"""One pipeline from tensor bytes to an `Estimate`, whichever tier counted the bytes.

A tier (an `Estimator` in `ESTIMATORS`) answers one question: which tensors are live at the peak of
a training step, by phase and category (`TensorPeak`). `finish` does everything else, the same way
for every tier: it picks the GPU family and applies its calibration correction (once), adds the
overheads (cuBLAS workspace where the tier cannot see it, allocator slack, CUDA context), gives the
verdict and searches the largest batch and sequence that fit. So the tiers cannot drift apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Protocol

from memplan import analytic, arch, corrections, hardware, profile
from memplan.errors import MemplanError
from memplan.options import Attention, Config
from memplan.overhead import add_overheads, nccl_bytes, workspace_bytes
from memplan.result import Category, Estimate, GpuRef, Phase, Tier
from memplan.spec import ModelSpec, resolve

SEARCH_LIMIT = 1 << 24  # no batch or seq search beyond 16M


@dataclass(frozen=True)
class TensorPeak:
    """What a tier counted: tensor bytes at the peak of one step, by category, and the peak of each phase.

    `workspace_counted` says whether `components` and `phases` already hold the cuBLAS workspace
    (the analytic tier models it per phase); when False, `finish` adds it, from the same corrected
    family, to the peak and to every phase.
    """

    phase: Phase
    components: dict[Category, int]
    phases: dict[Phase, int]
    model: str
    trainable_params: int = 0
    total_params: int = 0
    warnings: tuple[str, ...] = ()
    workspace_counted: bool = True
    host_bytes: int = 0  # host memory the step needs (offloaded state, activations); not in `components`


class Estimator(Protocol):
    """A tier: the tensor bytes of one configuration on a GPU family (already corrected)."""

    tier: Tier

    def tensor_peak(self, cfg: Config, spec: ModelSpec | None, fam: hardware.Family) -> TensorPeak: ...


@dataclass(frozen=True)
class ConfigOnly:
    """A model memplan has no tensor table for: its name and config dict, which is all a profile needs."""

    name: str
    config: dict
    model_type: str

    @property
    def max_positions(self) -> int:
        return profile.context_length(self.config)


def model_of(model: str) -> ModelSpec | ConfigOnly:
    """The spec of what the user typed; for a config.json of a type without a tensor table, its config
    alone (estimated from a traced profile)."""
    from memplan.build import model_config_dict

    try:
        return resolve(model)
    except MemplanError:
        name, config = model_config_dict(model)  # raises the same error where nothing can be read
        if arch.find(config.get("model_type")) is not None:
            raise
        return ConfigOnly(name, config, str(config["model_type"]))


def hand_formulas(spec) -> bool:
    """Whether memplan has closed-form activations for the spec's family (`memplan.arch`)."""
    return isinstance(spec, ModelSpec) and arch.find(spec.model_type) is not None


def traced_first(spec) -> bool:
    """Whether the spec's exact answer is a profile traced on first use (torch) rather than closed-form
    formulas: a table family's (its formulas are borrowed), or any model outside the catalog (the hand
    formulas are checked on catalog models at real widths, calibration/HAND-VS-PROFILE.md; a config.json
    or hub id of the same family may be shaped in ways they were not checked on)."""
    if not isinstance(spec, ModelSpec):
        return False
    found = spec.memo.get("traced_first")
    if found is None:
        from memplan.spec import catalog_ids

        found = spec.memo["traced_first"] = bool(spec.arch.activations_note) or spec.name not in catalog_ids()
    return found


def approximate(spec) -> bool:
    """Whether the spec's closed-form activations are borrowed from another family (a table type's
    generic formulas, `memplan.arch._generic`): such a family is traced once on first use instead."""
    return isinstance(spec, ModelSpec) and bool(spec.arch.activations_note)


# Tracing a missing profile on first use (table families, models outside the catalog; torch installed): on unless the user says
# MEMPLAN_TRACE=never, and off inside `formulas_only()`: suggestions try many changed options, each of
# which would be a trace, so for a table family they compare its formulas with its formulas.
TRACE_ENV = "MEMPLAN_TRACE"
_first_use = contextvars.ContextVar("memplan_first_use_trace", default=True)


@contextlib.contextmanager
def formulas_only():
    """Within: no profile is traced on first use; table families answer from their formulas."""
    token = _first_use.set(False)
    try:
        yield
    finally:
        _first_use.reset(token)


def _tracing_off() -> bool:
    """MEMPLAN_TRACE=never; MemplanError for a value other than auto or never."""
    value = os.environ.get(TRACE_ENV, "").strip().lower()
    if value not in ("", "auto", "never"):
        raise MemplanError(f"{TRACE_ENV}={value!r}: valid values are auto (the default) and never")
    return value == "never"


def traces_on_first_use() -> bool:
    """Whether a missing profile of a table family is traced now (see `TRACE_ENV`)."""
    return _first_use.get() and not _tracing_off() and _have_torch()


@dataclass(frozen=True)
class AnalyticTier:
    """Closed-form phases: a stored profile's formulas of batch and seq (`memplan.profile`) where one
    exists for the configuration, else the hand formulas of `analytic.peak`; microseconds, no torch.
    A family without hand formulas gets its profile traced on first use (torch) and cached."""

    tier: Tier = Tier.ANALYTIC

    def tensor_peak(self, cfg: Config, spec: ModelSpec | None, fam: hardware.Family) -> TensorPeak:
        spec = spec or model_of(cfg.model)
        failed = None
        try:
            found = profiled_peak(cfg, spec)
        except MemplanError as e:
            if not traced_first(spec) or not traces_on_first_use():
                raise
            found, failed = None, e  # the trace could not run these options: the formulas answer, and say so
        if found is not None:
            return found
        phase, comps, totals = analytic.peak(cfg, spec, fam)
        notes = (spec.arch.activations_note,) if spec.arch.activations_note else ()
        if failed is not None:
            notes += (f"tracing exact activations failed ({failed}), so these are approximate",)
        return TensorPeak(phase, comps, totals, spec.name, analytic.trainable(cfg, spec).params, spec.param_count,
                          warnings=notes, host_bytes=analytic.host_bytes(cfg, spec))


def profiled_peak(cfg: Config, spec, *, make: bool | None = None) -> TensorPeak | None:
    """The tensor bytes from the configuration's profile; None where the hand formulas answer instead.

    `make`: trace a missing profile now (default: `_traces_now`)."""
    hand = hand_formulas(spec)
    if hand and not _one_device(cfg):  # a profile is one GPU's step; the layouts are the hand formulas' stage
        return None
    if traced_first(spec) and not _first_use.get():  # `formulas_only`: compare like with like
        return None
    if make is None:
        make = _traces_now(spec)
        if not hand and not make and profile.find(spec.config, cfg) is None:
            if _have_torch():  # a type transformers does not know says so first
                from memplan.build import hf_config

                hf_config(cfg)
            raise MemplanError(f"{spec.name}: memplan has no closed-form activations for model_type "
                               f"{spec.model_type!r} and tracing them is off ({TRACE_ENV}=never)")
    prof = profile.find(spec.config, cfg)
    if prof is None and make:
        prof = make_profile(cfg, spec, at=(cfg.batch, cfg.seq))
    if prof is None:
        return None
    peak = prof.peak(cfg.batch, cfg.seq)
    if peak is None and make and _have_torch():
        prof = make_profile(cfg, spec, into=prof, at=(cfg.batch, cfg.seq))  # trace its regime, keep it
        peak = prof.peak(cfg.batch, cfg.seq)
    if peak is None:
        if hand:
            return None
        raise MemplanError(f"{spec.name}: batch {cfg.batch} x seq {cfg.seq} lies outside the traced profile's "
                           f"regimes ({'; '.join(r.when for r in prof.regimes)}); `memplan trace` counts it")
    comps = {c: peak.components.get(c, 0) for c in _TENSOR_CATEGORIES}
    return TensorPeak(peak.phase, comps, dict(peak.phases), spec.name, prof.trainable_params, prof.total_params,
                      prof.warnings, workspace_counted=False,
                      host_bytes=analytic.host_bytes(cfg, spec) if hand else 0)


def _one_device(cfg: Config) -> bool:
    """One GPU, nothing sharded or offloaded: the step a trace (and so a profile) runs."""
    from memplan.options import Offload, Sharding

    return cfg.num_gpus == 1 and cfg.nodes == 1 and cfg.offload is Offload.NONE \
        and cfg.sharding.resolved(cfg.num_gpus) is Sharding.NONE


def _have_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def make_profile(cfg: Config, spec, *, into: profile.Profile | None = None,
                 at: tuple[int, int] | None = None) -> profile.Profile:
    """Trace the configuration's profile (torch) and cache it; without torch, say what to install.
    `at`: only the regime of that (batch, seq) for now (`into`: added to a stored profile); default:
    every regime of the (batch, seq) grid."""
    if not _have_torch():
        if arch.find(spec.model_type) is None:
            raise MemplanError(f"{spec.name}: memplan has no closed-form activations for model_type "
                               f"{spec.model_type!r}; they are traced once and cached, which needs torch: "
                               f"pip install 'memplan[torch]'")
        raise MemplanError(f"{spec.name}: tracing a profile needs torch: pip install 'memplan[torch]'")
    from memplan.symbolic import build_profile

    refuse = analytic.not_modelled(cfg)
    if refuse:
        raise MemplanError(refuse)
    if profile.announce is not None:
        profile.announce(f"tracing {spec.name} {cfg.method.value} once at batch {at[0] if at else cfg.batch} x seq "
                       f"{at[1] if at else cfg.seq} (exact activations; cached for later answers)")
    prof = build_profile(cfg, into=into, at=at)
    profile.store(spec.config, cfg, prof)
    return prof


def _traces_now(spec) -> bool:
    """Whether a missing profile of the spec is traced now: for a type with no hand formulas unless
    tracing is off; for one with them, where its answer is traced first (`traced_first`) and tracing is
    on (`traces_on_first_use`)."""
    if hand_formulas(spec):
        return traced_first(spec) and traces_on_first_use()
    return not _tracing_off()


def missing_profiles(configs: list[Config]) -> list[Config]:
    """The configurations (as they run) whose estimate would trace a profile on first use now."""
    out = []
    for cfg in configs:
        try:
            spec = model_of(cfg.model)
            cfg, _ = eager_without_sdpa(cfg, spec)
            if hand_formulas(spec) and not _one_device(cfg) or analytic.not_modelled(cfg):
                continue
            if _traces_now(spec) and profile.find(spec.config, cfg) is None:
                out.append(cfg)
        except MemplanError:
            continue  # the estimate itself will say what is wrong
    profile._LOADED.clear()  # the misses just memoised are about to be filled
    return out


def prefetch_profiles(configs: list[Config], *, workers: int | None = None) -> int:
    """Trace the missing profiles of several configurations at once, each in its own Python process
    (each one's regime of its batch and seq, and of batch 2 where that is 1: a max-batch search goes
    there), into the cache the estimates then read. `workers`: default half the CPUs, at most 4 (each
    holds torch and a fake model). Returns how many were traced; a failure is left for the estimate to
    report. Plain subprocesses, not multiprocessing: nothing of the caller's script is imported again."""
    todo = missing_profiles(configs)
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // 2))
    workers = min(workers, len(todo))
    if workers < 2:
        return 0
    import subprocess  # only when there is something to trace: fit on a catalog model stays light
    import sys
    from concurrent.futures import ThreadPoolExecutor

    if profile.announce is not None:
        profile.announce(f"tracing {len(todo)} configurations once, {workers} at a time (exact activations; "
                         f"cached for later answers)")

    def one(cfg: Config) -> bool:
        done = subprocess.run([sys.executable, "-c", "from memplan.pipeline import _prefetch_one; _prefetch_one()"],
                              input=cfg.model_dump_json(), text=True, capture_output=True)
        return done.returncode == 0

    with ThreadPoolExecutor(workers) as pool:
        traced = sum(pool.map(one, todo))
    profile._LOADED.clear()
    return traced


def _prefetch_one() -> None:
    """A worker of `prefetch_profiles`: the Config on stdin; exit code 1 where it could not be traced."""
    import sys

    try:
        cfg = Config.model_validate_json(sys.stdin.read())
        spec = model_of(cfg.model)
        prof = make_profile(cfg, spec, at=(cfg.batch, cfg.seq))
        if cfg.batch == 1 and prof.peak(2, cfg.seq) is None:
            make_profile(cfg, spec, into=prof, at=(2, cfg.seq))
    except MemplanError:
        raise SystemExit(1) from None


@dataclass(frozen=True)
class TraceTier:
    """The real step on fake tensors (`tracing.trace_step`); imports torch when it runs."""

    tier: Tier = Tier.TRACE
    on_phase: object = None  # a callable(label, Phase) for a live status line

    def tensor_peak(self, cfg: Config, spec: ModelSpec | None, fam: hardware.Family) -> TensorPeak:
        from memplan.steps import model_config_dict
        from memplan.tracing import trace_step

        traced = trace_step(cfg, on_phase=self.on_phase)
        peak = traced.peak
        comps = {c: peak.components.get(c, 0) for c in _TENSOR_CATEGORIES}
        name = spec.name if spec is not None else model_config_dict(cfg.model)[0]
        # cuBLAS workspaces are allocated inside kernels: the tracer sees no op output for them.
        return TensorPeak(peak.phase, comps, dict(peak.phases), name, traced.trainable_params, traced.total_params,
                          tuple(traced.warnings), workspace_counted=False, host_bytes=peak.host_bytes)


def measured_peak(cfg: Config, model: str, phase: Phase, components: dict[Category, int],
                  phases: dict[Phase, int] | None = None) -> TensorPeak:
    """A measured record's tensor bytes (a CPU live-bytes meter, say) through the same door."""
    comps = {c: components.get(c, 0) for c in _TENSOR_CATEGORIES}
    return TensorPeak(phase, comps, dict(phases or {phase: sum(comps.values())}), model,
                      workspace_counted=Category.WORKSPACE in components)


_TENSOR_CATEGORIES = tuple(c for c in Category if c not in (Category.CONTEXT, Category.ALLOCATOR))

ESTIMATORS: dict[Tier, Estimator] = {Tier.ANALYTIC: AnalyticTier(), Tier.TRACE: TraceTier()}


def estimator(tier: str | Tier) -> Estimator:
    """The registered estimator of a tier; MemplanError for a tier that cannot estimate on its own."""
    from memplan.errors import unknown

    try:
        return ESTIMATORS[Tier(tier)]
    except (KeyError, ValueError):
        raise unknown("tier", str(tier), [t.value for t in ESTIMATORS]) from None


# ---- the pipeline ------------------------------------------------------------------------------


def family_of(gpu: hardware.Gpu | None) -> tuple[hardware.Family, str | None]:
    """The GPU's family with its calibration correction applied (the one place that applies it), and the
    correction's source (None when no calibration covers the family)."""
    fam = hardware.family(gpu.family if gpu else "default")
    correction = corrections.for_family(fam.name)
    return corrections.apply(fam, correction), (correction.get("source") if correction else None)


def gpu_ref(gpu: hardware.Gpu) -> GpuRef:
    return GpuRef(name=gpu.name, total_bytes=gpu.total_bytes, family=gpu.family, detected=gpu.detected)


def _with_workspace(peak: TensorPeak, cfg: Config, fam: hardware.Family) -> tuple[dict, dict]:
    if peak.workspace_counted:
        return dict(peak.components), dict(peak.phases)
    # One workspace per (handle, stream); autograd's backward thread holds a second handle.
    ws = workspace_bytes(fam, backward=cfg.method.is_fo)
    comps = dict(peak.components)
    comps[Category.WORKSPACE] = comps.get(Category.WORKSPACE, 0) + ws
    return comps, {ph: n + ws for ph, n in peak.phases.items()}


def _warnings(peak: TensorPeak, cfg: Config, spec: ModelSpec | None) -> list[str]:
    out = []
    if spec is not None and cfg.seq > spec.max_positions:
        out.append(f"seq {cfg.seq} is beyond {spec.name}'s {spec.max_positions} positions")
    if cfg.host_memory and peak.host_bytes > cfg.host_memory_bytes:
        out.append(f"the step needs {peak.host_bytes / 2**30:.1f} GiB of host memory per machine; "
                   f"--host-memory is {cfg.host_memory:g} GiB")
    if cfg.grad_checkpointing and not cfg.method.is_fo:
        out.append(f"--grad-checkpointing has no effect on {cfg.method.value} (no backward pass)")
    from memplan.savers import notes

    out += notes(cfg, spec)
    return out + [w for w in peak.warnings if w not in out]


def finish(peak: TensorPeak, cfg: Config, spec: ModelSpec | None, gpu: hardware.Gpu | None, *,
           tier: Tier = Tier.ANALYTIC, search: bool = True, family: hardware.Family | None = None) -> Estimate:
    """The Estimate of a tier's tensor bytes: overheads, views, verdict, and (search) max batch and seq.

    `family` replaces the GPU's corrected family (the calibration report compares raw constants and a
    CPU meter's empty overheads). The max batch / seq search runs the analytic tier, so only an
    analytic estimate gets one (a traced max batch would be a dozen traces).
    """
    fam, source = family_of(gpu) if family is None else (family, None)
    comps, phases = _with_workspace(peak, cfg, fam)
    comps, allocated, reserved, device = add_overheads(comps, fam, nccl_bytes(cfg.num_gpus))
    est = Estimate.model_construct(  # built from validated values: skip re-validation (sweeps are hot)
        model=peak.model, method=cfg.method, scheme=cfg.scheme, dtype=cfg.dtype, batch=cfg.batch, seq=cfg.seq,
        attention=cfg.attention, tier=tier, peak_phase=peak.phase, components=comps, phases=phases,
        peak_allocated_bytes=allocated, peak_reserved_bytes=reserved, peak_device_bytes=device,
        host_bytes=peak.host_bytes, trainable_params=peak.trainable_params, total_params=peak.total_params, correction=source,
        warnings=_warnings(peak, cfg, spec), gpu=None, fits=None, headroom_bytes=None, max_batch=None,
        max_seq=None, config=cfg,
    )
    if gpu is not None:
        judge(est, gpu)
        if search and tier is Tier.ANALYTIC:
            spec = spec or model_of(cfg.model)
            est.max_batch = largest(cfg, spec, gpu, "batch")
            est.max_seq = largest(cfg, spec, gpu, "seq")
    return est


def judge(est: Estimate, gpu: hardware.Gpu) -> Estimate:
    """Set the verdict of an estimate against a GPU (device view) and, when `host_memory` is given, of its
    host bytes against the machine's memory."""
    est.gpu = gpu_ref(gpu)
    est.headroom_bytes = gpu.total_bytes - est.peak_device_bytes
    est.fits = est.headroom_bytes >= 0 and host_fits(est)
    return est


def host_fits(est: Estimate) -> bool:
    """Whether the host holds `host_bytes` (True when `host_memory` is not given)."""
    cfg = est.config
    return cfg is None or not cfg.host_memory or est.host_bytes <= cfg.host_memory_bytes


def estimate_config(cfg: Config, gpu: hardware.Gpu | None = None, *, search: bool = True,
                    spec: ModelSpec | None = None, tier: str | Tier = Tier.ANALYTIC,
                    family: hardware.Family | None = None) -> Estimate:
    """The estimate of one configuration by a tier; with a GPU: verdict, headroom, max batch and seq.

    `family` replaces the GPU's corrected family, as in `finish`."""
    est = estimator(tier)
    if est.tier is Tier.ANALYTIC:
        spec = spec or model_of(cfg.model)
    cfg, note = eager_without_sdpa(cfg, spec)
    fam = family or family_of(gpu)[0]
    out = finish(est.tensor_peak(cfg, spec, fam), cfg, spec, gpu, tier=est.tier, search=search, family=family)
    if note:
        out.warnings.insert(0, note)
    return out


def eager_without_sdpa(cfg: Config, spec) -> tuple[Config, str | None]:
    """(the configuration as it runs, a note): `--attention sdpa` on a type transformers has no SDPA
    attention for (gemma2, bloom) runs eager, as transformers picks when none is asked for."""
    if cfg.attention is not Attention.SDPA:
        return cfg, None
    from memplan import tables

    model_type = getattr(spec, "model_type", None)
    if model_type is None or hand_formulas(spec) and not approximate(spec):
        return cfg, None  # (the hand families all have SDPA: their tables are not read)
    if tables.has_sdpa(model_type):
        return cfg, None
    return cfg.replace(attention=Attention.EAGER), (
        f"{model_type} has no SDPA attention in transformers; it runs eager attention (what transformers "
        f"picks when none is asked for), and this estimate is eager's")


def device_bytes(cfg: Config, spec: ModelSpec, gpu: hardware.Gpu | None) -> int:
    """Peak device bytes of one configuration, analytic tier (the number a fit verdict uses)."""
    fam, _ = family_of(gpu)
    comps, _ = _with_workspace(ESTIMATORS[Tier.ANALYTIC].tensor_peak(cfg, spec, fam), cfg, fam)
    return add_overheads(comps, fam, nccl_bytes(cfg.num_gpus))[3]


def largest(cfg: Config, spec: ModelSpec, gpu: hardware.Gpu, field: str, budget: int | None = None) -> int:
    """Largest value of `field` (batch or seq) whose peak is within `budget` (default: the whole GPU).

    Exponential then binary search; the peak grows monotonically with batch and seq, so the boundary is exact.
    """
    budget = gpu.total_bytes if budget is None else budget

    def fits(n: int) -> bool:
        return device_bytes(cfg.model_copy(update={field: n}), spec, gpu) <= budget

    # From 2 up: fits(2) implies fits(1), so 1 is asked only when 2 does not fit (a profile's b == 1 or
    # s == 1 regime is then the only one a search may have to trace)
    if not fits(2):
        return 1 if fits(1) else 0
    lo, hi = 2, 4
    while hi <= SEARCH_LIMIT and fits(hi):
        lo, hi = hi, hi * 2
    if hi > SEARCH_LIMIT:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---- the Python API ----------------------------------------------------------------------------


def resolve_gpu(name: str | hardware.Gpu | None) -> hardware.Gpu | None:
    """A GPU by name, `auto`, or (None) the local GPU when NVML finds one, else None."""
    from memplan.errors import MemplanError

    if name is None:
        found = hardware.detect()
        return found[0] if found else None
    if isinstance(name, hardware.Gpu):
        return name
    if not isinstance(name, str):
        raise MemplanError(f"gpu: a GPU name (`memplan gpus` lists them) or 'auto', got {name!r}")
    return hardware.get_gpu(name)


def estimate(model: str, method: str = "zo-sgd", *, gpu: str | hardware.Gpu | None = None, search: bool = True,
             **options) -> Estimate:
    """Estimate one configuration: `estimate("opt-13b", "zo-sgd", batch=16, seq=512, gpu="a100-80gb")`.

    Options are `Config` fields (scheme, dtype, batch, seq, attention, lora_rank, ...). Every bad argument
    raises `MemplanError` with a one-line message. One method per call: `estimate_all` takes `all` or a list.
    """
    from memplan.errors import MemplanError

    if isinstance(method, str) and method.strip().lower() == "all":
        raise MemplanError("method: 'all' is not one method; use memplan.estimate_all(model, 'all', ...), "
                           "which returns a list")
    cfg = Config.make(model=model, method=method, **options)
    return estimate_config(cfg, resolve_gpu(gpu) if gpu is not None else None, search=search)


def estimate_all(model: str, methods="all", *, gpu: str | hardware.Gpu | None = None, search: bool = True,
                 **options) -> list[Estimate]:
    """One estimate per method: `methods` is `all`, a comma-separated string, or a list of names."""
    from memplan.options import parse_methods

    names = [methods] if isinstance(methods, str) else methods
    the_gpu = resolve_gpu(gpu) if gpu is not None else None
    cfgs = [Config.make(model=model, method=m, **options) for m in parse_methods(names, where="methods")]
    spec = model_of(cfgs[0].model)
    if len(cfgs) > 1:
        prefetch_profiles(cfgs)  # several first uses of a table family: traced side by side
    return [estimate_config(c, the_gpu, search=search, spec=spec) for c in cfgs]


def each(configs: list, estimate, *, leave_out_refused: bool) -> tuple[list, list[str]]:
    """(`estimate(config)` of each config, notes). With `leave_out_refused` (a user asked for every
    method), a config whose method refuses the options (bad input for that method alone) is left out
    with a note, as long as one remains; otherwise the refusal is the answer."""
    out, notes, first = [], [], None
    for cfg in configs:
        try:
            out.append(estimate(cfg))
        except MemplanError as e:
            if not leave_out_refused:
                raise
            first = first or e
            notes.append(f"{cfg.method.value} left out: {e}")
    if not out:
        raise first
    return out, notes
