"""Model shapes: every parameter tensor of a Hugging Face architecture, from its config fields.

A spec is built from a config dict (the catalog's, a local config.json, or one in the local Hugging
Face cache). Names and shapes follow transformers' own modules, so a test can hold every catalog
entry against a meta-device model built by transformers, tensor by tensor.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from memplan import arch as archs
from memplan import configs
from memplan.arch._common import Tensor
from memplan.errors import MemplanError, unknown

CATALOG_PATH = Path(__file__).with_name("data") / "models.json"


def __getattr__(name: str):
    # SUPPORTED_TYPES lists the table types too: computed on first use, so `fit` on a hand-written
    # family never reads the tables directory
    if name == "SUPPORTED_TYPES":
        return archs.supported_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts that change memory, for one architecture."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    tie_word_embeddings: bool
    gated_mlp: bool
    activation: str
    attention_bias: bool  # q/k/v projections carry a bias
    out_bias: bool  # the attention output projection carries a bias
    mlp_bias: bool
    norm: str  # layernorm | rmsnorm
    pre_norm: bool
    word_embed_proj_dim: int  # OPT-350m: 512, with project_in / project_out
    type_vocab_size: int = 0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_experts: int = 0  # routed experts per MoE layer (all resident)
    experts_per_token: int = 0  # top-k
    expert_size: int = 0  # one expert's MLP width
    shared_expert_size: int = 0  # width of the always-on shared expert MLP(s), if any
    sliding_window: int = 0  # 0: full attention in every layer
    source: str = ""
    config: dict = field(default_factory=dict, repr=False, compare=False)
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # per_spec's cache

    # ---- tensors --------------------------------------------------------------------------

    @property
    def arch(self) -> archs.Arch:
        """The registered family of this model_type."""
        return archs.get(self.model_type)

    @cached_property
    def tensors(self) -> tuple[Tensor, ...]:
        """Every trainable parameter tensor (tied ones once), named as transformers names them."""
        return tuple(self.arch.tensors(self))

    @cached_property
    def buffers(self) -> tuple[Tensor, ...]:
        """Non-parameter tensors that live on the device (rotary frequencies, position ids)."""
        return tuple(self.arch.buffers(self))

    @cached_property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_causal(self) -> bool:
        return self.arch.objective == "causal"

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return self.arch.lora_targets


def per_spec(fn):
    """Cache `fn(spec, *args)` on the spec (`ModelSpec.memo`), keyed by the function and its arguments.

    Sweeps estimate thousands of configurations of one model; the sums over its tensors depend on
    the spec and on the arguments alone, which the function's signature spells out. A cached
    function must read nothing else (no Config: pass the fields it needs).
    """

    @functools.wraps(fn)
    def cached(spec: ModelSpec, *args):
        key = (fn.__module__, fn.__qualname__, *args)
        try:
            return spec.memo[key]
        except KeyError:
            value = spec.memo[key] = fn(spec, *args)
            return value

    return cached

# ---- from a config dict ---------------------------------------------------------------------


def _need(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise MemplanError(f"{where} lacks {key!r}, which a {cfg.get('model_type')} config needs")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemplanError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def spec_from_config(cfg: dict, name: str, *, source: str = "", where: str = "config") -> ModelSpec:
    """Build a spec from a transformers config dict; errors name the missing or bad field."""
    if not isinstance(cfg, dict):
        raise MemplanError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    configs.check_config(cfg, where)
    cfg = configs.without_nulls(cfg)
    mt = cfg.get("model_type")
    common = archs.get(mt, where=where).read(cfg, lambda key: _need(cfg, key, where))
    if common["num_heads"] % common["num_kv_heads"]:
        raise MemplanError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    return ModelSpec(name=name, model_type=mt, source=source, config=dict(cfg), **common)


# ---- resolving what the user typed -----------------------------------------------------------


@lru_cache(maxsize=1)
def _catalog() -> list[dict]:
    return json.loads(CATALOG_PATH.read_text())["models"]


def catalog_entries() -> list[dict]:
    """The shipped catalog: id, aliases, source and config fields of each model."""
    return list(_catalog())


@lru_cache(maxsize=1)
def catalog_ids() -> frozenset[str]:
    """The catalog's ids (the names its specs carry)."""
    return frozenset(e["id"] for e in _catalog())


def catalog_names() -> list[str]:
    names = []
    for e in _catalog():
        names.append(e["id"])
        names.extend(e.get("aliases", []))
    return names


def _read_config(path: Path) -> dict:
    return configs.read_config(path)


_RESOLVED: dict[str, ModelSpec] = {}


def resolve(model: str) -> ModelSpec:
    """A catalog id or alias (any case), a config.json or a folder with one, or a hub id (`owner/name[@revision]`):
    from the local Hugging Face cache, else fetched from the hub (memplan.hub)."""
    if model in _RESOLVED:
        return _RESOLVED[model]
    key = model.strip().lower()
    for e in _catalog():
        if key == e["id"].lower() or key in (a.lower() for a in e.get("aliases", [])):
            spec = spec_from_config(e["config"], e["id"], source=e.get("source", ""), where=e["id"])
            _RESOLVED[model] = spec
            return spec
    from memplan import hub  # not imported for a catalog model: fit on one starts as fast as it can

    path = configs.config_path(model)  # None: no such local path
    if path is not None:
        cfg, note, where = hub.text_model(_read_config(path), str(path))
        return spec_from_config(cfg, str(model) + note, source=str(path), where=where)
    if Path(model).suffix == ".json":
        raise MemplanError(f"{model}: no such file")
    found = hub.find(model, known=catalog_names())  # the local HF cache, else the hub; None: no hub id
    if found is not None:
        return spec_from_config(found.config, found.name, source=found.source, where=found.where)
    if os.sep in model:
        raise MemplanError(f"{model}: no such file")
    raise unknown("model", model, catalog_names(), listing="memplan models")
