"""What would make a configuration fit: the smallest changes, each computed by the estimator."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memplan import hardware, quant
from memplan.errors import MemplanError
from memplan.margin import Margin
from memplan.options import Attention, Loss, Method, Offload, Optim, Quant, Scheme, Sharding
from memplan.result import GIB, Estimate
from memplan.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class Fix:
    """One change (a Config field, or `gpu`) and the peak device bytes (per GPU) after it; `also`: the
    other fields a layout change sets with it (`--sharding zero3` with `--num-gpus 4`)."""

    field: str
    value: object
    peak_device_bytes: int
    also: tuple[tuple[str, object], ...] = ()

    @property
    def changes(self) -> dict:
        """Every Config field the fix sets (empty for a GPU swap)."""
        return {} if self.field == "gpu" else {self.field: self.value, **dict(self.also)}

    @property
    def per_gpu(self) -> bool:
        return self.changes.get("num_gpus", 1) > 1

    @property
    def flag(self) -> str:
        """As `memplan fit` spells it: `--batch 4`, `--grad-checkpointing`, `--sharding zero3 --num-gpus 4`."""
        def one(field, value):
            name = "--" + field.replace("_", "-")
            return name if value is True else f"{name} {value}"

        return " ".join(one(f, v) for f, v in ((self.field, self.value), *self.also))

    @property
    def key(self) -> str:
        """As a plan file spells it: `batch: 4`, `grad_checkpointing: true`, `gpus: [a100-80gb]`."""
        if self.field == "gpu":
            return f"gpus: [{self.value}]"
        return ", ".join(f"{f}: {'true' if v is True else v}" for f, v in ((self.field, self.value), *self.also))

    def to_json_dict(self) -> dict:
        out = {"field": self.field, "value": self.value, "peak_device_bytes": self.peak_device_bytes}
        if self.also:
            out["also"] = dict(self.also)
        return out


def fixes(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu, margin: Margin | None = None) -> list[Fix]:
    """Each single change that makes `est` fit on `gpu` (within `margin`), least disruptive first.

    Order: kernels and recomputation keep the training maths; then a smaller batch or seq (the
    largest that fits), a PEFT scheme (or, already on adapters, a 4-bit base), a ZO method; last, the
    smallest catalog GPU that holds it.
    Each change is made to the configuration the estimate carries (`est.config`), every option kept.
    """
    from memplan.analytic import host_bytes
    from memplan.pipeline import device_bytes, largest as _largest

    margin = margin or Margin()
    budget = margin.budget(gpu.total_bytes)
    cfg = est.config
    out: list[Fix] = []

    def host_ok(c) -> bool:
        return not c.host_memory or host_bytes(c, spec) <= c.host_memory_bytes

    def attempt(field: str, value, **along) -> None:
        try:
            changed = cfg.replace(**{field: value}, **along)
            n = device_bytes(changed, spec, gpu)
        except MemplanError:  # a change the other options refuse (zo-sgd with --offload optimizer, say)
            return
        if n <= budget and host_ok(changed):
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
    elif cfg.quant is Quant.NONE and quant.refusal(cfg.replace(quant=Quant.NF4),
                                                   masked=spec.arch.objective == "masked") is None:
        attempt("quant", Quant.NF4)  # QLoRA: the frozen base in 4 bits
    if cfg.method is not Method.ZO_SGD:
        # The first-order savers do not carry over to ZO: the switch drops them.
        attempt("method", Method.ZO_SGD, optim=Optim.FOREACH, activation_offload=False, optimizer_in_backward=False)
    out.extend(layouts(cfg, spec, gpu, budget, host_ok))
    for other in sorted(hardware.catalog(), key=lambda g: g.total_bytes):
        if other.total_bytes > gpu.total_bytes and host_ok(cfg):
            n = device_bytes(cfg, spec, other)
            if n <= margin.budget(other.total_bytes):
                out.append(Fix("gpu", other.name, n))
                break
    return out


SHOWN_SAVING = GIB // 20  # savings are shown in GiB to one decimal

MORE_GPUS = (2, 4, 8, 16, 32, 64, 128, 256, 512)


def layouts(cfg, spec: ModelSpec, gpu: hardware.Gpu, budget: int, host_ok) -> list[Fix]:
    """Sharding, more GPUs and offload, each the least change of its kind that fits (per GPU):
    another sharding mode on the GPUs asked for; the fewest GPUs (a power of two) under fsdp or zero3
    (or the mode asked for, when it shards); offloading the optimizer state, then the parameters."""
    from memplan.pipeline import device_bytes

    def peak(**changes) -> int | None:
        try:
            changed = cfg.replace(**changes)
            n = device_bytes(changed, spec, gpu)
        except MemplanError:  # a layout these options cannot take
            return None
        return n if n <= budget and host_ok(changed) else None

    def fix(changes: dict, n: int) -> Fix:
        (field, value), *also = [(f, v.value if isinstance(v, Enum) else v) for f, v in changes.items()]
        return Fix(field, value, n, tuple(also))

    out: list[Fix] = []
    mode = cfg.sharding.resolved(cfg.num_gpus)
    shards = (Sharding.ZERO3, Sharding.FSDP)
    if cfg.num_gpus > 1:
        order = (Sharding.ZERO1, Sharding.ZERO2, Sharding.FSDP, Sharding.ZERO3) if cfg.method.is_fo else shards
        for other in (m for m in order if m is not mode):
            n = peak(sharding=other)
            if n is not None:
                out.append(fix({"sharding": other}, n))
                break
    modes = (mode,) if mode in (*shards, Sharding.ZERO1, Sharding.ZERO2) else (Sharding.FSDP, Sharding.ZERO3)
    found = []
    for m in modes:
        for gpus in (g for g in MORE_GPUS if g > cfg.num_gpus):
            n = peak(sharding=m, num_gpus=gpus)
            if n is not None:
                found.append((gpus, n, m))
                break
    if found:
        gpus, n, m = min(found, key=lambda t: (t[0], t[1]))
        out.append(fix({"sharding": m, "num_gpus": gpus} if m is not mode else {"num_gpus": gpus}, n))
    if cfg.offload is Offload.NONE:
        for offload in (Offload.OPTIMIZER, Offload.PARAMS):
            n = peak(offload=offload)
            if n is not None:
                out.append(fix({"offload": offload}, n))
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
    from memplan.analytic import not_modelled

    if refusal(changed) is not None or not_modelled(changed) is not None:
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
        if base - n >= SHOWN_SAVING:  # one that would print as "saves 0.0 GiB" is no saver here
            out.append((Fix(field, value.value if isinstance(value, Enum) else value, n), base - n))
    return sorted(out, key=lambda fs: -fs[1])


def describe(found: list[Fix], *, plan_keys: bool = False) -> str:
    """`--batch 4 (21.3 GiB), --sharding zero3 --num-gpus 4 (38.2 GiB per GPU)`: flags for `fit`, keys
    for a plan file."""
    return ", ".join(f"{f.key if plan_keys else f.flag} ({f.peak_device_bytes / GIB:.1f} GiB"
                     f"{' per GPU' if f.per_gpu else ''})" for f in found)


def suggestions(est: Estimate, spec: ModelSpec, gpu: hardware.Gpu | None) -> list[str]:
    """Readable lines: what would make a non-fitting estimate fit."""
    from memplan.pipeline import formulas_only

    if gpu is None or est.fits is not False:
        return []
    with formulas_only():  # each change would otherwise be a trace of a table family
        found = fixes(est, spec, gpu)
        saved = savings(est, spec, gpu)
    lines = [f"{est.method.value} would fit with: {describe(found)}" if found
             else f"{est.method.value}: no single change found that makes it fit on {gpu.name}"]
    if saved:
        lines.append(f"{est.method.value} memory savers: " + ", ".join(
            f"`{fix.flag}` saves {n / GIB:.1f} GiB" for fix, n in saved))
    return lines
