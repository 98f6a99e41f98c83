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
from memplan.result import Category, Phase

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


def _moments(cfg: Config, b: int, s: int) -> tuple[list[Phase], "object", object]:
    """(phase of each moment, moments x categories bytes, the trace) of one concrete trace."""
    import numpy as np

    from memplan.tracing import trace_step

    traced = trace_step(cfg.model_copy(update={"batch": b, "seq": s}))
    cats = list(Category)
    phases, rows = [], []
    for _, phase, _, totals in traced.tracker.walk(traced.start):
        phases.append(phase)
        rows.append([totals[c] for c in cats])
    return phases, np.array(rows, dtype=np.float64), traced


def probe_profile(cfg: Config, *, log=None) -> Profile:
    """Fit the profile of `cfg` (its batch and seq are ignored) from 11 concrete traces (22 with a window)."""
    import numpy as np

    from memplan.build import model_config_dict
    from memplan.profile import evaluate
    from memplan.symbolic import _prune, grid

    name, config_dict = model_config_dict(cfg.model)
    context = context_length(config_dict)
    points_all = grid(context)
    regimes, traced = [], None
    cats = list(Category)
    # A fit sees no regime edges of its own: the window split comes from the config.
    for when, points, terms in fit_regimes(config_dict, context):
        start = time.perf_counter()
        runs = [_moments(cfg, b, s) for b, s in points]
        traced = runs[-1][2]
        lengths = {len(p) for p, _, _ in runs}
        if len(lengths) != 1 or any(p != runs[0][0] for p, _, _ in runs):
            raise MemplanError(f"probe of {name} {cfg.method.value}: the step's moments differ between "
                               f"(b, s) points of one regime, so they cannot be fitted ({sorted(lengths)})")
        X = np.array([[evaluate(t, b, s) for t in terms] for b, s in points], dtype=np.float64)
        Y = np.stack([m for _, m, _ in runs])  # points x moments x categories
        flat = Y.reshape(len(points), -1)
        coef, *_ = np.linalg.lstsq(X, flat, rcond=None)
        coef = np.rint(coef).astype(np.int64).reshape(len(terms), *Y.shape[1:])  # terms x moments x cats
        phases = runs[0][0]
        rows = []
        for j, ph in enumerate(phases):
            by_cat = {}
            for ci, c in enumerate(cats):
                v = {i: int(coef[i, j, ci]) for i in range(len(terms)) if coef[i, j, ci]}
                if v:
                    by_cat[c] = v
            rows.append((ph, by_cat))
        # moments repeat (a layer's are alike): keep one of each
        unique = list({(ph, tuple((c, tuple(sorted(v.items()))) for c, v in bc.items())): (ph, bc)
                       for ph, bc in rows}.values())
        kept = _prune(unique, list(TERMS), [p for p in points_all if evaluate(when, *p)])
        regimes.append(Regime(when, tuple(Row(ph, {c: tuple(sorted(v.items())) for c, v in bc.items()})
                                          for ph, bc in (unique[i] for i in kept))))
        if log:
            log(f"probed {name} {when} from {len(points)} traces in {time.perf_counter() - start:.1f} s: "
                f"{len(phases)} moments, {len(kept)} kept")
    return Profile(TERMS, tuple(regimes), model=name, options=options_of(cfg), versions=installed_versions(),
                   source="probe", trainable_params=traced.trainable_params, total_params=traced.total_params,
                   warnings=tuple(traced.warnings))
