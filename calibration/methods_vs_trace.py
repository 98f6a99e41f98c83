"""The analytic tier against the trace tier for chosen methods, over the issue's grid.

Grid: ft / lora / prefix / prompt x fp32 / fp16 / bf16 x two families (OPT-125m from the catalog and
the 4-layer GQA Llama of `analytic_vs_trace.py`), batch 4 x 128 tokens, sdpa. Prints one line per
configuration and the median and worst absolute error; records nothing (the recorded grid of the
first eight methods lives in `analytic_vs_trace.py`).

Run: python calibration/methods_vs_trace.py hizoo mezo-svrg [--set svrg_interval=1] [--batch 4 --seq 128]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
    args = parser.parse_args()
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    errors = []
    with tempfile.TemporaryDirectory() as d:
        llama = Path(d) / "config.json"
        llama.write_text(json.dumps(LLAMA_GQA))
        for method, model, scheme, dtype in itertools.product(args.methods, MODELS, SCHEMES, DTYPES):
            cfg = Config(model=str(llama) if model == "llama-gqa" else model, method=method, scheme=scheme,
                         dtype=dtype, attention="sdpa", batch=args.batch, seq=args.seq, **extra)
            trace, analytic, tphase, aphase = compare(cfg)
            err = (analytic - trace) / trace
            errors.append(abs(err))
            print(f"{method} {model} {scheme} {dtype}: trace {trace:,} ({tphase}) analytic {analytic:,} ({aphase}) "
                  f"{err:+.2%}", flush=True)
    print(f"{len(errors)} configs: median |error| {statistics.median(errors):.2%}, worst {max(errors):.2%}")


if __name__ == "__main__":
    main()
