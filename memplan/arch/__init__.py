"""Architectures as registered modules: everything memplan knows about one model family.

Each family module (`opt`, `llama`, `gpt2`, `roberta`) builds an `Arch` and calls `register`. An
`Arch` says how to read a config.json into `ModelSpec` fields, which parameter tensors and buffers
the model holds, which layers it stacks (a list, so layers may differ), what each layer keeps for
backward, what its loss keeps, and peft's defaults for it. Adding a family is one new module here
(every module of the package is imported and registers itself) plus its tests; the conformance tests
cover every registered family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from memplan.arch._common import (
    Ctx, LayerKind, causal_logits_backward, causal_logits_forward, causal_loss, dense_live, no_buffers, uniform,
)
from memplan.errors import MemplanError
from memplan.options import HfVersion

if TYPE_CHECKING:
    from memplan.spec import ModelSpec, Tensor


@dataclass(frozen=True, eq=False)
class Arch:
    """One model family: config reader, tensors, layers and the bytes they keep."""

    model_types: tuple[str, ...]
    # config.json fields -> ModelSpec fields; `need(key)` returns a required positive integer.
    read: Callable[[dict, Callable[[str], int]], dict]
    tensors: Callable[[ModelSpec], list[Tensor]]
    # (bytes per token, bytes per eager attention-score element) one layer keeps for backward.
    saved: Callable[[LayerKind, Ctx], tuple[int, int]]
    buffers: Callable[[ModelSpec], list[Tensor]] = no_buffers
    layers: Callable[[ModelSpec], tuple[LayerKind, ...]] = uniform
    # largest set of no-grad temporaries per token inside one layer, besides attention scores
    live: Callable[[LayerKind, Ctx], int] = dense_live
    # (upcast, loss) bytes per logit; (kept, transient) logits bytes after forward; loss backward bytes
    loss: Callable[[Ctx], tuple[int, int]] = causal_loss
    logits_forward: Callable[[Ctx], tuple[int, int]] = causal_logits_forward
    logits_backward: Callable[[Ctx], int] = causal_logits_backward
    kv_cache_by_default: bool = False  # a no-grad forward keeps every layer's keys and values
    objective: Literal["causal", "masked"] = "causal"
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # peft's default targets
    token_embedding: str = "embed_tokens"  # module of the token embedding (cast for a tied lm_head)
    uncast: tuple[str, ...] = ()  # embedding modules autocast never casts (lookups, not matmuls)
    # field overrides under an older transformers release this family behaved differently in
    versions: Mapping[HfVersion, Mapping[str, object]] = field(default_factory=dict)
    # non-empty where the activation formulas are borrowed from another family (a warning on estimates)
    activations_note: str = ""

    def at(self, version: HfVersion) -> Arch:
        """This family as `version` of transformers runs it."""
        return _at(self, version)


@lru_cache(maxsize=None)
def _at(arch: Arch, version: HfVersion) -> Arch:
    over = arch.versions.get(version)
    return replace(arch, versions={}, **over) if over else arch


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    """Add a family under each of its model types; a type registered twice is an error."""
    taken = [t for t in arch.model_types if t in ARCHS]
    if taken:
        raise ValueError(f"duplicate architecture registration for model_type {', '.join(taken)}")
    for t in arch.model_types:
        ARCHS[t] = arch
    return arch


def supported_types() -> tuple[str, ...]:
    """Every model_type memplan reads: the registered families and every type of the tensor tables, sorted."""
    from memplan import tables

    return tuple(sorted(set(ARCHS) | set(tables.model_types())))


def _table_family(model_type: str | None) -> Arch | None:
    """The table-driven family of a type no module registered, registered on first use (fit on a
    hand-written family parses no table)."""
    from memplan import tables

    if not isinstance(model_type, str) or model_type not in tables.model_types():
        return None
    import memplan.arch._generic as generic

    return generic.register_type(model_type)


def get(model_type: str | None, *, where: str = "config") -> Arch:
    """The family of `model_type`, or an error listing the supported ones."""
    if model_type not in ARCHS and _table_family(model_type) is None:
        raise MemplanError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(supported_types())}"
        )
    return ARCHS[model_type]


def find(model_type: str | None) -> Arch | None:
    """The family of `model_type`, or None (the trace tier also runs unregistered architectures)."""
    return ARCHS.get(model_type) or _table_family(model_type)


def _register_all() -> None:
    """Import every family module of this package: each registers itself (a new family is a new module)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_all()
