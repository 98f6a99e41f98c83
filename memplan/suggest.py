"""What would make a configuration fit: the smallest changes, each computed by the estimator."""

from __future__ import annotations

from memplan import hardware
from memplan.result import Estimate
from memplan.options import Config, Method, Scheme
from memplan.spec import ModelSpec


def _config_of(est: Estimate, base: Config | None) -> Config:
    fields = dict(method=est.method, scheme=est.scheme, dtype=est.dtype, batch=est.batch, seq=est.seq,
                  attention=est.attention)
    return base.replace(**fields) if base else Config(model=est.model, **fields)


def fixes(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu, base: Config | None = None) -> list[tuple[str, int]]:
    """(change, device bytes after it) for each single change that makes `est` fit on `gpu`."""
    from memplan.api import device_bytes

    cfg = _config_of(est, base)
    out: list[tuple[str, int]] = []

    def attempt(label: str, **update) -> None:
        n = device_bytes(cfg.replace(**update), spec, gpu)
        if n <= gpu.total_bytes:
            out.append((label, n))

    if est.max_batch:
        attempt(f"--batch {est.max_batch}", batch=est.max_batch)
    if est.max_seq:
        attempt(f"--seq {est.max_seq}", seq=est.max_seq)
    if cfg.method.is_fo and not cfg.grad_checkpointing:
        attempt("--grad-checkpointing", grad_checkpointing=True)
    if cfg.attention.value == "eager":
        attempt("--attention sdpa", attention="sdpa")
    if cfg.scheme is Scheme.FT:
        attempt("--scheme lora", scheme=Scheme.LORA)
    if cfg.method is not Method.ZO_SGD:
        attempt("--method zo-sgd", method=Method.ZO_SGD)
    # The smallest catalog GPU that holds it unchanged.
    from memplan.api import estimate_config

    for other in sorted(hardware.catalog(), key=lambda g: g.total_bytes):
        if other.total_bytes > gpu.total_bytes:
            n = estimate_config(cfg, other, search=False, spec=spec).peak_device_bytes
            if n <= other.total_bytes:
                out.append((f"--gpu {other.name}", n))
                break
    return out


def suggestions(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu | None, base: Config | None = None) -> list[str]:
    """Readable lines: what would make a non-fitting estimate fit."""
    if gpu is None or est.fits is not False:
        return []
    found = fixes(est, spec, gpu, base)
    if not found:
        return [f"{est.method.value}: no single change found that makes it fit on {gpu.name}"]
    parts = ", ".join(f"{label} ({n / (1 << 30):.1f} GiB)" for label, n in found)
    return [f"{est.method.value} would fit with: {parts}"]
