"""Training methods as registered specs: what each keeps (analytic) beside the step that keeps it (real).

Each family module (`fo`, `zo`, `fg`) registers one `MethodSpec` per method. A spec carries the
method's family, its forwards per step and optimizer-state copies, its analytic phases (each a
category dict; where a phase has several candidate moments, `peak_of` picks the largest), its
optimizer and its real step. `options.Method` lists the names the CLI, plans and JSON use; every
member has a spec and every spec a member, checked when this package is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from memplan.options import Config, Method
from memplan.result import Category, Phase

if TYPE_CHECKING:
    from memplan.analytic import Inputs
    from memplan.steps import Step, StepInfo

Moment = dict[Category, int]  # bytes per category at one moment of a step


class Family(str, Enum):
    """How a method gets its gradient."""

    FO = "fo"  # backpropagation
    ZO = "zo"  # finite differences of perturbed forwards
    FG = "fg"  # forward-mode AD along a random tangent


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """One training method: its memory model and its real step, side by side."""

    name: str
    doc: str
    family: Family
    forwards: int  # forward passes per step (q = 1)
    state_copies: Callable[[Config], int]  # trainable-sized buffers kept between steps
    phases: Callable[[Inputs], dict[Phase, Moment]]  # analytic bytes at each phase's peak
    run: Callable[[Step, dict], StepInfo]  # the real step (torch imported inside)
    optimizer: Callable[[list, Config, float], object] | None = None  # torch optimizer over the params
    one_query: bool = False  # takes a single query per step (zo_queries must be 1)
    warnings: Callable[[Config], list[str]] = field(default=lambda cfg: [])  # what the real step changes
    # steps after which the method's steps repeat (an anchor pass every n steps): the trace measures a cycle
    cycle: Callable[[Config], int] = field(default=lambda cfg: 1)
    # why the trace tier (fake tensors) cannot run this configuration, or None when it can
    untraceable: Callable[[Config], str | None] = field(default=lambda cfg: None)


def total(moment: Moment) -> int:
    return sum(moment.values())


def peak_of(moments: Iterable[Moment]) -> Moment:
    """The moment holding the most bytes (the first of equals): the one place a max over moments is taken."""
    return max(moments, key=total)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"duplicate method registration for {spec.name}")
    METHODS[spec.name] = spec
    return spec


def get(method: Method | str) -> MethodSpec:
    return METHODS[Method(method).value]


def _register_all() -> None:
    """Import every module of this package: each registers its methods (a new method is a new module)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()


def _check() -> None:
    """Every `Method` member has a spec, every spec a member, and the one-line docs agree."""
    names = {m.value for m in Method}
    if names != set(METHODS):
        raise RuntimeError(f"methods without a spec: {sorted(names - set(METHODS))}; "
                           f"specs without a Method member: {sorted(set(METHODS) - names)}")
    for m in Method:
        if METHODS[m.value].doc != m.__doc__:
            raise RuntimeError(f"{m.value}: MethodSpec.doc differs from Method's doc")


_check()
