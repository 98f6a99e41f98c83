"""The grid YAML: which configurations to measure, on which device, with how many steps.

```yaml
name: h100                  # default: the file's stem; names the records file
device: auto                # auto | cuda | cpu
warmup_steps: 1
measured_steps: 2
models:                     # named model configs: inline config.json fields, or a path to one
  tiny-opt: {model_type: opt, vocab_size: 1000, hidden_size: 64, ...}
defaults: {dtype: fp16}     # Config fields for every entry
configs:                    # Config fields; a list value expands to one config per element
  - {model: tiny-opt, method: [zo-sgd, fo-adam], batch: [1, 4]}
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from memplan.errors import MemplanError
from memplan.options import Config

# Config fields whose YAML value may be a list that expands; lora_targets is a list by nature.
NOT_EXPANDED = ("lora_targets",)


class Grid(BaseModel):
    """A calibration grid: configurations and how to measure them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="Grid name; names the records file (default: the YAML file's stem).")
    description: str = Field("", description="What this grid is for.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="cuda: CUDA allocator statistics; cpu: the live-bytes meter; auto: cuda when NVML sees a GPU.")
    warmup_steps: int = Field(1, ge=1, description="Steps run before the peak statistics are reset (optimizer state appears on the first).")
    measured_steps: int = Field(2, ge=1, description="Steps measured after the reset.")
    timeout_s: float = Field(300.0, gt=0, description="Wall-clock limit of one configuration; past it the record says timeout.")
    cpu_cap_bytes: int | None = Field(
        None, ge=1, description="CPU meter only: live bytes above this raise out-of-memory (a simulated card).")
    seed: int = Field(0, description="Seed of weights, batches and perturbations.")
    models: dict[str, dict[str, Any] | str] = Field(
        default_factory=dict, description="Named model configs: inline config.json fields, or a path to one (relative to the grid).")
    defaults: dict[str, Any] = Field(default_factory=dict, description="Config fields applied to every entry.")
    configs: list[dict[str, Any]] = Field(min_length=1, description="Entries of Config fields; list values expand (product).")
    _base: Path = PrivateAttr(default_factory=Path)  # folder of the YAML file: relative model paths start here


@dataclass(frozen=True)
class Job:
    """One configuration to measure, with everything a fresh process needs."""

    config: Config
    model_name: str
    model_config: dict
    config_key: str  # hash of the configuration alone: matches trace and measured records

    def to_dict(self) -> dict:
        return {"config": self.config.model_dump(mode="json"), "model_name": self.model_name,
                "model_config": self.model_config, "config_key": self.config_key}


def stable_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON: the same on every machine and Python run."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_key(config: Config, model_config: dict) -> str:
    return stable_hash({"config": config.model_dump(mode="json"), "model_config": model_config})


def _errors(e: ValidationError, tree: Any = None, owner: type[BaseModel] = Config) -> str:
    """Every error (the first few, then a count) on one line, as plan files give them."""
    from memplan import yamlfile

    return yamlfile.one_line(yamlfile.error_messages(e, tree, lambda loc: owner.model_fields))


def _read_yaml(path: Path) -> tuple[Any, Any]:
    """(data, node tree for line numbers): the loader plan files use (libyaml, no alias bombs, no duplicate keys)."""
    from memplan import yamlfile

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MemplanError(f"{path}: no such grid file") from None
    except OSError as e:
        raise MemplanError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise MemplanError(f"{path}: not UTF-8 text") from None
    return yamlfile.read(text, str(path))


def load(path: str | Path) -> Grid:
    """Read and validate a grid file; every error is one line naming the file and the key."""
    from memplan import yamlfile

    path = Path(path)
    data, tree = _read_yaml(path)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else yamlfile.kind_of(data)
        raise MemplanError(f"{path}: a grid is a mapping with at least `configs:`, got {got}")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as e:
        raise MemplanError(f"{path}: {_errors(e, tree, Grid)}") from None
    if not grid.name:
        grid.name = path.stem
    grid._base = path.parent
    return grid


def _model(grid: Grid, name: str, base: Path) -> tuple[str, dict]:
    """(name, config dict) of a model: the grid's own, else what `memplan fit` would resolve."""
    from memplan.spec import resolve, spec_from_config

    if name in grid.models:
        entry = grid.models[name]
        if isinstance(entry, str):
            p = Path(entry)
            p = p if p.is_absolute() else base / p
            spec = resolve(str(p))
            return name, dict(spec.config)
        spec_from_config(entry, name, where=f"models.{name}")  # validates the fields now
        return name, dict(entry)
    local = base / name
    if local.exists():
        return name, dict(resolve(str(local)).config)
    spec = resolve(name)
    return spec.name, dict(spec.config)


def _expand(entry: dict) -> list[dict]:
    keys = [k for k, v in entry.items() if isinstance(v, list) and k not in NOT_EXPANDED]
    if not keys:
        return [dict(entry)]
    out = []
    for values in itertools.product(*(entry[k] for k in keys)):
        out.append({**entry, **dict(zip(keys, values))})
    return out


def jobs(grid: Grid) -> list[Job]:
    """Every configuration of the grid, in order, without duplicates."""
    base = grid._base
    out: dict[str, Job] = {}
    for i, entry in enumerate(grid.configs):
        where = f"{grid.name}: configs[{i}]"
        merged = {**grid.defaults, **entry}
        if "model" not in merged:
            raise MemplanError(f"{where}: no `model` (name one here, in `defaults:`, or under `models:`)")
        for fields in _expand(merged):
            try:
                model_name, model_config = _model(grid, str(fields["model"]), base)
                cfg = Config(**{**fields, "model": model_name})
            except ValidationError as e:
                raise MemplanError(f"{where}: {_errors(e)}") from None
            except MemplanError as e:
                raise MemplanError(f"{where}: {e}") from None
            key = config_key(cfg, model_config)
            out.setdefault(key, Job(cfg, model_name, model_config, key))
    return list(out.values())
