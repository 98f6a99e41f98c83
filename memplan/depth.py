"""A deep model's profile from the steps of shallow copies of it: bytes are affine in the depth.

Tracing costs time in proportion to the layers (about 0.45 s a layer here, 22 s for Qwen3-8B's 36,
50 s for an 80-layer model). The layers of a decoder repeat: from some layer `H` on, layer i and
layer i + P are built alike (P = 1, or the period of `layer_types`: 2 for Gemma-2, 6 for Gemma-3).
A copy of the model with k more periods runs k more periods of the same ops, so at each moment of
the step the live bytes grow by the same amount per period: bytes(L) = bytes(L1) + n (bytes(L2) -
bytes(L1)), n = (L - L1) / P. A moment inside a middle period is never the largest: at the same
place in each period its bytes are affine in the period's index, so the moment of the first or the
last period is at least as large.

How moments of two depths are matched: the tracker labels each op by the decoder layer whose
parameters it reads (`LiveBytes.label_layers`). A moment belongs to the last layer read: its key is
(its phase boundary, that layer's class -- none yet, the i-th from the start, the i-th from the
end, several at once as in a foreach optimizer step -- the run of that class, its place in the run).
Moments of middle layers are dropped. Only moments that end a run of allocations are keys (an
allocation followed by another is the smaller of the two), so an op that allocates one output per
layer (foreach) is one key at every depth. A layer's first ops, before it reads a parameter, belong
to the layer before it; so the labelled stretches are two periods at each end (`H + 2P` from the
start, `2P + r` from the end), which keeps the extreme period's every moment under its own label.

The copies have `H + 4P + r`, `+ 5P` and `+ 6P` layers (r = (L - H) mod P, so the last layers'
kinds match the model's), with per-layer config lists (`layer_types`) cut to the layers kept. The
third copy checks the first two: every key's bytes must be exactly the extrapolation, the keys and
the regime's guards the same; anything else, and the model is traced at its full depth.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MAX_PERIOD = 8
TRACE_BASE_LAYERS = 3  # a trace's fixed cost (build, warm-up), in layers' worth of time (benchmarks/first_use.py)


@dataclass(frozen=True)
class Plan:
    """How to extrapolate a model of `layers` layers: labelled `head` from the start, `tail` from the
    end, copies of `depths` layers (the third checks the other two), `period` layers a step."""

    layers: int
    head: int
    tail: int
    period: int
    depths: tuple[int, int, int]

    @property
    def steps(self) -> int:
        """Periods from the first copy to the model."""
        return (self.layers - self.depths[0]) // self.period

    def kind(self, i: int, depth: int):
        """A layer label's class in a copy of `depth` layers: ("h", i), ("t", i - depth) or "m" (middle)."""
        if i < 0:
            return "multi"
        if i < self.head and i < depth - self.tail:
            return ("h", i)
        if i >= depth - self.tail:
            return ("t", i - depth)
        return "m"


def layer_count(config: dict) -> tuple[str, int] | None:
    """(key, value) of a config's layer count, under the name transformers' config class reads."""
    try:
        obj = _config_object(config)
    except Exception:  # noqa: BLE001 -- any config transformers cannot build is traced whole
        return None
    n = getattr(obj, "num_hidden_layers", None)
    if not isinstance(n, int):
        return None
    key = type(obj).attribute_map.get("num_hidden_layers", "num_hidden_layers")
    return key, n


def _config_object(config: dict):
    """transformers' config object of a config dict (built once per dict: a plan and each copy ask)."""
    return _built(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=16)
def _built(config_json: str):
    from transformers import AutoConfig

    config = json.loads(config_json)
    return AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})


def _signatures(config: dict, n: int) -> list[tuple]:
    """What makes layer i what it is: its parameters' names and shapes (the tensor table) and every
    per-layer config list (`layer_types`, `mlp_only_layers` membership...)."""
    from memplan import tables

    obj = _config_object(config)
    per_layer = {k: v for k, v in vars(obj).items() if isinstance(v, (list, tuple)) and len(v) == n}
    sig: list[list] = [[tuple((k, _hashable(v[i])) for k, v in sorted(per_layer.items()))] for i in range(n)]
    only = getattr(obj, "mlp_only_layers", None) or ()
    for i in range(n):
        sig[i].append(i in only)
    if tables.table(config.get("model_type")) is not None:
        for e in tables.tensors(config):
            if e.layer is not None:
                sig[e.layer].append((re.sub(rf"\.{e.layer}\.", ".#.", e.name, count=1), e.shape))
    return [tuple(sorted(map(repr, s))) for s in sig]


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def plan(config: dict) -> Plan | None:
    """The extrapolation plan of a config, or None where tracing it whole is as cheap (or it cannot be
    planned: a config transformers cannot build, no repeating layers)."""
    found = layer_count(config)
    if found is None:
        return None
    _, n = found
    try:
        sig = _signatures(config, n)
    except Exception:  # noqa: BLE001 -- a table refusing the config: trace it whole
        return None
    best = None
    for p in range(1, MAX_PERIOD + 1):
        for h in range(0, n):
            if all(sig[i] == sig[i + p] for i in range(h, n - p)):
                if best is None or h + p < best[0] + best[1]:
                    best = (h, p)
                break
    if best is None:
        return None
    h, p = best
    r = (n - h) % p
    first = h + 4 * p + r
    depths = (first, first + p, first + 2 * p)
    if sum(depths) + 3 * TRACE_BASE_LAYERS >= n:  # three copies would take as long as the model
        return None
    return Plan(n, h + 2 * p, 2 * p + r, p, depths)


def shallow_config(config: dict, pl: Plan, depth: int) -> dict:
    """The config of a copy with `depth` layers: the first `depth - tail` layers and the last `tail`."""
    obj = _config_object(config)
    key, _ = layer_count(config)
    n = pl.layers
    kept = [*range(depth - pl.tail), *range(n - pl.tail, n)]
    out = dict(config)
    for k in {key, "num_hidden_layers"} | {a for a, b in type(obj).attribute_map.items() if b == key}:
        if k in out or k == key:
            out[k] = depth
    for k, v in vars(obj).items():
        if isinstance(v, (list, tuple)) and len(v) == n and not k.startswith("_"):
            out[k] = [v[i] for i in kept]
    only = getattr(obj, "mlp_only_layers", None)
    if only:
        out["mlp_only_layers"] = [j for j, i in enumerate(kept) if i in only]
    return out


class ShallowCopy:
    """A config.json folder for a copy of the model with fewer layers (removed on exit)."""

    def __init__(self, config: dict, pl: Plan, depth: int):
        self.config = shallow_config(config, pl, depth)

    def __enter__(self) -> str:
        self._dir = tempfile.TemporaryDirectory(prefix="memplan-depth-")
        path = Path(self._dir.name)
        (path / "config.json").write_text(json.dumps(self.config))
        return str(path)

    def __exit__(self, *exc):
        self._dir.cleanup()


def keyed_moments(traced, pl: Plan, depth: int, nbytes) -> dict:
    """{key: (phase, {category: bytes})} of the moments that end a run of allocations (see the module
    doc), in a copy of `depth` layers; `nbytes(rec)` gives a record's bytes (a formula vector)."""
    from memplan.tracker import _ALLOC, _LAYER, _PHASE

    out: dict = {}
    boundary, kind, runs, ordinal, pending = -1, None, {}, 0, None

    def emit(moment):
        nonlocal ordinal
        if kind == "m":
            return
        out[(boundary, kind, runs.get(kind, 0), ordinal)] = moment
        ordinal += 1

    for ev, phase, _, totals in traced.tracker.walk(traced.start, nbytes=nbytes, labels=True):
        what = ev[0] if ev is not None else None
        if what == _ALLOC:
            pending = (phase, dict(totals))
            continue
        if pending is not None:
            emit(pending)
            pending = None
        if what == _PHASE or ev is None:
            boundary += 1
            kind, runs, ordinal = None, {}, 0
            emit((phase, dict(totals)))
        elif what == _LAYER:
            k = pl.kind(ev[1], depth)
            if k != kind:
                kind = k
                runs[k] = runs.get(k, 0) + 1
                ordinal = 0
    if pending is not None:
        emit(pending)
    return out


def extrapolate(moments: list[dict], pl: Plan, scale, add, equal) -> dict | None:
    """The model's moments from those of the first two copies; given the third copy's too, None where it
    is not exactly their extrapolation (or the keys or phases differ). `scale(v, k)`, `add(a, b)` and
    `equal(a, b)` work on one category's bytes (a formula vector, or an integer)."""
    one, two = moments[0], moments[1]
    three = moments[2] if len(moments) > 2 else None
    if one.keys() != two.keys() or three is not None and three.keys() != one.keys():
        return None
    out = {}
    for key, (phase, c1) in one.items():
        p2, c2 = two[key]
        if p2 != phase or three is not None and three[key][0] != phase:
            return None
        cats = set(c1) | set(c2) | (set(three[key][1]) if three is not None else set())
        step = {c: add(c2.get(c), scale(c1.get(c), -1)) for c in cats}
        if three is not None and any(not equal(add(c1.get(c), scale(step[c], 2)), three[key][1].get(c))
                                     for c in cats):
            return None
        out[key] = (phase, {c: add(c1.get(c), scale(step[c], pl.steps)) for c in cats})
    return out
