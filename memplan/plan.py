"""Plan files: runs x GPUs with a margin, read from YAML or JSON, validated, and checked.

A plan is what a team commits next to its training configs; `memplan check` fails when a run
no longer fits. Every message about a bad plan names the file, the key (and line, in YAML), what
is wrong and what is valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema, field_validator
from pydantic import model_validator

from memplan.errors import MemplanError, unknown
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

    @field_validator("scheme", "dtype", "attention", "perturbation", "hf_version", mode="before")
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
        from memplan.spec import catalog_names, resolve

        if not isinstance(value, str):
            raise ValueError(f"a model name or path (`memplan models` lists them), got {_show(value)}")
        base = (info.context or {}).get("base")
        known = value.strip().lower() in (n.lower() for n in catalog_names())
        if base is not None and not known and not Path(value).is_absolute():
            candidate = Path(base) / value
            if _as_value_error(Path.exists, candidate):
                value = str(candidate)
        _as_value_error(resolve, value)
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
            _as_value_error(get_gpu, item)
        return list(dict.fromkeys(items))

    @field_validator("margin", mode="before")
    @classmethod
    def _margin(cls, value):
        return str(Margin.parse(value))

    @model_validator(mode="after")
    def _unique_names(self):
        seen: dict[str, int] = {}
        for i, run in enumerate(self.runs):
            if run.name is not None and run.name in seen:
                raise ValueError(f"runs[{i}].name: {run.name!r} is also the name of runs[{seen[run.name]}]; "
                                 "names must be unique")
            seen.setdefault(run.name, i)
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
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path_of(loc: tuple) -> str:
    """`runs[0].batch`; a key that is not a plain word is quoted: `runs[0]['my key']`."""
    out = ""
    for part in loc:
        if isinstance(part, int) and out or not str(part).isidentifier():
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: dict) -> str:
    """One pydantic error in the plan's words: what is wrong, what is valid."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "required key missing"
    if kind == "extra_forbidden":
        owner = Run if len(err["loc"]) > 2 and err["loc"][0] == "runs" else Plan
        return str(unknown("key", str(err["loc"][-1]), owner.model_fields))
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit}, got {_show(got)}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind.startswith(("int_", "float_", "bool_", "string_", "list_", "model_", "dict_", "enum", "literal_")):
        return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {_show(got)}"
    return f"{err['msg']}, got {_show(got)}"


def _lines(text: str) -> Any:
    """The YAML node tree (for line numbers), or None."""
    import yaml

    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # the data parser reports syntax errors; lines are a courtesy
        return None


def line_of(tree: Any, loc: tuple) -> int | None:
    """1-based line of the value at `loc` in a YAML node tree (the key's line when the value is absent)."""
    import yaml

    node, line = tree, None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            if hit is None:
                return line
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line if node is None else node.start_mark.line + 1


@dataclass(frozen=True)
class PlanFile:
    """A validated plan and where it came from (for messages, JUnit and CI annotations)."""

    path: str
    plan: Plan
    run_lines: tuple[int | None, ...] = ()


def parse(text: str, name: str = "plan.yaml", *, base: Path | None = None, fmt: str | None = None) -> PlanFile:
    """Validate plan text; MemplanError names the file, key (and line) on bad input."""
    import yaml

    fmt = fmt or ("json" if name.lower().endswith(".json") else "yaml")
    tree = None
    try:
        if fmt == "json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
            tree = _lines(text)
    except json.JSONDecodeError as e:
        raise MemplanError(f"{name}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MemplanError(f"{name}: {where}invalid YAML: {what}".replace("\n", " ")) from None
    except RecursionError:
        raise MemplanError(f"{name}: nested too deeply") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise MemplanError(f"{name}: expected a mapping with keys {', '.join(Plan.model_fields)}; got {got}")
    try:
        plan = Plan.model_validate(data, context={"base": base})
    except ValidationError as e:
        errors = e.errors(include_url=False)
        messages = []
        for err in errors:
            loc = err["loc"]
            if err["type"] == "value_error" and not loc:  # a plan-wide rule names its own key
                messages.append(str(err["ctx"]["error"]))
                continue
            line = line_of(tree, loc) if tree is not None else None
            messages.append(f"{_path_of(loc)}: {_describe(err)}" + (f" (line {line})" if line else ""))
        more = f" [and {len(messages) - 1} more: {'; '.join(messages[1:])}]" if len(messages) > 1 else ""
        # One line, whatever the plan holds: messages quote user text with repr, except pydantic's own.
        raise MemplanError(f"{name}: {messages[0]}{more}".replace("\n", " ")) from None
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
        return self.estimate.peak_device_bytes <= self.budget_bytes

    @property
    def method(self) -> str:
        return self.estimate.method.value

    def summary(self) -> str:
        """`peak 52.1 GiB > budget 75.7 GiB (79.6 GiB - 5% margin)`-style verdict line."""
        rel = "<=" if self.fits else ">"
        return (f"peak {self.estimate.peak_device_bytes / GIB:.2f} GiB {rel} {self.budget_bytes / GIB:.2f} GiB "
                f"({self.gpu}: {self.total_bytes / GIB:.2f} GiB total - {self.margin_bytes / GIB:.2f} GiB margin)")

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
        }


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


def check(pf: PlanFile) -> list[Result]:
    """Every run x GPU x method of a plan, judged against total - margin, with fixes for the misfits."""
    from memplan.api import judge
    from memplan.hardware import get_gpu
    from memplan.spec import resolve
    from memplan.suggest import fixes

    plan = pf.plan
    margin = Margin.parse(plan.margin)
    gpus = [get_gpu(name) for name in plan.gpus]
    out = []
    for i, (run, name) in enumerate(zip(plan.runs, plan.run_names())):
        estimate = _estimator(run.tier or plan.tier)
        spec = resolve(run.model)
        line = pf.run_lines[i] if i < len(pf.run_lines) else None
        for gpu in gpus:
            for cfg in run.configs():
                est = judge(estimate(cfg, gpu, spec), gpu)
                result = Result(pf.path, name, line, gpu.name, gpu.total_bytes, margin.bytes_of(gpu.total_bytes), est)
                if not result.fits:
                    result.fixes = fixes(est, spec, gpu, margin=margin)
                out.append(result)
    return out
