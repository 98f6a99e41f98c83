"""Parameter and buffer tensors of any model_type in the generated tables, in plain Python.

`data/tensors.json` is generated from transformers itself (`tools/tables_build.py`): each model_type
was built once per structural variant with its integer config fields as symbolic sizes, so every
tensor's shape is an expression of config fields, valid where the recorded guards hold. This module
evaluates those expressions for one config dict -- no torch, no sympy: a parsed expression may only
use names, integer literals, arithmetic, comparisons and a few whitelisted functions.

Steps: alias keys through the class's attribute_map, fill absent fields with the class defaults and
the class's default rules (head_dim = hidden_size // num_attention_heads ...), pick the variant of
the structural switches (tie_word_embeddings, biases, head_dim given or not ...), check its guards,
then list the tensors outside the layers and, for each layer, those of its kind (`layer_rule`).
A config no variant or guard covers is refused with the reason; it never gets a guessed shape.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError

TABLES_DIR = Path(__file__).with_name("data") / "tensors"  # one <model_type>.json each, read on first use


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor as the table lists it for a config."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    buffer: bool = False
    itemsize: int = 4
    transposed: bool = False
    linear: bool = False  # of an nn.Linear / Conv1D other than the output head (peft's all-linear)


@lru_cache(maxsize=1)
def model_types() -> tuple[str, ...]:
    """Every model_type the tables cover, sorted (a directory listing: no table is parsed)."""
    return tuple(sorted(p.stem for p in TABLES_DIR.glob("*.json")))


@lru_cache(maxsize=None)
def table(model_type: str) -> dict | None:
    """The table of one model_type, or None."""
    if model_type not in model_types():
        return None
    return json.loads((TABLES_DIR / f"{model_type}.json").read_text())


def has_sdpa(model_type: str | None) -> bool:
    """Whether transformers has an SDPA attention for the type (a type without a table: assumed so)."""
    t = table(model_type) if model_type else None
    return t is None or bool(t.get("sdpa", True))


# ---- the expression evaluator -------------------------------------------------------------------


def _floordiv(a, b):
    return a // b


def _int_true_div(a, b):
    return a / b


def _trunc(x):
    return int(x)


_FUNCS = {
    "Eq": operator.eq, "Ne": operator.ne, "Mod": operator.mod, "PythonMod": operator.mod, "Max": max, "Min": min,
    "FloorDiv": _floordiv, "CleanDiv": _floordiv, "IntTrueDiv": _int_true_div, "FloatTrueDiv": _int_true_div,
    "TruncToInt": _trunc, "TruncToFloat": float, "ToFloat": float, "CeilToInt": lambda x: -int(-x // 1),
    "FloorToInt": lambda x: int(x // 1), "floor": lambda x: int(x // 1), "ceiling": lambda x: -int(-x // 1),
    "Abs": abs, "And": lambda *a: all(a), "Or": lambda *a: any(a), "Not": operator.not_,
}
_BINOPS = {"Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "FloorDiv": operator.floordiv,
           "Mod": operator.mod, "Div": operator.truediv, "Pow": operator.pow}
_CMPS = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
         "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b}


@lru_cache(maxsize=4096)
def _parse(expr: str):
    import ast  # here, not at import: `fit` on a hand-written family evaluates no table

    return ast.parse(expr, mode="eval").body


class _Unknown(Exception):
    """A name the expression reads is absent (or null) in the config."""


def evaluate(expr: str, names: dict):
    """The value of a table expression over config fields; only whitelisted syntax runs."""
    return _ev(_parse(expr), names)


def _ev(node, names):
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("True", "False"):
            return node.id == "True"
        value = names.get(node.id)
        if value is None:
            raise _Unknown(node.id)
        return value
    if isinstance(node, ast.BinOp) and type(node.op).__name__ in _BINOPS:
        return _BINOPS[type(node.op).__name__](_ev(node.left, names), _ev(node.right, names))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        v = _ev(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else not v
    if isinstance(node, ast.Compare):
        left = _ev(node.left, names)
        for op, right_node in zip(node.ops, node.comparators):
            right = _ev(right_node, names)
            if type(op).__name__ not in _CMPS or not _CMPS[type(op).__name__](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = (_ev(v, names) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.IfExp):
        return _ev(node.body, names) if _ev(node.test, names) else _ev(node.orelse, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        return _FUNCS[node.func.id](*(_ev(a, names) for a in node.args))
    raise MemplanError(f"tensor table: unsupported expression {ast.unparse(node)!r}")


# ---- a config's tensors --------------------------------------------------------------------------


def fields(cfg: dict, t: dict) -> dict:
    """The config's fields under the class's own names, with class defaults and default rules filled in."""
    aliases = t["aliases"]
    # null is absent, except for a switch whose null is a layout of its own (DeepSeek's q_lora_rank)
    given = {aliases.get(k, k): v for k, v in cfg.items() if v is not None or aliases.get(k, k) in t["switches"]}
    values = {k: v for k, v in t["defaults"].items() if k not in t["rules"]}
    values.update(given)
    values["partial_rotary_factor"] = _rotary_fraction(cfg, values)
    for k, expr in t["rules"].items():
        if values.get(k) is None:
            try:
                values[k] = evaluate(expr, values)
            except _Unknown:
                pass
    return values


def _rotary_fraction(cfg: dict, values: dict) -> float:
    """The fraction of each head that rotary embeddings turn (Phi, Pythia: rotary_pct; default 1.0)."""
    for src in (cfg, cfg.get("rope_parameters"), cfg.get("rope_scaling"), values.get("rope_parameters")):
        if isinstance(src, dict):
            for key in ("partial_rotary_factor", "rotary_pct"):
                v = src.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return float(v)
    return 1.0


def _state(v):
    """A switch's state as variants name it: a bool as it is, an integer as "set", absent as None."""
    if isinstance(v, bool) or v is None:
        return v
    return "set"


def _variant(t: dict, values: dict, where: str) -> dict:
    for var in t["variants"]:
        if all(_state(values.get(k)) == want for k, want in var["when"].items()):
            return var
    switched = ", ".join(f"{k}={values.get(k)!r}" for k in sorted(t["switches"]))
    raise MemplanError(f"{where}: the tensor table of {values.get('model_type')} has no variant for {switched}")


def tensors(cfg: dict, *, where: str = "config") -> list[Entry]:
    """Every parameter (tied ones once) and buffer of the model transformers builds from `cfg`."""
    mt = cfg.get("model_type")
    t = table(mt)
    if t is None:
        raise MemplanError(f"{where}: model_type {mt!r} has no tensor table; tables: {', '.join(model_types())}")
    values = fields(cfg, t)
    var = _variant(t, values, where)
    try:
        for g in var["guards"]:
            if not evaluate(g, values):
                raise MemplanError(f"{where}: the tensor table of {mt} holds only where {g}; this config "
                                   "breaks it (build it with transformers instead: memplan trace)")
        out = [_entry(name, e, values, None) for name, e in var["outside"].items()]
        n = values[t["layers_key"]]
        for i in range(n):
            kind = evaluate(t["layer_rule"], {**values, "i": i})
            for suffix, e in var["layers"][kind].items():
                out.append(_entry(f"{e['prefix']}{i}.{suffix}", e, values, i))
    except _Unknown as e:
        raise MemplanError(f"{where} lacks {e.args[0]!r}, which a {mt} config needs") from None
    except (ArithmeticError, TypeError, KeyError) as e:
        raise MemplanError(f"{where}: the {mt} tensor table cannot read this config ({type(e).__name__}: {e})") \
            from None
    return out


def _entry(name: str, e: dict, values: dict, layer: int | None) -> Entry:
    shape = tuple(int(evaluate(d, values)) for d in e["shape"])
    if any(d < 0 for d in shape):
        raise MemplanError(f"tensor table: {name} comes out with a negative size {shape}")
    return Entry(name, shape, layer, e.get("buffer", False), e.get("itemsize", 4), e.get("transposed", False),
                 e.get("linear", False))
