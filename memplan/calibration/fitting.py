"""Fit the overhead model per GPU family from measured records -> `corrections.json`.

The analytic estimator predicts tensor bytes (`allocated`); three overheads take it to the device:
- `cublas_workspace_bytes`: what the first matmul allocates through torch (the worker measures it
  before building the model);
- `allocator_slack`: reserved = allocated * (1 + slack), rounded up to 2 MiB segments;
- `context_bytes`: what NVML shows beyond torch's reserved bytes (CUDA context, kernels, libraries).
Each is a median over the family's records, so one odd run does not move it; the spread is kept
beside it. Only records that ran (status ok) count.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from memplan.files import write_atomic

from memplan.units import GIB, MIB
SLACK_MIN_ALLOCATED = GIB  # below this, 2 MiB segment rounding, not slack, sets reserved / allocated


STATUSES = ("ok", "oom", "error", "timeout")
METERS = ("cuda", "cpu-live-bytes")
# Plausible fitted values; outside them a family is not written (the records are wrong, not the card).
BOUNDS = {"context_bytes": (0, 64 * GIB), "cublas_workspace_bytes": (0, 16 * GIB), "allocator_slack": (0.0, 1.0)}


def _is_bytes(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def invalid(rec) -> str | None:
    """Why a record cannot be used as a measurement (None when it can). Records that did not run
    (out of memory, errors) need only a known status; ok records need their byte counts."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    status, meter = rec.get("status"), rec.get("meter")
    if status not in STATUSES:
        return f"status {status!r} is not one of {', '.join(STATUSES)}"
    if meter not in METERS:
        return f"meter {meter!r} is not one of {', '.join(METERS)}"
    env = rec.get("env")
    if env is not None and not (isinstance(env, dict) and isinstance(env.get("family", ""), (str, type(None)))):
        return "env is not an object with a family name"
    if status != "ok":
        return None
    required = ["peak_allocated_bytes"] + (["peak_reserved_bytes"] if meter == "cuda" else [])
    for k in required:
        if not _is_bytes(rec.get(k)):
            return f"{k} is {rec.get(k)!r}, not a byte count (an int >= 0)"
    for k in ("peak_reserved_bytes", "context_bytes", "workspace_bytes"):
        if rec.get(k) is not None and not _is_bytes(rec[k]):
            return f"{k} is {rec[k]!r}, not a byte count (an int >= 0)"
    return None


def split_valid(recs: list) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(measured records that can be used, [(record, why not)] for the others); trace records pass."""
    good, bad = [], []
    for r in recs:
        why = invalid(r) if isinstance(r, dict) and r.get("tier", "measured") == "measured" else (
            None if isinstance(r, dict) else "not a JSON object")
        if why is None:
            good.append(r)
        else:
            bad.append((r, why))
    return good, bad


def implausible(f: dict) -> str | None:
    """Why a fitted family is not believable (None when it is)."""
    for k, (lo, hi) in BOUNDS.items():
        if not lo <= f[k] <= hi:
            return f"{k} {f[k]} outside [{lo}, {hi}]"
    return None


def _median_int(values: list[int]) -> int:
    return int(statistics.median(values))


def slack_of(allocated: int, reserved: int) -> float:
    """Slack of one record: reserved / allocated - 1 (never negative)."""
    return max(0.0, reserved / allocated - 1.0) if allocated > 0 else 0.0


def fit_family(recs: list[dict]) -> dict:
    """Context, workspace and slack of one family's ok records (each a median), with their spread."""
    contexts = [r["context_bytes"] for r in recs if r.get("context_bytes") is not None]
    workspaces = [r["workspace_bytes"] for r in recs if r.get("workspace_bytes") is not None]
    pairs = [(r["peak_allocated_bytes"], r["peak_reserved_bytes"]) for r in recs
             if r.get("peak_allocated_bytes") and r.get("peak_reserved_bytes") is not None]
    large = [p for p in pairs if p[0] >= SLACK_MIN_ALLOCATED] or pairs
    slacks = [slack_of(a, r) for a, r in large]
    out = {
        "context_bytes": _median_int(contexts) if contexts else 0,
        "allocator_slack": round(statistics.median(slacks), 4) if slacks else 0.0,
        "cublas_workspace_bytes": _median_int(workspaces) if workspaces else 0,
        "records": len(recs),
        "context_bytes_range": [min(contexts), max(contexts)] if contexts else None,
        "allocator_slack_range": [round(min(slacks), 4), round(max(slacks), 4)] if slacks else None,
        "slack_records": len(slacks),
    }
    return out


def _source(family: str, recs: list[dict]) -> str:
    envs = [r.get("env") or {} for r in recs]
    gpus = sorted({str(e.get("gpu") or "cpu") for e in envs})
    grids = sorted({str(r.get("grid", "?")) for r in recs})
    torch_v = sorted({str(e.get("torch") or "?") for e in envs})
    return (f"memplan calibrate fit: {len(recs)} measured records on {', '.join(gpus)} "
            f"(grid {', '.join(grids)}; torch {', '.join(torch_v)})")


def fit(recs: list[dict], *, include_cpu: bool = False,
        warnings: list[str] | None = None) -> tuple[dict, list[str]]:
    """(the corrections document, notes). Families come from each record's environment. Records
    that are not valid measurements are left out, and so are families whose fit is implausible;
    both are said in `warnings`."""
    warnings = [] if warnings is None else warnings
    recs, bad = split_valid(recs)
    if bad:
        warnings.append(f"skipped {len(bad)} invalid record{'s' if len(bad) != 1 else ''} "
                        f"(first: {bad[0][1]})")
    by_family: dict[str, list[dict]] = {}
    skipped_cpu = 0
    for r in recs:
        if r.get("tier", "measured") != "measured" or r.get("status") != "ok":
            continue
        fam = (r.get("env") or {}).get("family") or "default"
        if r.get("meter") != "cuda" and not include_cpu:
            skipped_cpu += 1
            continue
        by_family.setdefault(fam, []).append(r)
    notes = []
    if skipped_cpu:
        notes.append(f"skipped {skipped_cpu} CPU-meter records (no allocator or context to fit); "
                     "--include-cpu fits them as family 'cpu'")
    families = {}
    for fam in sorted(by_family):
        f = {**fit_family(by_family[fam]), "source": _source(fam, by_family[fam])}
        why = implausible(f)
        if why:
            warnings.append(f"{fam}: not fitted: {why} (from {f['records']} records)")
            continue
        families[fam] = f
        notes.append(f"{fam}: context {f['context_bytes'] / MIB:.0f} MiB, slack {f['allocator_slack']:.3f}, "
                     f"workspace {f['cublas_workspace_bytes'] / MIB:.0f} MiB from {f['records']} records")
    doc = {"about": "Overhead corrections per GPU family, fitted from measured records by `memplan calibrate fit`. "
                    "Do not edit by hand.", "families": families}
    return doc, notes


def write(doc: dict, paths: list[str | Path]) -> None:
    """Write the same document to every path, each atomically."""
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    for p in paths:
        write_atomic(p, text)
