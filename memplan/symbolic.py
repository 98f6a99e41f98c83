"""Profiles from symbolic traces: the real step on fake tensors with batch and seq as symbolic sizes.

`memplan.tracing.trace_step(symbolic=True)` runs the step once under a ShapeEnv in which batch and
seq are SymInts: every storage's bytes come out as a formula of b and s (with `//` for the 512-byte
rounding), and torch records as guards every condition the step's control flow read (b >= 2, s below
a sliding window...). Replaying the tracker's events with bytes as formulas gives the live total at
every moment of the step as a formula; the moments that are the largest somewhere on a grid of
(b, s) are kept as the profile's rows (`memplan.profile`), with the guards as their regime. Grid
points outside every regime found so far are traced again with one of them as the hint, until the
grid is covered (or `MAX_TRACES` is reached: the rest stays unknown).

Imports torch, sympy (through torch) and numpy: only on the trace path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from memplan.errors import MemplanError
from memplan.options import Config
from memplan.profile import FORMAT, Profile, Regime, Row, context_length, installed_versions, options_of
from memplan.result import Category, Phase

MAX_BATCH = 1024
MAX_TRACES = 6
FAR_BATCH = 1 << 24


def grid(context: int, max_batch: int = MAX_BATCH) -> list[tuple[int, int]]:
    """(b, s) points the pruning looks at: up to `max_batch` and the context length, powers of two,
    their midpoints and the lengths beside each; beyond them, powers of two (a max-batch search goes
    to 2^24, a long-context model past its table) up to `FAR_BATCH` and 4x the context."""
    def ladder(top: int, far: int) -> list[int]:
        out = {1, 2, 3, top}
        p = 4
        while p <= top:
            out.update((p, p + p // 2, p - 1, p + 1))
            p *= 2
        while p <= far:
            out.add(p)
            p *= 2
        return sorted(n for n in out if 1 <= n <= max(top, far))

    return [(b, s) for b in ladder(max_batch, FAR_BATCH) for s in ladder(context, 4 * context)]


# ---- formulas ----------------------------------------------------------------------------------


class _Vec(dict):
    """Bytes as {term index: integer coefficient}; + and - by term."""

    def __add__(self, other):
        out = _Vec(self)
        for k, v in other.items():
            n = out.get(k, 0) + v
            if n:
                out[k] = n
            else:
                out.pop(k, None)
        return out

    def __sub__(self, other):
        return self + _Vec({k: -v for k, v in other.items()})


class _Terms:
    """Turns the sympy expressions of a trace into term vectors over b and s (shared by its regimes)."""

    def __init__(self, texts=()):
        self.texts: list[str] = list(texts) if "1" in texts else ["1", *texts]
        self.index: dict[str, int] = {t: i for i, t in enumerate(self.texts)}
        self.memo: dict = {}

    def vec(self, n, names: dict) -> _Vec:
        import sympy

        from memplan._compat import size_key

        expr = size_key(n)
        if isinstance(expr, int):
            return _Vec({self.index["1"]: expr}) if expr else _Vec()
        hit = self.memo.get(expr)
        if hit is not None:
            return hit
        out = _Vec()
        for part in sympy.Add.make_args(sympy.expand(expr)):
            coeff, rest = part.as_coeff_Mul()
            if not coeff.is_Integer:
                raise MemplanError(f"symbolic trace: a size {expr} has a non-integer coefficient")
            text = python(rest, names)
            i = self.index.setdefault(text, len(self.texts))
            if i == len(self.texts):
                self.texts.append(text)
            out = out + _Vec({i: int(coeff)})
        self.memo[expr] = out
        return out


def python(expr, names: dict) -> str:
    """A sympy expression of torch's ShapeEnv as a formula `memplan.profile` evaluates (b, s, integers,
    + - * // % ** and comparisons); MemplanError for any other function."""
    import sympy
    from torch.utils._sympy import functions as F

    def go(e) -> str:
        if e.is_Integer:
            return str(int(e))
        if e.is_Symbol:
            if e not in names:
                raise MemplanError(f"symbolic trace: a size depends on {e}, not only batch and seq")
            return names[e]
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(go(a) for a in e.args) + ")"
        if isinstance(e, sympy.Mul):
            return "(" + "*".join(go(a) for a in e.args) + ")"
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            return f"({go(e.base)})**{int(e.exp)}"
        if isinstance(e, F.FloorDiv):
            return f"(({go(e.args[0])})//({go(e.args[1])}))"
        if isinstance(e, F.CeilDiv):
            return f"(-((-({go(e.args[0])}))//({go(e.args[1])})))"
        if isinstance(e, (F.Mod, F.PythonMod, sympy.Mod)):
            return f"(({go(e.args[0])})%({go(e.args[1])}))"
        ops = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
               sympy.GreaterThan: ">=", sympy.Eq: "==", sympy.Ne: "!="}
        for kind, op in ops.items():
            if isinstance(e, kind):
                return f"({go(e.lhs)} {op} {go(e.rhs)})"
        if isinstance(e, sympy.And):
            return "(" + " and ".join(go(a) for a in e.args) + ")"
        if isinstance(e, sympy.Or):
            return "(" + " or ".join(go(a) for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"(not {go(e.args[0])})"
        if e is sympy.true:
            return "(1 == 1)"
        raise MemplanError(f"symbolic trace: cannot write {type(e).__name__} ({e}) as a profile formula")

    return go(expr)


class Pinned(MemplanError):
    """The step read a symbolic size as a concrete number (forward-grad does): no formula comes out."""


# ---- one regime --------------------------------------------------------------------------------


def _regime_condition(traced, names: dict) -> str:
    """The guards torch recorded, plus the symbols' ranges, plus `b == 1` / `s == 1` for a dim kept
    static: where this trace's op sequence holds."""
    env = traced.shape_env
    parts = []
    for letter, size in zip(("b", "s"), traced.sizes):
        if isinstance(size, int):
            parts.append(f"({letter} == {size})")
    for sym, letter in names.items():
        vr = env.var_to_range.get(sym)
        if vr is not None:
            for bound, op in ((vr.lower, ">="), (vr.upper, "<=")):
                if getattr(bound, "is_Integer", False):  # int_oo / -int_oo are not
                    parts.append(f"({letter} {op} {int(bound)})")
    for g in env.guards:
        expr = env.simplify(g.expr)
        text = python(expr, names)
        if text not in parts and text != "(1 == 1)":
            parts.append(text)
    return " and ".join(parts) or "(1 == 1)"


def _rows(traced, terms: _Terms, names: dict) -> list[tuple[Phase, dict[Category, _Vec]]]:
    """Every distinct moment of the measured step at which the live total can reach a new high."""
    walk = traced.tracker.walk(traced.start, nbytes=_vectors(terms, names))
    return distinct((phase, totals) for _, phase, _, totals in walk)


def distinct(moments) -> list[tuple[Phase, dict]]:
    """(phase, bytes by category) moments without repeats (a layer's are alike) and without empty
    categories; each category's bytes is a {term index: coefficient} mapping."""
    seen: dict[tuple, tuple[Phase, dict]] = {}
    for phase, cats in moments:
        k = (phase, tuple((c, tuple(sorted(v.items()))) for c, v in cats.items() if v))
        if k not in seen:
            seen[k] = (phase, {c: v for c, v in cats.items() if v})
    return list(seen.values())


def _prune(rows, term_texts: list[str], points: list[tuple[int, int]]) -> list[int]:
    """Indices of the rows that are the largest (overall or within their phase) at some grid point."""
    import numpy as np

    from memplan.profile import evaluate

    if not rows or not points:
        return []
    values = np.array([[evaluate(t, b, s) for t in term_texts] for b, s in points], dtype=np.float64)
    totals = np.zeros((len(rows), len(term_texts)))
    for j, (_, cats) in enumerate(rows):
        for v in cats.values():
            for i, k in v.items():
                totals[j, i] += k
    phases = np.array([list(Phase).index(ph) for ph, _ in rows])
    best = {}  # phase (-1: any) -> (score at each point, its row)
    for lo in range(0, len(rows), 4096):  # points x 4096 rows at a time: bounded memory at full depth
        scores = values @ totals[lo:lo + 4096].T
        for p in [-1, *set(phases[lo:lo + 4096].tolist())]:
            cols = np.arange(scores.shape[1]) if p < 0 else np.flatnonzero(phases[lo:lo + 4096] == p)
            arg = cols[np.argmax(scores[:, cols], axis=1)]
            top = scores[np.arange(len(points)), arg]
            if p not in best:
                best[p] = (top, arg + lo)
            else:
                old, rows_ = best[p]
                better = top > old
                best[p] = (np.where(better, top, old), np.where(better, arg + lo, rows_))
    return sorted({int(j) for _, js in best.values() for j in js})


# ---- the profile -------------------------------------------------------------------------------


def trace_profile(cfg: Config, *, into: Profile | None = None, at: tuple[int, int] | None = None,
                  min_seq: int = 2, max_batch: int = MAX_BATCH, context: int | None = None,
                  max_traces: int = MAX_TRACES, log=None) -> Profile:
    """The profile of `cfg` (its batch and seq are ignored): symbolic traces until the (b, s) grid with
    s >= `min_seq` is covered. `into`: a profile to extend with the regime of the point `at` (a query
    that fell outside its regimes). Sequences of 1 token are left to such a later extension: each
    regime costs a trace of the whole model, or of three shallow copies of it (`memplan.depth`)."""
    from memplan.build import model_config_dict
    from memplan.profile import evaluate

    name, config_dict = model_config_dict(cfg.model)
    context = context or context_length(config_dict)
    points = [p for p in grid(context, max_batch) if p[1] >= min_seq]
    terms = _Terms(into.terms if into else ())
    regimes = [(r.when, [(row.phase, {c: _Vec(dict(v)) for c, v in row.bytes.items()}) for row in r.rows])
               for r in into.regimes] if into else []
    uncovered = [p for p in points if _holds_none(p, regimes)] if at is None else []
    hints = [at] if at else [(1, min(512, context)), (min(4, max_batch), min(512, context))]
    facts = None
    pl = _depth_plan(config_dict)
    for _ in range(max_traces):
        hint = next((h for h in hints if _holds_none(h, regimes)), None)
        if hint is None and not uncovered:
            break
        hint = hint or uncovered[len(uncovered) // 2]
        start = time.perf_counter()
        found = _shallow_regime(cfg, config_dict, pl, hint, terms, log) if pl else None
        if found is None:
            found = _full_regime(cfg, hint, terms)
        when, rows, facts, how = found
        if not evaluate(when, *hint):  # the trace's own hint must lie in its regime, or the guards are wrong
            raise MemplanError(f"symbolic trace of {name}: its regime {when} excludes its hint {hint}")
        kept = _prune(rows, terms.texts, [p for p in [*points, hint] if evaluate(when, *p)])
        regimes.append((when, [rows[i] for i in kept]))
        uncovered = [p for p in uncovered if not evaluate(when, *p)]
        if log:
            log(f"traced {name} at b={hint[0]}, s={hint[1]} {how} in {time.perf_counter() - start:.1f} s: "
                f"{len(rows)} moments, {len(kept)} kept, regime {when}")
    if facts is None and into is None:
        raise MemplanError(f"symbolic trace of {name}: nothing to trace")
    return _profile(name, cfg, terms, regimes, facts, into)


@dataclass(frozen=True)
class _Facts:
    trainable_params: int
    total_params: int
    warnings: tuple


def _names(traced, hint, cfg: Config) -> dict:
    """The trace's batch and seq symbols by letter; Pinned where the step made one concrete."""
    names = {}
    for letter, size, want in zip(("b", "s"), traced.sizes, hint):
        if not isinstance(size, int):
            names[size.node.expr] = letter
            pinned = traced.shape_env.replace(size.node.expr)
            if pinned.is_Integer:
                raise Pinned(f"{cfg.method.value} pins {'batch' if letter == 'b' else 'seq'} to its "
                             f"hint {want}: its step does not trace symbolically")
    return names


def _full_regime(cfg: Config, hint, terms: _Terms):
    """(condition, moments, facts, how) of one symbolic trace of the whole model at `hint`."""
    from memplan.tracing import trace_step

    traced = trace_step(cfg.model_copy(update={"batch": hint[0], "seq": hint[1]}), symbolic=True)
    names = _names(traced, hint, cfg)
    facts = _Facts(traced.trainable_params, traced.total_params, tuple(traced.warnings))
    return _regime_condition(traced, names), _rows(traced, terms, names), facts, "at full depth"


def _depth_plan(config_dict: dict):
    from memplan import depth

    return depth.plan(config_dict)


def _shallow_regime(cfg: Config, config_dict: dict, pl, hint, terms: _Terms, log):
    """`_full_regime` from three shallow copies (`memplan.depth`); None where they do not extrapolate."""
    from memplan import depth
    from memplan.tracing import trace_step

    moments, whens, facts = [], [], []
    for d in pl.depths:
        try:
            with depth.ShallowCopy(config_dict, pl, d) as path:
                traced = trace_step(cfg.model_copy(update={"model": path, "batch": hint[0], "seq": hint[1]}),
                                    symbolic=True, layers=True)
        except MemplanError as e:  # the whole model says for itself what fails
            if log:
                log(f"{cfg.model}: a {d}-layer copy does not trace ({e}); tracing all {pl.layers} layers")
            return None
        names = _names(traced, hint, cfg)
        whens.append(_regime_condition(traced, names))
        moments.append(depth.keyed_moments(traced, pl, d, _vectors(terms, names)))
        facts.append(traced)
    n = pl.steps
    counts = [(f.trainable_params, f.total_params) for f in facts]
    ext = depth.extrapolate(moments, pl, _scale, _add, _equal) if len(set(whens)) == 1 else None
    if ext is None or any(c - b != b - a for a, b, c in zip(*counts)):
        if log:
            log(f"{cfg.model}: {pl.depths}-layer copies do not extrapolate in depth; tracing all {pl.layers} layers")
        return None
    (t1, p1), (t2, p2), _ = counts
    f = _Facts(t1 + n * (t2 - t1), p1 + n * (p2 - p1), tuple(facts[0].warnings))
    return whens[0], distinct(ext.values()), f, f"from {'/'.join(map(str, pl.depths))}-layer copies"


def _vectors(terms: _Terms, names: dict):
    vecs: dict[int, _Vec] = {}

    def nbytes(rec):
        if rec is None:
            return _Vec()
        v = vecs.get(id(rec))
        if v is None:
            v = vecs[id(rec)] = terms.vec(rec.nbytes, names)
        return v

    return nbytes


def _scale(v, k: int):
    return _Vec({i: k * x for i, x in (v or {}).items() if k * x})


def _add(a, b):
    return _Vec(a or {}) + _Vec(b or {})


def _equal(a, b) -> bool:
    return dict(a or {}) == dict(b or {})


def _holds_none(point, regimes) -> bool:
    from memplan.profile import evaluate

    return not any(evaluate(when, *point) for when, _ in regimes)


def _profile(name: str, cfg: Config, terms: _Terms, regimes, traced, into: Profile | None) -> Profile:
    """Keep only the terms the kept rows use, renumbered."""
    used = sorted({i for _, rows in regimes for _, cats in rows for v in cats.values() for i in v})
    new = {old: n for n, old in enumerate(used)}
    out = []
    for when, rows in regimes:
        out.append(Regime(when, tuple(
            Row(phase, {c: tuple(sorted((new[i], k) for i, k in v.items())) for c, v in cats.items()})
            for phase, cats in rows)))
    facts = traced or into
    return Profile(tuple(terms.texts[i] for i in used), tuple(out), model=name, options=options_of(cfg),
                   versions=installed_versions(), source="symbolic", trainable_params=facts.trainable_params,
                   total_params=facts.total_params, warnings=tuple(facts.warnings))




def build_profile(cfg: Config, *, at: tuple[int, int] | None = None, into: Profile | None = None,
                  log=None, min_seq: int = 2) -> Profile:
    """The profile of `cfg`: one symbolic trace per regime, or for a step that pins batch or seq
    (forward-grad's dual tensors do) or fails on symbolic sizes, the probe's fit over concrete traces
    (`memplan.probe`); a step that cannot be traced at all raises the probe's error.

    `at`: trace only the regime of this (b, s) (added to `into`, if given): a first estimate pays
    for one trace, and the other regimes are traced when a query first lands in them. `min_seq` 1
    covers one-token sequences too (a max-seq search starts there), at the cost of one more regime."""
    from memplan import methods
    from memplan.probe import probe_profile

    if methods.get(cfg.method).family is methods.Family.FG:  # known to pin: skip the wasted trace
        return probe_profile(cfg, log=log, at=at, into=into if into is not None and into.source == "probe" else None)
    try:
        return trace_profile(cfg, into=into, at=at, log=log, min_seq=min_seq)
    except MemplanError as e:  # pinned, or an op that takes no symbolic size (bert's token-type buffer)
        if log:
            log(f"{e}; probing instead")
        return probe_profile(cfg, log=log)
