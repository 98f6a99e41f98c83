"""The options of `fit`, `trace` and `chart`, generated from `Config`: one field, one flag, one help text.

A command declares its own parameters (the model, `--gpu`, `--json`, ...) and `**options`;
`with_config_options` replaces `**options` by a typer option for every `Config` field, with
the field's type, default and description (`--help`), and a choice field's members as its metavar. So a
new `Config` field appears in every command at once, spelled as the plan files spell it.
"""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Optional

import typer

from memplan.options import Config, _Choice


def flag(name: str) -> str:
    """A Config field as the command line spells it: `lora_rank` -> `--lora-rank`."""
    return "--" + name.replace("_", "-")


def _param(name: str, info) -> inspect.Parameter:
    kind, default, help_text = info.annotation, info.default, info.description or ""
    if isinstance(kind, type) and issubclass(kind, _Choice):
        # Parsed by Config (case, `_`/`-`, close matches in the message), so typer takes the text.
        option = typer.Option(default.value, flag(name), help=help_text,
                              metavar="[" + "|".join(m.value for m in kind) + "]")
        annotation = str
    elif kind is bool:
        decls = (flag(name),) if default is False else (f"{flag(name)}/--no-{flag(name)[2:]}",)
        option, annotation = typer.Option(default, *decls, help=help_text), bool
    elif kind in (int, float, str):
        option, annotation = typer.Option(default, flag(name), help=help_text), kind
    else:  # tuple[str, ...]: comma-separated on the command line
        option = typer.Option(None, flag(name), help=help_text + " Comma-separated.", metavar="A,B,...")
        annotation = Optional[str]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def config_params(exclude: tuple[str, ...] = ("model", "method")) -> list[inspect.Parameter]:
    """A typer option for each Config field not in `exclude`, in Config's order."""
    return [_param(name, info) for name, info in Config.model_fields.items() if name not in exclude]


def with_config_options(fn=None, *, exclude: tuple[str, ...] = ("model", "method")):
    """Give `fn(..., **options)` the Config options in place of `**options` (after its positional ones)."""

    def attach(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = sum(1 for p in own if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]  # typer passes keywords
        fn.__signature__ = sig.replace(parameters=[*own[:at], *config_params(exclude), *own[at:]])
        return fn

    return attach(fn) if fn is not None else attach


def _values(options: dict) -> dict:
    """Command-line values as Config fields: comma-separated lists as tuples; unset lists left out."""
    out = {}
    for name, value in options.items():
        info = Config.model_fields[name]
        if info.annotation in (int, float, str, bool) or isinstance(info.annotation, type) and issubclass(
                info.annotation, Enum):
            out[name] = value
        elif value:  # '' as unset, as before
            items = tuple(t.strip() for t in value.split(",") if t.strip())
            if not items:
                from memplan.errors import MemplanError

                raise MemplanError(f"{flag(name)} needs module names, e.g. q_proj,v_proj; got {value!r}")
            out[name] = items
    return out


def make_config(model: str, method, options: dict) -> Config:
    """The Config of a command line; bad values get one line naming the flag (MemplanError)."""
    return Config.make(spell=flag, model=model, method=method, **_values(options))


def chart_options(options: dict) -> dict:
    """Validated Config fields other than model and method, for `memplan.charts`."""
    cfg = make_config("-", "zo-sgd", options)  # the model is checked where the chart resolves it
    return cfg.model_dump(exclude={"model", "method"})
