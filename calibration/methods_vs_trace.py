"""The analytic model of the low-rank ZO methods (lozo, lozo-m, subzero) against the trace.

Grid: opt-125m (eager) and calibration/analytic_vs_trace.py's 4-layer GQA Llama (sdpa), batch 4 x 128,
ft / lora / prefix / prompt x fp32 / fp16 / bf16, for each method and perturbation mode given.
Prints one line per configuration and the median and worst relative error; writes nothing.

    python calibration/methods_vs_trace.py lozo,lozo-m,subzero mezo
"""

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

from memplan.api import estimate_config  # noqa: E402
from memplan.options import Config  # noqa: E402
from memplan.result import Category  # noqa: E402
from memplan.tracing import trace_step  # noqa: E402


def main(methods: list[str], perturbation: str) -> None:
    llama = Path(tempfile.mkdtemp()) / "llama.json"
    llama.write_text(json.dumps(LLAMA_GQA))
    models = {"opt": "opt-125m", "llama": str(llama)}
    errors = []
    for method, fam, scheme, dtype in itertools.product(methods, models, ("ft", "lora", "prefix", "prompt"),
                                                        ("fp32", "fp16", "bf16")):
        c = Config(model=models[fam], method=method, scheme=scheme, dtype=dtype, batch=4, seq=128,
                   attention="eager" if fam == "opt" else "sdpa", perturbation=perturbation)
        traced = trace_step(c).peak.allocated
        e = estimate_config(c, search=False)
        analytic = e.peak_allocated_bytes - e.components.get(Category.WORKSPACE, 0)
        err = (analytic - traced) / traced
        errors.append(abs(err))
        print(f"{method:8s} {fam:6s} {scheme:7s} {dtype:5s} trace {traced:11d} analytic {analytic:11d} "
              f"{err:+.3%} ({e.peak_phase})", flush=True)
    print(f"median {statistics.median(errors):.3%}, worst {max(errors):.3%} over {len(errors)}")


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["lozo", "lozo-m", "subzero"],
         sys.argv[2] if len(sys.argv) > 2 else "mezo")
