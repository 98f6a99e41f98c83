"""The analytic tier against the trace tier for chosen methods, over the issue's grid.

Grid: ft / lora / prefix / prompt x fp32 / fp16 / bf16 x two families (OPT-125m from the catalog and
the 4-layer GQA Llama of `analytic_vs_trace.py`), batch 4 x 128 tokens, sdpa. Prints one line per
configuration and the median and worst absolute error; with `--out FILE` also appends the section
as a markdown table (the recorded grid of the first eight methods lives in `analytic_vs_trace.py`).

Run: python calibration/methods_vs_trace.py hizoo mezo-svrg [--set svrg_interval=1] [--batch 4 --seq 128]
     [--out calibration/METHODS-VS-TRACE.md]   (what is recorded there: see that file's sections)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Formulas are what these grids measure: no profile traced on first use, none read from a cache.
os.environ["MEMPLAN_TRACE"] = "never"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="memplan-grid-")
sys.path.insert(0, str(ROOT / "calibration"))

from analytic_vs_trace import LLAMA_GQA  # noqa: E402

SCHEMES = ("ft", "lora", "prefix", "prompt")
DTYPES = ("fp32", "fp16", "bf16")
MODELS = ("opt-125m", "llama-gqa")


def compare(cfg) -> tuple[int, int, str, str]:
    """(trace bytes, analytic bytes without the workspace, trace phase, analytic phase)."""
    from memplan.api import estimate_config
    from memplan.result import Category
    from memplan.tracing import trace_step

    traced = trace_step(cfg)
    est = estimate_config(cfg, search=False)
    return (traced.peak.allocated, est.peak_allocated_bytes - est.components[Category.WORKSPACE],
            traced.peak.phase.value, est.peak_phase.value)


def main() -> None:
    from memplan.options import Config

    parser = argparse.ArgumentParser()
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--set", action="append", default=[], help="extra Config field, name=JSON value")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, help="append this run as a markdown section to the file")
    args = parser.parse_args()
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    errors, rows = [], []
    with tempfile.TemporaryDirectory() as d:
        llama = Path(d) / "config.json"
        llama.write_text(json.dumps(LLAMA_GQA))
        for method, model, scheme, dtype in itertools.product(args.methods, MODELS, SCHEMES, DTYPES):
            cfg = Config(model=str(llama) if model == "llama-gqa" else model, method=method, scheme=scheme,
                         dtype=dtype, attention="sdpa", batch=args.batch, seq=args.seq, **extra)
            trace, analytic, tphase, aphase = compare(cfg)
            err = (analytic - trace) / trace
            errors.append(abs(err))
            rows.append(f"| {method} | {model} | {scheme} | {dtype} | {trace / 2**20:.2f} | {analytic / 2**20:.2f} "
                        f"| {err:+.2%} | {tphase} | {aphase} |")
            print(f"{method} {model} {scheme} {dtype}: trace {trace:,} ({tphase}) analytic {analytic:,} ({aphase}) "
                  f"{err:+.2%}", flush=True)
    summary = f"{len(errors)} configs: median |error| {statistics.median(errors):.2%}, worst {max(errors):.2%}"
    print(summary)
    if args.out:
        settings = " ".join(f"--set {s}" for s in args.set)
        head = [f"## {' '.join(args.methods)} {settings}".rstrip(), "",
                f"`python calibration/methods_vs_trace.py {' '.join(sys.argv[1:])}`: batch {args.batch} x seq "
                f"{args.seq}, sdpa. **{summary}**", "",
                "| method | model | scheme | dtype | trace MiB | analytic MiB | error | trace phase | analytic phase |",
                "|---|---|---|---|---|---|---|---|---|"]
        with args.out.open("a") as f:
            f.write("\n".join(head + rows) + "\n\n")


if __name__ == "__main__":
    main()
