"""Profiles fitted from concrete traces, for steps that do not trace symbolically (forward-grad).

A step runs the same ops at every (b, s) of one regime (b = 1 runs a few fewer: size-1 dims turn
copies into views), so the k-th moment of the replay (`LiveBytes.walk`) is the same moment at every
point: its live bytes per category are a polynomial in b and s, up to the 512-byte rounding. Each
moment is fitted by least squares over a few traced points, its coefficients rounded to integers,
and the moments that can be the largest on the (b, s) grid are kept: the same `Profile` a symbolic
trace gives, with `source: probe`.

Regimes: b = 1 from s in {128, 256, 384, 512} with terms 1, s, s^2; b >= 2 from seven points with
terms 1, s, s^2, b, b s, b s^2 (quadratic in s: eager attention scores). Points are scaled down
for a model with a shorter context. Sequence-length edges inside a regime (a sliding window) are not
seen by a probe; its error against full traces is published in calibration/ANALYTIC-VS-TRACE.md.
Imports torch and numpy.
"""

from __future__ import annotations

import time

from memplan.errors import MemplanError
from memplan.options import Config
from memplan.profile import Profile, Regime, Row, context_length, installed_versions, options_of
from memplan.result import Category, Phase

B1_POINTS = ((1, 128), (1, 256), (1, 384), (1, 512))
B1_TERMS = ("1", "s", "s*s")
BN_POINTS = ((2, 128), (2, 256), (2, 512), (3, 256), (4, 128), (4, 384), (4, 256))
BN_TERMS = ("1", "s", "s*s", "b", "b*s", "b*s*s")
TERMS = BN_TERMS  # the profile's terms: the b = 1 regime uses the first three


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


def _scaled(points, context: int):
    """The probe's points, with seq scaled down (to multiples of 16) for a short context."""
    if context >= 512:
        return points
    f = context / 512
    return tuple((b, max(2, int(s * f) // 16 * 16 or 2)) for b, s in points)


def probe_profile(cfg: Config, *, log=None) -> Profile:
    """Fit the profile of `cfg` (its batch and seq are ignored) from 11 concrete traces."""
    import numpy as np

    from memplan.build import model_config_dict
    from memplan.profile import evaluate
    from memplan.symbolic import _prune, grid

    name, config_dict = model_config_dict(cfg.model)
    context = context_length(config_dict)
    points_all = grid(context)
    regimes, traced = [], None
    cats = list(Category)
    # A fit has no regime edges of its own: each covers every sequence length of its batch regime.
    for when, points, terms in (("(b == 1) and (s >= 1)", B1_POINTS, B1_TERMS),
                                ("(b >= 2) and (s >= 1)", BN_POINTS, BN_TERMS)):
        start = time.perf_counter()
        points = _scaled(points, context)
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
