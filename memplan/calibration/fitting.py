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
    gpus = sorted({e.get("gpu") or "cpu" for e in envs})
    grids = sorted({r.get("grid", "?") for r in recs})
    torch_v = sorted({e.get("torch") or "?" for e in envs})
    return (f"memplan calibrate fit: {len(recs)} measured records on {', '.join(gpus)} "
            f"(grid {', '.join(grids)}; torch {', '.join(torch_v)})")


def fit(recs: list[dict], *, include_cpu: bool = False) -> tuple[dict, list[str]]:
    """(the corrections document, notes). Families come from each record's environment."""
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
        families[fam] = {**fit_family(by_family[fam]), "source": _source(fam, by_family[fam])}
        f = families[fam]
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
