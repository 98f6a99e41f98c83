"""Plan files: runs x GPUs with a margin, read from YAML or JSON, validated, and checked.

A plan is what a team commits next to its training configs; `memplan check` fails when a run
no longer fits. Every message about a bad plan names the file, the key (and line, in YAML), what
is wrong and what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema, field_validator
from pydantic import model_validator

from memplan import yamlfile
from memplan.errors import MemplanError
from memplan.result import GIB, Estimate, Tier
from memplan.margin import DEFAULT as DEFAULT_MARGIN
from memplan.margin import Margin
from memplan.options import Config, Method

TierName = Literal[tuple(t.value for t in Tier if t is not Tier.MEASURED)]  # tiers that estimate alone
_METHODS_SCHEMA = {
    "anyOf": [
        {"enum": ["all", *(m.value for m in Method)],
         "description": "; ".join(f"{m.value}: {m.__doc__}" for m in Method)},
        {"type": "array", "items": {"enum": [m.value for m in Method]}, "minItems": 1},
    ],
}


def _as_value_error(fn, value):
    """Run a parser that raises MemplanError / OSError; pydantic reports ValueError at the key."""
    try:
        return fn(value)
    except (MemplanError, OSError) as e:
        raise ValueError(str(e)) from None


class Run(Config):
    """One entry of `runs`: a fine-tuning configuration, checked with each of its methods on each GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Run")

    name: str | None = Field(None, description="Name shown in reports and CI (default: runs[i]); unique in a plan.")
    method: Annotated[list[Method], WithJsonSchema(_METHODS_SCHEMA)] = Field(
        [Method.ZO_SGD], description="Optimization method, a list of methods, or `all`.")
    tier: TierName | None = Field(None, description="Estimator for this run (default: the plan's tier).")

    @field_validator("scheme", "dtype", "attention", "perturbation", "hf_version", "loss", mode="before")
    @classmethod
    def _parse_choice(cls, value, info):
        choice = cls.model_fields[info.field_name].annotation
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"must be one of {', '.join(m.value for m in choice)}, got {_show(value)}")
        return _as_value_error(choice.parse, str(value))

    @field_validator("method", mode="before")
    @classmethod
    def _parse_methods(cls, value):
        from memplan.options import parse_methods

        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError("empty list; name at least one method, or `all`")
        return _as_value_error(lambda v: parse_methods(v, where="method"), items)

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, value, info: ValidationInfo):
        """Check the model exists; a path is taken relative to the plan file."""
        from memplan.pipeline import model_of
        from memplan.spec import catalog_names

        if not isinstance(value, str):
            raise ValueError(f"a model name or path (`memplan models` lists them), got {_show(value)}")
        base = (info.context or {}).get("base")
        known = value.strip().lower() in (n.lower() for n in catalog_names())
        if base is not None and not known and not Path(value).is_absolute():
            candidate = Path(base) / value
            if _as_value_error(Path.exists, candidate):
                value = str(candidate)
        _as_value_error(model_of, value)
        return value

    def configs(self) -> list[Config]:
        """One Config per method."""
        fields = self.model_dump(exclude={"name", "method", "tier"})
        return [Config.model_construct(**fields, method=m) for m in self.method]


class Plan(BaseModel):
    """A memplan plan: every run is checked with every method on every GPU, keeping `margin` free."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="memplan plan")

    gpus: list[str] = Field(min_length=1,
                            description="GPU catalog names (`memplan gpus`), or `auto` for the local one.")
    margin: Annotated[str, WithJsonSchema({"anyOf": [{"type": "string", "examples": ["5%", "2GiB"]},
                                                     {"const": 0}]})] = Field(
        str(DEFAULT_MARGIN), description="Memory kept free on each GPU: a share (`5%`) or an amount (`2GiB`, bytes). "
        "A run fits when its peak device bytes are at most total - margin.")
    tier: TierName = Field("analytic", description="Estimator: `analytic` (closed form, instant) or `trace` "
                           "(fake-tensor trace of the real step; needs memplan[torch]).")
    runs: list[Run] = Field(min_length=1, description="The configurations to check.")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, value):
        from memplan.hardware import get_gpu

        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"a GPU name or a list of them, got {_show(item)}")
            if item.strip().lower() == "auto":
                try:
                    get_gpu(item)
                except MemplanError:
                    raise ValueError("`auto` means the local GPU, and no NVIDIA GPU was found (NVML not "
                                     "available); name one instead, e.g. gpus: [a100-80gb]") from None
            else:
                _as_value_error(get_gpu, item)
        return list(dict.fromkeys(items))

    @field_validator("margin", mode="before")
    @classmethod
    def _margin(cls, value):
        if not isinstance(value, (str, int)) or isinstance(value, str) and len(value) > 40:
            from memplan.margin import HINT

            raise ValueError(f"{HINT}; got {_show(value)}")  # never the repr of a whole structure
        return str(Margin.parse(value))

    @model_validator(mode="after")
    def _unique_names(self):
        # Unnamed runs are reported as runs[i]: an explicit name may not take one of those either.
        seen: dict[str, int] = {}
        for i, name in enumerate(self.run_names()):
            if name in seen:
                named, other = (i, seen[name]) if self.runs[i].name is not None else (seen[name], i)
                whose = "the name" if self.runs[other].name is not None else "the default name"
                raise ValueError(f"runs[{named}].name: {_show(name)} is also {whose} of runs[{other}]; "
                                 "names must be unique")
            seen[name] = i
        return self

    @model_validator(mode="after")
    def _margin_leaves_room(self):
        # A margin that keeps a whole GPU free is a mistake in the plan, not a misfit of its runs.
        from memplan.hardware import get_gpu

        margin = Margin.parse(self.margin)
        for name in self.gpus:
            gpu = get_gpu(name)
            try:
                margin.check_against(gpu.total_bytes, gpu.name)
            except MemplanError as e:
                raise ValueError(f"margin: {e}") from None
        return self

    def run_names(self) -> list[str]:
        return [run.name or f"runs[{i}]" for i, run in enumerate(self.runs)]


def schema() -> dict:
    """JSON Schema of plan files, with each choice's meaning (editors show it)."""
    from memplan import options

    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Plan.model_json_schema()}
    for name, entry in out.get("$defs", {}).items():
        choice = getattr(options, name, None)
        if isinstance(choice, type) and issubclass(choice, options._Choice):
            entry["description"] = "; ".join(f"{m.value}: {m.__doc__}" for m in choice)
    return out


# ---- reading ----------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    return yamlfile.show(value, limit)


line_of = yamlfile.line_of


def _valid_keys(loc: tuple):
    """The keys valid where an unknown key `loc` was found: a run's or the plan's."""
    return (Run if len(loc) > 2 and loc[0] == "runs" else Plan).model_fields


@dataclass(frozen=True)
class PlanFile:
    """A validated plan and where it came from (for messages, JUnit and CI annotations)."""

    path: str
    plan: Plan
    run_lines: tuple[int | None, ...] = ()


def parse(text: str, name: str = "plan.yaml", *, base: Path | None = None, fmt: str | None = None) -> PlanFile:
    """Validate plan text; MemplanError names the file, key (and line) on bad input."""
    fmt = fmt or ("json" if name.lower().endswith(".json") else "yaml")
    data, tree = yamlfile.read(text, name, fmt=fmt)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else yamlfile.kind_of(data)
        raise MemplanError(f"{name}: expected a mapping with keys {', '.join(Plan.model_fields)}; got {got}")
    try:
        plan = Plan.model_validate(data, context={"base": base})
    except ValidationError as e:
        messages = yamlfile.error_messages(e, tree, _valid_keys, listing="memplan schema")
        raise MemplanError(f"{name}: {yamlfile.one_line(messages)}") from None
    lines = tuple(line_of(tree, ("runs", i)) if tree is not None else None for i in range(len(plan.runs)))
    return PlanFile(path=name, plan=plan, run_lines=lines)


def load(path: str | Path) -> PlanFile:
    """Read and validate a plan file (`.yaml`, `.yml` or `.json`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise MemplanError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MemplanError(f"{path}: not UTF-8 text") from None
    return parse(text, str(path), base=p.parent)


# ---- checking ---------------------------------------------------------------------------------


@dataclass
class Result:
    """One run x GPU x method: the estimate, the budget it had, and what would make it fit."""

    plan: str
    run: str
    line: int | None
    gpu: str
    total_bytes: int
    margin_bytes: int
    estimate: Estimate
    fixes: list = field(default_factory=list)  # list[suggest.Fix], least disruptive first

    @property
    def budget_bytes(self) -> int:
        return self.total_bytes - self.margin_bytes

    @property
    def fits(self) -> bool:
        """Within the GPU's budget (every rank: the estimate is the busiest one's) and, when the run gives
        `host_memory`, within the host's."""
        from memplan.pipeline import host_fits

        return self.estimate.peak_device_bytes <= self.budget_bytes and host_fits(self.estimate)

    @property
    def method(self) -> str:
        return self.estimate.method.value

    def summary(self) -> str:
        """`peak 52.1 GiB > budget 75.7 GiB (79.6 GiB - 5% margin)`-style verdict line."""
        rel = "<=" if self.fits else ">"
        return (f"peak {self.estimate.peak_device_bytes / GIB:.2f} GiB {rel} {self.budget_bytes / GIB:.2f} GiB "
                f"({self.gpu}: {self.total_bytes / GIB:.2f} GiB total - {self.margin_bytes / GIB:.2f} GiB margin)"
                f"{self.batch_note()}")

    def batch_note(self) -> str:
        """`; effective batch 16 = batch 2 x grad_accum 8 x 1 GPU (the peak is one micro-batch's)`, when
        the optimizer steps over more than one micro-batch."""
        from memplan.savers import effective_batch

        cfg = self.estimate.config
        if cfg is None or cfg.grad_accum == 1 and cfg.num_gpus == 1:
            return ""
        gpus = f"{cfg.num_gpus} GPU{'s' if cfg.num_gpus > 1 else ''}"
        return (f"; effective batch {effective_batch(cfg)} = batch {cfg.batch} x grad_accum {cfg.grad_accum} x "
                f"{gpus} (the peak is one micro-batch's: gradients accumulate in place)")

    def advice(self) -> str:
        """The smallest change that makes it fit, then the others (plan-file spelling)."""
        from memplan.suggest import describe

        if self.fits:
            return ""
        if not self.fixes:
            return f"no single change makes it fit on {self.gpu}"
        rest = f"; also: {describe(self.fixes[1:], plan_keys=True)}" if len(self.fixes) > 1 else ""
        return f"smallest change: {describe(self.fixes[:1], plan_keys=True)}{rest}"

    def to_json_dict(self) -> dict:
        return {
            "plan": self.plan, "run": self.run, "line": self.line, "gpu": self.gpu, "method": self.method,
            "fits": self.fits, "peak_device_bytes": self.estimate.peak_device_bytes,
            "total_bytes": self.total_bytes, "margin_bytes": self.margin_bytes, "budget_bytes": self.budget_bytes,
            "headroom_bytes": self.budget_bytes - self.estimate.peak_device_bytes,
            "fixes": [f.to_json_dict() for f in self.fixes], "estimate": self.estimate.to_json_dict(),
            "effective_batch": _effective_batch(self.estimate),
        }


def _effective_batch(est: Estimate) -> int | None:
    from memplan.savers import effective_batch

    return effective_batch(est.config) if est.config is not None else None


def _estimator(tier: str):
    """The estimate function of a tier, from the pipeline's registry: (cfg, gpu, spec) -> Estimate."""
    from memplan.pipeline import estimate_config, estimator
    from memplan.result import Tier

    if Tier(tier) is Tier.TRACE:
        try:
            import memplan.tracing  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise MemplanError(f"tier: trace needs the trace tier (memplan.tracing, torch and transformers: "
                               f"pip install 'memplan[torch]'), which this install lacks ({e}); "
                               "use tier: analytic") from None
    found = estimator(tier)
    return lambda cfg, gpu, spec: estimate_config(cfg, gpu, search=False, spec=spec, tier=found.tier)


def check(pf: PlanFile, notes: list[str] | None = None) -> list[Result]:
    """Every run x GPU x method of a plan, judged against total - margin, with fixes for the misfits.

    A run with `method: all` leaves out a method that refuses its options; `notes` gets a line for it.
    """
    from memplan.api import judge
    from memplan.hardware import get_gpu
    from memplan.pipeline import each, formulas_only, model_of
    from memplan.suggest import fixes

    plan = pf.plan
    margin = Margin.parse(plan.margin)
    gpus = [get_gpu(name) for name in plan.gpus]
    out = []
    for i, (run, name) in enumerate(zip(plan.runs, plan.run_names())):
        estimate = _estimator(run.tier or plan.tier)
        spec = model_of(run.model)
        line = pf.run_lines[i] if i < len(pf.run_lines) else None
        every = set(run.method) == set(Method)
        for gpu in gpus:
            ests, left_out = each(run.configs(), lambda cfg: judge(estimate(cfg, gpu, spec), gpu),
                                  leave_out_refused=every)
            if notes is not None and gpu is gpus[0]:
                notes.extend(f"{name}: {n}" for n in left_out)
            for est in ests:
                result = Result(pf.path, name, line, gpu.name, gpu.total_bytes, margin.bytes_of(gpu.total_bytes), est)
                if not result.fits:
                    with formulas_only():  # each change would otherwise be a trace of a table family
                        result.fixes = fixes(est, spec, gpu, margin=margin)
                out.append(result)
    return out
