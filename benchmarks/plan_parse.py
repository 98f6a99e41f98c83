"""Time to read and validate a large plan file: 5,000 runs, the YAML read, line numbers, pydantic.

Run: python benchmarks/plan_parse.py [N_RUNS]   (results are recorded in benchmarks/RESULTS.md by hand)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ["opt-125m", "opt-1.3b", "opt-13b", "llama-2-7b"]
METHODS = ["zo-sgd", "[zo-sgd, fo-adam]", "fo-sgd", "all"]


def plan_text(n_runs: int) -> str:
    lines = ["gpus: [h100, a100-40gb]", "margin: 5%", "runs:"]
    for i in range(n_runs):
        lines += [f"  - name: run-{i}", f"    model: {MODELS[i % len(MODELS)]}",
                  f"    method: {METHODS[i % len(METHODS)]}", f"    batch: {1 + i % 32}", f"    seq: {128 << (i % 4)}"]
    return "\n".join(lines) + "\n"


def main(n_runs: int = 5_000, repeat: int = 5) -> None:
    from memplan import plan

    text = plan_text(n_runs)
    plan.parse(text)  # warm the catalogs
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        pf = plan.parse(text)
        times.append(time.perf_counter() - start)
    assert len(pf.plan.runs) == n_runs and pf.run_lines[-1] is not None
    print(f"plan.parse, {n_runs} runs ({len(text) / 1e3:.0f} kB): median {statistics.median(times):.3f} s "
          f"over {repeat} (min {min(times):.3f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5_000)
