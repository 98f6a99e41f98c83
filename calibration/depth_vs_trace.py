"""Depth extrapolation against whole-model traces: writes calibration/DEPTH-VS-TRACE.md.

Each case is a catalog model's config cut to a depth the whole model can still be traced at (16
layers; 32 for Gemma-2, whose period is 2), at the catalog's real widths. Its profile is built twice:
from shallow copies (`memplan.depth`; the fixed-cost allowance set to 0 so the copies are used at
this depth) and from the whole model. Both are evaluated at 25 (batch, seq) points; the error is
(copies - whole) / whole on peak allocated bytes. A case whose copies do not extrapolate (the third
copy disagrees) falls back to the whole model, and the table says so.

    python calibration/depth_vs_trace.py           # run missing cases, then write the table
    python calibration/depth_vs_trace.py --check   # rewrite the table from the records only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECORDS = ROOT / "calibration" / "depth-vs-trace.jsonl"
OUT = ROOT / "calibration" / "DEPTH-VS-TRACE.md"
POINTS = [(b, s) for b in (1, 2, 3, 8, 64) for s in (64, 333, 1000, 2048, 4096)]
CASES = [
    ("Qwen/Qwen3-8B", 16, "zo-sgd", {}),
    ("Qwen/Qwen3-8B", 16, "fo-sgd", {"scheme": "lora"}),
    ("Qwen/Qwen3-8B", 16, "zo-adam", {}),
    ("Qwen/Qwen3-8B", 16, "fo-adam", {"grad_checkpointing": True}),
    ("Qwen/Qwen3-8B", 16, "fo-adam", {"scheme": "lora", "dtype": "amp-bf16", "attention": "eager"}),
    ("Qwen/Qwen3-8B", 16, "fo-adam", {"optim": "loop", "dtype": "fp32"}),
    ("mistralai/Mixtral-8x7B-v0.1", 16, "zo-sgd", {}),
    ("mistralai/Mixtral-8x7B-v0.1", 16, "fo-adam", {"scheme": "lora"}),
    ("Qwen/Qwen3-30B-A3B", 16, "fo-adam", {}),
    ("google/gemma-2-9b", 32, "fo-adam", {"attention": "eager"}),
    ("microsoft/phi-2", 16, "fo-adam", {}),
    ("EleutherAI/gpt-j-6b", 16, "fo-adam", {}),
    ("tiiuae/falcon-7b", 16, "zo-sgd", {}),
    ("gpt2-xl", 16, "fo-adam", {"scheme": "prefix"}),
    ("allenai/OLMo-2-1124-7B", 16, "fo-adam", {}),
    ("ibm-granite/granite-3.1-8b-base", 16, "zo-sgd", {"dtype": "fp16"}),
    ("microsoft/Phi-3-mini-4k-instruct", 16, "fo-adam", {"scheme": "lora"}),
    ("meta-llama/Llama-3.1-8B", 16, "fo-adam", {"dtype": "fp32", "attention": "eager"}),
    ("EleutherAI/pythia-6.9b", 16, "zo-sgd", {"scheme": "lora"}),
    ("Qwen/Qwen3-8B", 16, "forward-grad", {}),
]


def _key(case) -> str:
    model, layers, method, extra = case
    return json.dumps([model, layers, method, extra], sort_keys=True)


def run() -> None:
    from memplan import depth
    from memplan.options import Config
    from memplan.spec import catalog_entries
    from memplan.symbolic import build_profile

    depth.TRACE_BASE_LAYERS = 0
    done = {json.loads(line)["key"] for line in RECORDS.read_text().splitlines()} if RECORDS.is_file() else set()
    root = Path(tempfile.mkdtemp())
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    for case in CASES:
        if _key(case) in done:
            continue
        model, layers, method, extra = case
        config = dict(next(e["config"] for e in catalog_entries() if e["id"] == model or model in e["aliases"]))
        key, _ = depth.layer_count(config)
        config[key] = layers
        folder = root / f"{model.replace('/', '_')}-{layers}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        cfg = Config(model=str(folder), method=method, **{"dtype": "bf16", "attention": "sdpa", **extra})
        logs: list[str] = []
        start = time.perf_counter()
        copies = build_profile(cfg, log=logs.append)
        t_copies = time.perf_counter() - start
        plan, depth.plan = depth.plan, (lambda _: None)  # the whole model: no copies
        try:
            start = time.perf_counter()
            full = build_profile(cfg)
            t_full = time.perf_counter() - start
        finally:
            depth.plan = plan
        errors, unknown = [], 0
        for b, s in POINTS:
            a, w = copies.peak(b, s), full.peak(b, s)
            if a is None or w is None:
                unknown += 1
                continue
            errors.append(a.allocated / w.allocated - 1)
        fell_back = any("do not extrapolate" in line or "does not trace" in line for line in logs)
        how = "whole (copies disagreed)" if fell_back else "copies"
        rec = {"key": _key(case), "model": model, "layers": layers, "method": method, "options": extra,
               "source": copies.source, "how": how, "points": len(errors), "unknown": unknown,
               "worst": max(map(abs, errors), default=0.0),
               "params_equal": (copies.trainable_params, copies.total_params) == (full.trainable_params,
                                                                                  full.total_params),
               "seconds_copies": round(t_copies, 1), "seconds_whole": round(t_full, 1)}
        with RECORDS.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{model} {method} {extra}: {how}, worst {rec['worst']:.2e}", flush=True)


def table() -> str:
    recs = [json.loads(line) for line in RECORDS.read_text().splitlines()]
    lines = [
        "# Depth extrapolation against whole-model traces",
        "",
        "Generated by `python calibration/depth_vs_trace.py`; do not edit by hand.",
        "",
        "Catalog configs at their real widths, cut to the depth in the table. Each profile is built from",
        "three shallow copies (`memplan/depth.py`) and from the whole model, and both are evaluated at 25",
        "points (batch 1, 2, 3, 8, 64 x seq 64, 333, 1000, 2048, 4096); error = (copies - whole) / whole.",
        "`how` says whether the copies agreed (the third copy is exactly the extrapolation of the first",
        "two) or the profile fell back to the whole model. dtype bf16 and sdpa unless the options say",
        "otherwise. Seconds: 2 cores, shared with other jobs.",
        "",
        "| model | layers | method | options | source | how | points | worst abs error | params equal | s copies / whole |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        lines.append(f"| {r['model']} | {r['layers']} | {r['method']} | {opts} | {r['source']} | {r['how']} | "
                     f"{r['points']} | {r['worst']:.5%} | {'yes' if r['params_equal'] else 'NO'} | "
                     f"{r['seconds_copies']:.0f} / {r['seconds_whole']:.0f} |")
    copies = [r for r in recs if r["how"] == "copies"]
    symbolic = [r for r in copies if r["source"] == "symbolic"]
    lines += ["", f"{len(recs)} cases: {len(copies)} extrapolated from copies, {len(recs) - len(copies)} traced whole. "
              f"Symbolic cases from copies: worst {max((r['worst'] for r in symbolic), default=0):.5%} over "
              f"{sum(r['points'] for r in symbolic)} points.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only rewrite the table from the records")
    if not parser.parse_args().check:
        run()
    from memplan.files import write_atomic

    write_atomic(OUT, table())
    print(table())


if __name__ == "__main__":
    main()
