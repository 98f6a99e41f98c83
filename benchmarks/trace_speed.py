"""How long `memplan trace` takes on OPT-13B fo-adam, batch 16 x seq 400 (target: 30 s on 2 cores).

Run: python benchmarks/trace_speed.py   (prints wall seconds: imports, trace, total; and the peak)
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

t0 = time.perf_counter()
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

from memplan.result import gib  # noqa: E402
from memplan.options import Config  # noqa: E402
from memplan.tracing import trace  # noqa: E402

t1 = time.perf_counter()
est = trace(Config(model="opt-13b", method="fo-adam", dtype="fp16", batch=16, seq=400))
t2 = time.perf_counter()
print(f"imports {t1 - t0:.1f} s, trace {t2 - t1:.1f} s, total {t2 - t0:.1f} s")
print(f"peak allocated {gib(est.peak_allocated_bytes):.2f} GiB in {est.peak_phase.value}: "
      + ", ".join(f"{k.value} {gib(v):.2f}" for k, v in est.components.items()))
