"""Profiles fitted from concrete traces, for steps that do not trace symbolically (forward-grad).

A step runs the same ops at every (b, s) of one regime (b = 1 runs a few fewer: size-1 dims turn
copies into views), so the k-th moment of the replay (`LiveBytes.walk`) is the same moment at every
point: its live bytes per category are a polynomial in b and s, up to the 512-byte rounding. Each
moment is fitted by least squares over a few traced points, its coefficients rounded to integers,
and the moments that can be the largest on the (b, s) grid are kept: the same `Profile` a symbolic
trace gives, with `source: probe`.

Regimes: b = 1 from four lengths (128, 256, 384, 512) with terms 1, s, s^2; b >= 2 from seven
points with terms 1, s, s^2, b, b s, b s^2 (quadratic in s: eager attention scores). A config with
a sliding window gets both fitted again past it (sdpa keeps a mask there); other edges inside a
regime are not seen by a probe: its error against full traces is in calibration/ANALYTIC-VS-TRACE.md.
Imports torch and numpy.
"""

from __future__ import annotations

import time

from memplan.errors import MemplanError
from memplan.options import Config
from memplan.profile import Profile, Regime, Row, context_length, installed_versions, options_of
from memplan.result import Category

B1_TERMS = ("1", "s", "s*s")
BN_TERMS = ("1", "s", "s*s", "b", "b*s", "b*s*s")
TERMS = BN_TERMS  # the profile's terms: the b = 1 regime uses the first three


def _lengths(lo: int, hi: int | None) -> tuple[int, int, int, int]:
    """Four sequence lengths to fit a seq range on: 128 apart from the first multiple of 128 (512-byte
    rounding is exact there), closer where the range is short."""
    if hi is None or hi - lo >= 4 * 128:
        first = -(-max(lo, 2) // 128) * 128
        return tuple(first + 128 * k for k in range(4))
    lo = max(lo, 2)  # one-token sequences run other ops (size-1 dims)
    first = -(-lo // 16) * 16
    if hi - first >= 3 * 16:  # multiples of 16: the small tensors' 512-byte rounding stays near-polynomial
        step = (hi - first) // 3 // 16 * 16
        return tuple(first + step * k for k in range(4))
    step = max(1, (hi - lo) // 3)
    return tuple(min(hi, lo + step * k) for k in range(4))


def fit_regimes(config_dict: dict, context: int) -> list[tuple[str, tuple, tuple]]:
    """(condition, (b, s) points, terms) of each regime the probe fits: b = 1 and b >= 2, each split at
    the sliding window where the config has one (sdpa keeps a mask only past it)."""
    window = config_dict.get("sliding_window")
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 2 else None
    ranges = [(1, window - 1), (window, None)] if window else [(1, None)]
    out = []
    for lo, hi in ranges:
        seq = f"(s >= {lo})" + (f" and (s <= {hi})" if hi else "")
        # fit inside the position table (learned positions end there); the formulas hold past it
        s0, s1, s2, s3 = _lengths(lo, hi if hi or context >= lo + 4 * 128 else context)
        out.append((f"(b == 1) and {seq}", ((1, s0), (1, s1), (1, s2), (1, s3)), B1_TERMS))
        out.append((f"(b >= 2) and {seq}", ((2, s0), (2, s1), (2, s3), (3, s1), (4, s0), (4, s2), (4, s1)), BN_TERMS))
    return out


def _moments(cfg: Config, b: int, s: int, pl=None, depth: int = 0) -> tuple[dict, object]:
    """({key: (phase, {category: bytes})}, the trace) of one concrete trace: the key of a moment is its
    place in the replay, or in a shallow copy (`pl`, `depth` layers, `cfg.model` its config) the
    layer-labelled key of `memplan.depth`."""
    from memplan.depth import keyed_moments
    from memplan.tracing import trace_step

    traced = trace_step(cfg.model_copy(update={"batch": b, "seq": s}), layers=pl is not None)
    if pl is not None:
        return keyed_moments(traced, pl, depth, None), traced
    out = {}
    for k, (_, phase, _, totals) in enumerate(traced.tracker.walk(traced.start)):
        out[k] = (phase, dict(totals))
    return out, traced


def _fit(runs: list[dict], points, terms, name: str, cfg: Config) -> dict:
    """{key: (phase, {category: {term index: integer coefficient}})}: each moment's bytes fitted by least
    squares over the points, rounded to integers."""
    import numpy as np

    from memplan.profile import evaluate

    keys = list(runs[0])
    if any(list(r) != keys or any(r[k][0] != runs[0][k][0] for k in keys) for r in runs):
        raise MemplanError(f"probe of {name} {cfg.method.value}: the step's moments differ between (b, s) points "
                           f"of one regime, so they cannot be fitted ({sorted({len(r) for r in runs})})")
    cats = list(Category)
    X = np.array([[evaluate(t, b, s) for t in terms] for b, s in points], dtype=np.float64)
    Y = np.array([[[r[k][1].get(c, 0) for c in cats] for k in keys] for r in runs], dtype=np.float64)
    coef, *_ = np.linalg.lstsq(X, Y.reshape(len(points), -1), rcond=None)
    coef = np.rint(coef).astype(np.int64).reshape(len(terms), len(keys), len(cats))
    out = {}
    for j, k in enumerate(keys):
        by_cat = {}
        for ci, c in enumerate(cats):
            v = {i: int(coef[i, j, ci]) for i in range(len(terms)) if coef[i, j, ci]}
            if v:
                by_cat[c] = v
        out[k] = (runs[0][k][0], by_cat)
    return out


def _fitted_regime(cfg: Config, config_dict: dict, name: str, points, terms, pl, log):
    """(fitted moments, facts) of one regime: at full depth, or (`pl`) from two shallow copies, checked by
    a third at the regime's first point; None where that check fails (the caller probes the whole model)."""
    from memplan import depth
    from memplan.symbolic import _add, _equal, _Facts, _scale

    if pl is None:
        runs = [_moments(cfg, b, s) for b, s in points]
        traced = runs[-1][1]
        facts = _Facts(traced.trainable_params, traced.total_params, tuple(traced.warnings))
        return _fit([m for m, _ in runs], points, terms, name, cfg), facts
    fits, firsts, counts = [], [], []
    try:
        for d in pl.depths:
            with depth.ShallowCopy(config_dict, pl, d) as path:
                copy = cfg.model_copy(update={"model": path})
                if d == pl.depths[2]:
                    first, traced = _moments(copy, *points[0], pl, d)
                    firsts.append(first)
                    counts.append((traced.trainable_params, traced.total_params))
                    break
                runs = [_moments(copy, b, s, pl, d) for b, s in points]
            firsts.append(runs[0][0])
            counts.append((runs[0][1].trainable_params, runs[0][1].total_params))
            fits.append(_fit([m for m, _ in runs], points, terms, name, cfg))
    except MemplanError as e:  # the whole model says for itself what fails
        if log:
            log(f"{name}: a shallow copy does not trace ({e}); probing all {pl.layers} layers")
        return None
    plain = (lambda v, k: (v or 0) * k), (lambda a, b: (a or 0) + (b or 0)), (lambda a, b: (a or 0) == (b or 0))
    if depth.extrapolate(firsts, pl, *plain) is None or any(c - b != b - a for a, b, c in zip(*counts)):
        if log:
            log(f"{name}: {pl.depths}-layer copies do not extrapolate in depth; probing all {pl.layers} layers")
        return None
    (t1, p1), (t2, p2), _ = counts
    facts = _Facts(t1 + pl.steps * (t2 - t1), p1 + pl.steps * (p2 - p1), tuple(traced.warnings))
    return depth.extrapolate(fits, pl, _scale, _add, _equal), facts


def probe_profile(cfg: Config, *, log=None, at: tuple[int, int] | None = None, into: Profile | None = None) -> Profile:
    """Fit the profile of `cfg` (its batch and seq are ignored) from 11 concrete traces (22 with a window);
    a model of many layers from shallow copies of it (`memplan.depth`: 4 or 7 traces of each of two
    copies per regime, and one of a third). `at`: fit only the regime of that (b, s), added to `into`."""
    from memplan.build import model_config_dict
    from memplan.depth import plan
    from memplan.profile import evaluate
    from memplan.symbolic import _prune, distinct, grid

    name, config_dict = model_config_dict(cfg.model)
    context = context_length(config_dict)
    points_all = grid(context)
    pl = plan(config_dict)
    regimes, facts = list(into.regimes) if into else [], into
    for when, points, terms in fit_regimes(config_dict, context):
        if at is not None and not evaluate(when, *at) or any(r.when == when for r in regimes):
            continue
        start = time.perf_counter()
        found = _fitted_regime(cfg, config_dict, name, points, terms, pl, log) if pl else None
        how = f"from {'/'.join(map(str, pl.depths))}-layer copies" if found is not None else "at full depth"
        if found is None:
            pl = None
            found = _fitted_regime(cfg, config_dict, name, points, terms, None, log)
        fitted, made = found
        unique = distinct(fitted.values())
        kept = _prune(unique, list(TERMS), [p for p in points_all if evaluate(when, *p)])
        regimes.append(Regime(when, tuple(Row(ph, {c: tuple(sorted(v.items())) for c, v in bc.items()})
                                          for ph, bc in (unique[i] for i in kept))))
        facts = facts or made
        if log:
            log(f"probed {name} {when} {how} in {time.perf_counter() - start:.1f} s: "
                f"{len(fitted)} moments, {len(kept)} kept")
    if facts is None:
        raise MemplanError(f"probe of {name}: no regime holds b={at[0]}, s={at[1]}" if at else
                           f"probe of {name}: nothing to fit")
    return Profile(TERMS, tuple(regimes), model=name, options=options_of(cfg), versions=installed_versions(),
                   source="probe", trainable_params=facts.trainable_params, total_params=facts.total_params,
                   warnings=tuple(facts.warnings))

