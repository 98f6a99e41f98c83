"""What every analytic-against-trace script shares: the small GQA Llama, a resumable run that traces
each grid row once and appends one JSON line per record, re-estimating recorded rows, and the error
summary. Each script keeps its grid, its Config for a row and its table.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Formulas are what these grids measure: no profile traced on first use, none read from a cache.
os.environ["MEMPLAN_TRACE"] = "never"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="memplan-grid-")

from memplan.result import Category  # noqa: E402

# A 4-layer Llama with grouped-query attention, gated MLP, RMSNorm and an untied head.
LLAMA_GQA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1376,
             "max_position_embeddings": 2048, "tie_word_embeddings": False}


@contextlib.contextmanager
def llama_gqa() -> Iterator[str]:
    """The path of a config.json of `LLAMA_GQA`, for the block's duration."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(LLAMA_GQA))
        yield str(path)


def analytic_bytes(cfg) -> tuple[int, str]:
    """The analytic tier's peak allocated bytes without the cuBLAS workspace (the trace cannot see it),
    and its peak phase."""
    from memplan.api import estimate_config

    est = estimate_config(cfg, search=False)
    return est.peak_allocated_bytes - est.components.get(Category.WORKSPACE, 0), est.peak_phase.value


@contextlib.contextmanager
def no_profiles() -> Iterator[None]:
    """Within: no profile is read (cached or shipped) or traced, so the closed-form formulas answer."""
    from memplan import profile

    find, trace = profile.find, os.environ.get("MEMPLAN_TRACE")
    profile.find = lambda *args, **kwargs: None
    os.environ["MEMPLAN_TRACE"] = "never"
    try:
        yield
    finally:
        profile.find = find
        if trace is None:
            os.environ.pop("MEMPLAN_TRACE", None)
        else:
            os.environ["MEMPLAN_TRACE"] = trace


def formula_bytes(cfg) -> int:
    """`analytic_bytes` from the closed-form formulas alone: what the analytic tier answers without a
    profile."""
    with no_profiles():
        return analytic_bytes(cfg)[0]


def key(row) -> str:
    return json.dumps(list(row))


def run(rows: list[tuple], out: Path, fields: tuple[str, ...], config: Callable, estimate: Callable, *,
        fresh: bool = False, traced_fields: Callable = lambda peak: {}, skip_refused: bool = True) -> list[dict]:
    """Trace every row not yet recorded in `out` (all with `fresh`), appending one JSON line per record,
    and return the records of `rows` in order.

    `config(row, llama_path)` is the row's Config; `estimate(cfg)` the analytic fields of its record
    (at least `analytic_bytes`); `traced_fields(peak)` any trace fields beyond bytes, phase and
    components. With `skip_refused`, a row the trace refuses is reported and left out.
    """
    from memplan.errors import MemplanError
    from memplan.tracing import trace_step

    done = {} if fresh or not out.is_file() else {
        key(row_of(r, fields)): r for r in map(json.loads, out.read_text().splitlines()) if r}
    if fresh and out.is_file():
        out.unlink()
    with llama_gqa() as llama:
        for i, row in enumerate(rows, 1):
            if key(row) in done:
                continue
            cfg = config(row, llama)
            start = time.perf_counter()
            try:
                traced = trace_step(cfg)
            except MemplanError as e:
                if not skip_refused:
                    raise
                print(f"[{i}/{len(rows)}] {row}: cannot trace: {e}", flush=True)
                continue
            peak = traced.peak
            rec = {"config": dict(zip(fields, row)), "trace_bytes": peak.allocated, "trace_phase": peak.phase.value,
                   "trace_components": {c.value: n for c, n in peak.components.items()}, **traced_fields(peak),
                   "trace_seconds": round(time.perf_counter() - start, 1), **estimate(cfg)}
            with out.open("a") as f:  # one whole line per record: a killed run resumes where it stopped
                f.write(json.dumps(rec) + "\n")
            done[key(row)] = rec
            err = f"{error(rec):+.2%}" if rec["analytic_bytes"] is not None else rec.get("analytic_phase")
            print(f"[{i}/{len(rows)}] {row}: analytic {rec['analytic_bytes']} trace {peak.allocated:,} ({err})",
                  flush=True)
    return [done[key(r)] for r in rows if key(r) in done]


def recheck(records: list[dict], fields: tuple[str, ...], config: Callable, estimate: Callable) -> list[dict]:
    """Re-estimate every recorded row with the current analytic model (its trace fields kept)."""
    with llama_gqa() as llama:
        for rec in records:
            rec.update(estimate(config(row_of(rec, fields), llama)))
    return records


def read(path: Path) -> list[dict]:
    """The records of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_from_cli(grid: list[tuple], path: Path, run: Callable, recheck: Callable, *,
                     limit: bool = False) -> list[dict]:
    """What every grid script's command line does: `--check` re-estimates the recorded rows; otherwise
    the rows not yet recorded are traced first (`--fresh`: every row; `--limit N`: the first N, where
    the script offers it). Either way the records come back re-estimated with today's model."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="re-estimate against the recorded traces only")
    parser.add_argument("--fresh", action="store_true", help="trace every configuration again")
    if limit:
        parser.add_argument("--limit", type=int, default=None, help="trace only the first N rows")
    args = parser.parse_args()
    if args.check:
        return recheck(read(path))
    return recheck(run(grid[:getattr(args, "limit", None)], path, fresh=args.fresh))


def row_of(rec: dict, fields: tuple[str, ...]) -> tuple:
    """A record's grid row."""
    return tuple(rec["config"][f] for f in fields)


def error(rec: dict) -> float:
    return (rec["analytic_bytes"] - rec["trace_bytes"]) / rec["trace_bytes"]


def summary(records: list[dict]) -> tuple[float, float]:
    """(median, worst) absolute error."""
    errs = [abs(error(r)) for r in records]
    return statistics.median(errs), max(errs)
