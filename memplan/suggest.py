"""What would make a configuration fit: the smallest changes, each computed by the estimator."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memplan import hardware
from memplan.errors import MemplanError
from memplan.margin import Margin
from memplan.options import Attention, Loss, Method, Optim, Scheme
from memplan.result import GIB, Estimate
from memplan.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class Fix:
    """One change (a Config field, or `gpu`) and the peak device bytes after it."""

    field: str
    value: object
    peak_device_bytes: int

    @property
    def flag(self) -> str:
        """As `memplan fit` spells it: `--batch 4`, `--grad-checkpointing`."""
        name = "--" + self.field.replace("_", "-")
        return name if self.value is True else f"{name} {self.value}"

    @property
    def key(self) -> str:
        """As a plan file spells it: `batch: 4`, `grad_checkpointing: true`, `gpus: [a100-80gb]`."""
        if self.field == "gpu":
            return f"gpus: [{self.value}]"
        return f"{self.field}: {'true' if self.value is True else self.value}"

    def to_json_dict(self) -> dict:
        return {"field": self.field, "value": self.value, "peak_device_bytes": self.peak_device_bytes}


def fixes(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu, margin: Margin | None = None) -> list[Fix]:
    """Each single change that makes `est` fit on `gpu` (within `margin`), least disruptive first.

    Order: kernels and recomputation keep the training maths; then a smaller batch or seq (the
    largest that fits), a PEFT scheme, a ZO method; last, the smallest catalog GPU that holds it.
    Each change is made to the configuration the estimate carries (`est.config`), every option kept.
    """
    from memplan.pipeline import device_bytes, largest as _largest

    margin = margin or Margin()
    budget = margin.budget(gpu.total_bytes)
    cfg = est.config
    out: list[Fix] = []

    def attempt(field: str, value, **along) -> None:
        try:
            n = device_bytes(cfg.replace(**{field: value}, **along), spec, gpu)
        except MemplanError:  # a change this configuration's other options refuse
            return
        if n <= budget:
            out.append(Fix(field, value.value if isinstance(value, Enum) else value, n))

    if cfg.attention is not Attention.SDPA:
        attempt("attention", Attention.SDPA)
    for field, value in savers(cfg, spec):
        attempt(field, value)
    for field, known in (("batch", est.max_batch), ("seq", est.max_seq)):
        # est.max_* were searched against the whole GPU; a margin needs its own search.
        n = known if known is not None and budget == gpu.total_bytes else _largest(cfg, spec, gpu, field, budget)
        if 0 < n < getattr(cfg, field):
            attempt(field, n)
    if cfg.scheme is Scheme.FT:
        attempt("scheme", Scheme.LORA)
    if cfg.method is not Method.ZO_SGD:
        # The first-order savers do not carry over to ZO: the switch drops them.
        attempt("method", Method.ZO_SGD, optim=Optim.FOREACH, activation_offload=False, optimizer_in_backward=False)
    for other in sorted(hardware.catalog(), key=lambda g: g.total_bytes):
        if other.total_bytes > gpu.total_bytes:
            n = device_bytes(cfg, spec, other)
            if n <= margin.budget(other.total_bytes):
                out.append(Fix("gpu", other.name, n))
                break
    return out


def savers(cfg, spec: ModelSpec) -> list[tuple[str, object]]:
    """The memory savers that keep the training maths and apply to `cfg`, as (field, value): the
    chunked loss, recomputation, the optimizer's implementation, optimizer in backward, offloading."""
    out: list[tuple[str, object]] = [("loss", Loss.CHUNKED)] if cfg.loss is Loss.FULL else []
    if cfg.method.is_fo:
        if not cfg.grad_checkpointing:
            out.append(("grad_checkpointing", True))
        if cfg.method is Method.FO_ADAM:
            if cfg.optim is Optim.FOREACH:
                out.append(("optim", Optim.FUSED))
            if cfg.optim not in (Optim.EIGHT_BIT, Optim.PAGED_8BIT):
                out += [("optim", Optim.EIGHT_BIT), ("optim", Optim.PAGED_8BIT)]
        if not cfg.optimizer_in_backward:
            out.append(("optimizer_in_backward", True))
        if not cfg.activation_offload:
            out.append(("activation_offload", True))
    return [(f, v) for f, v in out if _valid(cfg, spec, f, v)]


def _valid(cfg, spec: ModelSpec, field: str, value) -> bool:
    """Whether `cfg` with `field` changed is a configuration the estimator takes."""
    from memplan.errors import MemplanError
    from memplan.savers import refusal

    try:
        changed = cfg.replace(**{field: value})
    except (MemplanError, ValueError):
        return False
    if refusal(changed) is not None:
        return False
    if field == "loss":
        from memplan.arch._common import chunked_loss_refusal

        return chunked_loss_refusal(changed, masked=spec.arch.objective == "masked") is None
    return True


def savings(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu | None = None) -> list[tuple[Fix, int]]:
    """Each saver that applies to `est`'s configuration with the bytes it saves (peak device view),
    largest saving first; the analytic tier on the changed configuration."""
    from memplan.pipeline import device_bytes

    cfg = est.config
    base = device_bytes(cfg, spec, gpu)
    out = []
    for field, value in savers(cfg, spec):
        n = device_bytes(cfg.replace(**{field: value}), spec, gpu)
        if n < base:
            out.append((Fix(field, value.value if isinstance(value, Enum) else value, n), base - n))
    return sorted(out, key=lambda fs: -fs[1])


def describe(found: list[Fix], *, plan_keys: bool = False) -> str:
    """`--batch 4 (21.3 GiB), --scheme lora (...)`: flags for `fit`, keys for a plan file."""
    return ", ".join(f"{f.key if plan_keys else f.flag} ({f.peak_device_bytes / GIB:.1f} GiB)" for f in found)


def suggestions(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu | None) -> list[str]:
    """Readable lines: what would make a non-fitting estimate fit."""
    if gpu is None or est.fits is not False:
        return []
    found = fixes(est, spec, gpu)
    saved = savings(est, spec, gpu)
    lines = [f"{est.method.value} would fit with: {describe(found)}" if found
             else f"{est.method.value}: no single change found that makes it fit on {gpu.name}"]
    if saved:
        lines.append(f"{est.method.value} memory savers: " + ", ".join(
            f"`{fix.flag}` saves {n / GIB:.1f} GiB" for fix, n in saved))
    return lines
