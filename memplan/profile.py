"""Profiles: a traced step's bytes as formulas of batch and seq, stored small and evaluated without torch.

A profile belongs to one configuration with every option fixed but `batch` and `seq`. It holds the
few moments of the step that can hold the peak (`rows`): each is a phase and, per category, bytes
as an integer combination of `terms`, small formulas of `b` and `s` such as `b*s` or
`512*((b*s*3 + 511)//512)` (the allocator's 512-byte rounding, exact as a floor division). A row
is valid inside a `regime`: a condition on b and s under which the step runs the same ops (torch
recorded it as guards: `b == 1` against `b >= 2`, `s < sliding_window`, `s <= max positions`).
The peak at (b, s) is the largest row of the regime that holds; where none holds the answer is
None ("unknown"), never an extrapolation.

Formulas are Python expressions over the names `b` and `s` made of integers, + - * // % ** and
comparisons; anything else is refused when the profile is read (`formula`), so a profile file
cannot run code.

Stored as JSON (format `FORMAT`):
    {"format": 1, "model": ..., "options": {...}, "versions": {...}, "source": "symbolic" | "probe",
     "trainable_params": n, "total_params": n, "warnings": [...], "terms": ["1", "b*s", ...],
     "regimes": [{"when": "b == 1 and s >= 2 and s <= 4096",
                  "rows": [["forward", {"activations": [[term, coefficient], ...], ...}], ...]}]}
Profiles are found in the user cache folder and in the package's `data/profiles`, by `key`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from memplan.errors import MemplanError
from memplan.result import Category, Phase

FORMAT = 1
announce = None  # a callable(line) told before a profile is traced on first use (the CLI's status line)
SHIPPED = Path(__file__).with_name("data") / "profiles"
_NAMES = ("b", "s")


@lru_cache(maxsize=4096)
def formula(text: str):
    """The compiled code of a formula over b and s; MemplanError for anything but integer arithmetic."""
    import ast  # only where a profile is read: `fit` without one imports nothing more

    ops = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Constant, ast.Name, ast.Load,
           ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or,
           ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise MemplanError(f"profile formula {text!r} is not an expression") from None
    for node in ast.walk(tree):
        if not isinstance(node, ops) or isinstance(node, ast.Name) and node.id not in _NAMES \
                or isinstance(node, ast.Constant) and (type(node.value) is not int):
            raise MemplanError(f"profile formula {text!r}: only integers, b, s and + - * // % ** and comparisons")
    return compile(tree, "<profile>", "eval")


def evaluate(text: str, b: int, s: int) -> int:
    """A formula's value at (b, s)."""
    return eval(formula(text), {"__builtins__": {}}, {"b": b, "s": s})  # noqa: S307 (whitelisted above)


@dataclass(frozen=True)
class Row:
    """One moment of the step: its phase and, per category, bytes as ((term index, coefficient), ...)."""

    phase: Phase
    bytes: dict[Category, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class Regime:
    """Rows valid where `when` (a formula of b and s) holds."""

    when: str
    rows: tuple[Row, ...]

    def holds(self, b: int, s: int) -> bool:
        return bool(evaluate(self.when, b, s))


@dataclass(frozen=True)
class Peak:
    """A profile's answer at one (b, s): the phase and categories of the peak, and every phase's peak."""

    phase: Phase
    components: dict[Category, int]
    phases: dict[Phase, int]

    @property
    def allocated(self) -> int:
        return sum(self.components.values())


@dataclass(frozen=True)
class Profile:
    """A configuration's peak as formulas of batch and seq (see the module docstring)."""

    terms: tuple[str, ...]
    regimes: tuple[Regime, ...]
    model: str = ""
    options: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    source: str = "symbolic"
    trainable_params: int = 0
    total_params: int = 0
    warnings: tuple[str, ...] = ()

    def regime(self, b: int, s: int) -> Regime | None:
        return next((r for r in self.regimes if r.holds(b, s)), None)

    def peak(self, b: int, s: int) -> Peak | None:
        """The peak at (b, s), or None where no stored regime holds."""
        regime = self.regime(b, s)
        if regime is None:
            return None
        values = [evaluate(t, b, s) for t in self.terms]
        best, best_total, phases = None, -1, {}
        for row in regime.rows:
            comps = {c: sum(k * values[i] for i, k in terms) for c, terms in row.bytes.items()}
            total = sum(comps.values())
            if total > phases.get(row.phase, -1):
                phases[row.phase] = total
            if total > best_total:
                best, best_total = (row.phase, comps), total
        return Peak(best[0], {c: n for c, n in best[1].items() if n}, phases)

    # ---- JSON ----

    def to_json(self) -> str:
        data = {
            "format": FORMAT, "model": self.model, "options": self.options, "versions": self.versions,
            "source": self.source, "trainable_params": self.trainable_params, "total_params": self.total_params,
            "warnings": list(self.warnings), "terms": list(self.terms),
            "regimes": [{"when": r.when, "rows": [[row.phase.value, {c.value: [list(t) for t in terms]
                                                                     for c, terms in row.bytes.items()}]
                                                  for row in r.rows]} for r in self.regimes],
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str = "profile") -> Profile:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise MemplanError(f"{where}: profile format {data.get('format')!r}, this memplan reads {FORMAT}")
            terms = tuple(data["terms"])
            for t in terms:
                formula(t)
            regimes = []
            for r in data["regimes"]:
                formula(r["when"])
                rows = tuple(Row(Phase(ph), {Category(c): tuple((int(i), int(k)) for i, k in ts)
                                             for c, ts in cats.items()}) for ph, cats in r["rows"])
                if any(i >= len(terms) for row in rows for ts in row.bytes.values() for i, _ in ts):
                    raise MemplanError(f"{where}: a row names a term the profile does not have")
                regimes.append(Regime(r["when"], rows))
            return cls(terms, tuple(regimes), data.get("model", ""), data.get("options", {}),
                       data.get("versions", {}), data.get("source", "symbolic"), int(data.get("trainable_params", 0)),
                       int(data.get("total_params", 0)), tuple(data.get("warnings", ())))
        except MemplanError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MemplanError(f"{where}: not a memplan profile ({type(e).__name__}: {e})") from None


def context_length(config_dict: dict, default: int = 2048) -> int:
    """The longest sequence a model takes: its position table's size, else `default`."""
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = config_dict.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


# ---- where profiles live ----------------------------------------------------------------------


def options_of(cfg) -> dict:
    """The Config fields that shape the step, except batch and seq (and the model's name: its config
    dict stands for it), where they differ from their defaults: a field added to Config later, at its
    default, leaves every stored profile's key as it was."""
    data = cfg.model_dump(mode="json")
    defaults = _defaults(type(cfg))
    return {k: v for k, v in data.items() if k not in ("model", "batch", "seq") and v != defaults.get(k)}


@lru_cache(maxsize=None)
def _defaults(config_type) -> dict:
    """Each Config field's default, as `model_dump(mode="json")` spells it."""
    from pydantic_core import to_jsonable_python

    return {k: to_jsonable_python(f.default) for k, f in config_type.model_fields.items() if not f.is_required()}


_KEYS: dict[tuple, tuple[dict, str]] = {}


@lru_cache(maxsize=None)
def _key_fields(config_type) -> tuple[int, ...]:
    """Positions of the Config fields a profile depends on (all but model, batch and seq)."""
    return tuple(i for i, k in enumerate(config_type.model_fields) if k not in ("model", "batch", "seq"))


def key(config_dict: dict, cfg) -> str:
    """The file name stem of a configuration's profile: a hash of the model's config dict, the options
    and the profile format. (The torch and transformers versions are checked inside the file.)"""
    # Sweeps ask for thousands of (batch, seq) of one configuration: hash each once.
    values = tuple(cfg.__dict__.values())
    memo = (id(config_dict), *(values[i] for i in _key_fields(type(cfg))))
    hit = _KEYS.get(memo)
    if hit is not None and hit[0] is config_dict:
        return hit[1]
    text = json.dumps({"config": config_dict, "options": options_of(cfg), "format": FORMAT}, sort_keys=True,
                      default=str)
    import hashlib

    stem = hashlib.sha256(text.encode()).hexdigest()[:24]
    _KEYS[memo] = (config_dict, stem)
    return stem


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/memplan/profiles, else ~/.cache/memplan/profiles."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "memplan" / "profiles"


def installed_versions() -> dict:
    """The torch and transformers versions installed (None for one that is not), from package metadata."""
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


_LOADED: dict[str, Profile | None] = {}


def find(config_dict: dict, cfg) -> Profile | None:
    """The stored profile of a configuration: the user cache's (made with the torch and transformers
    installed now), else one shipped with memplan; None when neither has it."""
    stem = key(config_dict, cfg)
    if stem in _LOADED:
        return _LOADED[stem]
    found = None
    cached = cache_dir() / f"{stem}.json"
    if cached.is_file():
        prof = _read(cached)
        if prof is not None and prof.versions == installed_versions():
            found = prof
    if found is None:
        shipped = SHIPPED / f"{stem}.json"
        if shipped.is_file():
            found = _read(shipped)
    _LOADED[stem] = found
    return found


def _read(path: Path) -> Profile | None:
    """A profile file, or None when it is unreadable or another memplan's format (it is then remade)."""
    try:
        return Profile.from_json(path.read_text(), str(path))
    except (OSError, MemplanError):
        return None


def store(config_dict: dict, cfg, profile: Profile) -> Path:
    """Write a profile into the user cache (atomically: a reader sees no file or the whole file)."""
    from memplan.files import write_atomic

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key(config_dict, cfg)}.json"
    write_atomic(path, profile.to_json())
    _LOADED[key(config_dict, cfg)] = profile
    return path
