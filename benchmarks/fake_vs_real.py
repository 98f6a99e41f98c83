"""Fake against real: the same step traced on fake tensors and run on real CPU tensors.

Prints the peak bytes of both, their difference, and the growth of this process's resident memory
(RSS) while the real step runs, beside the tracker's count (RSS also holds the allocator's caches,
Python objects and the model build, so it is context, not a check).
Run: python benchmarks/fake_vs_real.py [model ...]   (default: opt-125m and a tiny GQA Llama)
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memplan.result import MIB  # noqa: E402
from memplan.options import Config, Method  # noqa: E402
from memplan.tracing import trace_step  # noqa: E402

LLAMA_GQA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 688,
             "max_position_embeddings": 512}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(models: list[str]) -> None:
    for model in models:
        for method in Method:
            c = Config(model=model, method=method, dtype="fp32", attention="eager", batch=2, seq=64)
            fake = trace_step(c)
            before = rss()
            real = trace_step(c, real=True)
            grown = rss() - before
            diff = fake.peak.allocated - real.peak.allocated
            print(f"{Path(model).stem:10s} {method.value:13s} fake {fake.peak.allocated / MIB:9.2f} MiB  "
                  f"real {real.peak.allocated / MIB:9.2f} MiB  diff {diff:+d} B  RSS growth {grown / MIB:8.1f} MiB",
                  flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1:])
    else:
        tmp = Path(tempfile.mkdtemp()) / "llama-gqa.json"
        tmp.write_text(json.dumps(LLAMA_GQA))
        main(["opt-125m", str(tmp)])
