"""First use of a configuration memplan has no exact formulas for: `memplan fit` traces its profile
(the regime of the asked batch and seq), caches it, and answers; the second call reads the cache.

Target (issue: every model people fine-tune): at most 30 s for the first use, on this machine's CPU.
Each row runs `memplan fit MODEL -m METHOD --batch 4 --seq 2048` twice in a fresh process with an empty
cache folder (XDG_CACHE_HOME) and MEMPLAN_TRACE=auto; wall times, one run each.

    python benchmarks/first_use.py            # the table below, printed as markdown
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CASES = [
    ("Qwen/Qwen3-8B", "zo-sgd"),
    ("Qwen/Qwen3-8B", "fo-adam"),
    ("Qwen/Qwen3-8B", "forward-grad"),
    ("Qwen/Qwen3-32B", "fo-adam"),
    ("Qwen/Qwen3-235B-A22B", "fo-adam"),
    ("mistralai/Mixtral-8x22B-v0.1", "zo-sgd"),
    ("google/gemma-2-27b", "fo-adam"),
    ("microsoft/phi-4", "fo-adam"),
    ("tiiuae/falcon-40b", "zo-sgd"),
]


def fit(model: str, method: str, cache: str) -> tuple[float, str]:
    env = {**os.environ, "XDG_CACHE_HOME": cache, "MEMPLAN_TRACE": "auto", "COLUMNS": "200"}
    args = [sys.executable, "-m", "memplan", "fit", model, "-m", method, "--batch", "4", "--seq", "2048",
            "--dtype", "bf16"]
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[2:])}: exit {done.returncode}: {done.stderr.strip()}")
    return wall, done.stderr


def main() -> None:
    print("| model | layers | method | how | first use, s | cached, s |")
    print("|---|---|---|---|---|---|")
    from memplan import depth
    from memplan.spec import catalog_entries

    layers = {e["id"]: depth.layer_count(e["config"])[1] for e in catalog_entries()}
    for model, method in CASES:
        with tempfile.TemporaryDirectory() as cache:
            first, err = fit(model, method, cache)
            second, _ = fit(model, method, cache)
        how = "copies" if depth.plan(next(e["config"] for e in catalog_entries() if e["id"] == model)) else "whole"
        assert "memplan: tracing" in err, err
        print(f"| {model} | {layers[model]} | {method} | {how} | {first:.1f} | {second:.1f} |", flush=True)


if __name__ == "__main__":
    main()
