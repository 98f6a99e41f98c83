"""The table-driven families' borrowed activation formulas against the trace, per family.

Each model_type without a hand-written family gets exact parameters from the tensor tables and the
per-layer activation formulas of the closest hand-written family (llama, gpt2 or roberta). This
script measures what that costs: a shrunk config of every such type (4 layers, hidden 256), traced
on fake tensors and estimated analytically, on a few cells. Both compare the allocated view without
the cuBLAS workspace, as calibration/analytic_vs_trace.py does.

Run: python calibration/generic_vs_trace.py          (a few minutes on 2 cores)
     python calibration/generic_vs_trace.py --check  (re-estimate only, against the recorded traces)
Writes calibration/generic-vs-trace.jsonl and calibration/GENERIC-VS-TRACE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The borrowed formulas are what this measures: no profile traced on first use, none read from a cache.
os.environ["MEMPLAN_TRACE"] = "never"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="memplan-generic-")

from memplan.result import Category  # noqa: E402

RECORDS = ROOT / "calibration" / "generic-vs-trace.jsonl"
TABLE = ROOT / "calibration" / "GENERIC-VS-TRACE.md"
# What the tests hold every recorded cell to (the borrowed formulas are approximate by design): 10 %, except
# where the trace keeps what the borrowed formulas do not model (measured, see GENERIC-VS-TRACE.md):
# - falcon, sdpa: Falcon always passes a causal mask (allow_is_causal_skip=False), and SDPA with a mask takes
#   the math path on the CPU, which materialises the scores; CUDA's memory-efficient kernel does not, so the
#   gap may be the trace's (unverified without a GPU);
# - gemma2, eager: about one more fp32 score-sized tensor per layer than the llama formulas plus soft-capping.
TOLERANCE = {"falcon": 0.35, "gemma2": 0.15}
DEFAULT_TOLERANCE = 0.10

BASE = {"hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 4, "vocab_size": 4096,
        "max_position_embeddings": 1024, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
EXTRA = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 512, "num_key_value_heads": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                  "shared_expert_intermediate_size": 512, "intermediate_size": 512, "num_key_value_heads": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "intermediate_size": 512,
                  "num_key_value_heads": 2, "head_dim": 32},
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                    "first_k_dense_replace": 1, "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16,
                    "qk_nope_head_dim": 32, "v_head_dim": 32, "intermediate_size": 512, "n_group": 1,
                    "topk_group": 1, "n_shared_experts": 1, "num_key_value_heads": 8},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                    "first_k_dense_replace": 1, "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 16,
                    "qk_nope_head_dim": 32, "v_head_dim": 32, "intermediate_size": 512, "n_group": 1,
                    "topk_group": 1, "n_shared_experts": 1, "num_key_value_heads": 8},
    "gptj": {"rotary_dim": 16}, "falcon": {"num_kv_heads": 8},
    "gemma3_text": {"num_hidden_layers": 6, "head_dim": 32, "num_key_value_heads": 2, "intermediate_size": 512,
                    "sliding_window": 128},
    "gemma2": {"head_dim": 32, "num_key_value_heads": 2, "intermediate_size": 512, "sliding_window": 128},
    "gemma": {"head_dim": 32, "num_key_value_heads": 2, "intermediate_size": 512},
    "bert": {"type_vocab_size": 2, "intermediate_size": 1024, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0},
}
EAGER_ONLY = {"gemma2", "bloom"}  # transformers 5.24 has no sdpa for them
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}  # grouped_mm fakes run in bf16 only


def shrunk(mt: str) -> dict:
    from memplan import tables

    d = tables.table(mt)["defaults"]
    cfg = {"model_type": mt, **BASE}
    for key in ("intermediate_size", "ffn_hidden_size", "n_inner"):
        if key in d:
            cfg[key] = 1024
    if "num_key_value_heads" in d:
        cfg["num_key_value_heads"] = 2
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout"):
        if key in d:
            cfg[key] = 0.0
    return {**cfg, **EXTRA.get(mt, {})}


def cells(mt: str) -> list[tuple]:
    """(method, scheme, dtype, attention, batch, seq) cells of one type."""
    attn = "eager" if mt in EAGER_ONLY else "sdpa"
    if mt in MOE:
        return [("fo-adam", "ft", "bf16", attn, 4, 256), ("zo-sgd", "ft", "bf16", attn, 4, 256),
                ("fo-adam", "lora", "bf16", attn, 4, 256)]
    return [("fo-adam", "ft", "fp32", "eager", 4, 256), ("zo-sgd", "ft", "bf16", attn, 4, 256),
            ("fo-adam", "lora", "bf16", attn, 4, 256)]


def types() -> list[str]:
    from memplan import arch, tables

    return [t for t in tables.model_types() if arch.get(t).activations_note]


def _config(path: str, cell: tuple):
    from memplan.options import Config

    method, scheme, dtype, attention, batch, seq = cell
    return Config(model=path, method=method, scheme=scheme, dtype=dtype, attention=attention, batch=batch, seq=seq)


def _analytic(cfg) -> int:
    from memplan.api import estimate_config

    est = estimate_config(cfg, search=False)
    return est.peak_allocated_bytes - est.components[Category.WORKSPACE]


def run(only: list[str]) -> list[dict]:
    """Trace every cell (of the `only` types, keeping the other records) and write the records."""
    from memplan.errors import MemplanError
    from memplan.tracing import trace_step

    kept = [json.loads(x) for x in RECORDS.read_text().splitlines()] if only and RECORDS.is_file() else []
    out = [r for r in kept if r["model_type"] not in only]
    with tempfile.TemporaryDirectory() as d:
        for mt in only or types():
            path = Path(d) / f"{mt}.json"
            path.write_text(json.dumps(shrunk(mt)))
            for cell in cells(mt):
                cfg = _config(str(path), cell)
                start = time.perf_counter()
                try:
                    traced = trace_step(cfg).peak.allocated
                except MemplanError as e:
                    print(f"{mt} {cell}: cannot trace: {e}", flush=True)
                    continue
                rec = {"model_type": mt, "cell": list(cell), "config": shrunk(mt), "trace_bytes": traced,
                       "analytic_bytes": _analytic(cfg), "trace_seconds": round(time.perf_counter() - start, 1)}
                out.append(rec)
                print(f"{mt} {cell}: analytic {rec['analytic_bytes']:,} trace {traced:,} ({error(rec):+.1%})",
                      flush=True)
    order = {t: i for i, t in enumerate(types())}
    out.sort(key=lambda r: order.get(r["model_type"], len(order)))
    RECORDS.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def recheck(records: list[dict]) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        for rec in records:
            path = Path(d) / f"{rec['model_type']}.json"
            path.write_text(json.dumps(rec["config"]))
            rec["analytic_bytes"] = _analytic(_config(str(path), tuple(rec["cell"])))
    return records


def error(rec: dict) -> float:
    return (rec["analytic_bytes"] - rec["trace_bytes"]) / rec["trace_bytes"]


def write_table(records: list[dict]) -> None:
    from memplan.arch._generic import template

    lines = ["# Table-driven families: borrowed activation formulas against the trace", "",
             "Written by `python calibration/generic_vs_trace.py`. Each type: a shrunk config (4 layers, hidden 256,",
             "vocab 4096; MoE types 4 experts, top-2), traced on fake tensors; analytic = the closest hand-written",
             "family's per-layer formulas over the exact tensor table. Allocated bytes without the cuBLAS workspace.",
             f"Tests hold every cell within {DEFAULT_TOLERANCE:.0%}, except "
             + ", ".join(f"{t} {v:.0%}" for t, v in TOLERANCE.items()) + "; `memplan trace` gives exact numbers.", "",
             "| model_type | template | method | scheme | dtype | attention | analytic MiB | trace MiB | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        m, s, dt, a, _, _ = r["cell"]
        lines.append(f"| {r['model_type']} | {template(r['model_type'])} | {m} | {s} | {dt} | {a} | "
                     f"{r['analytic_bytes'] / 2**20:.2f} | {r['trace_bytes'] / 2**20:.2f} | {error(r):+.1%} |")
    errs = [abs(error(r)) for r in records]
    lines += ["", f"{len(records)} cells: median |error| {statistics.median(errs):.1%}, worst {max(errs):.1%}.", ""]
    by_type: dict[str, list[float]] = {}
    for r in records:
        by_type.setdefault(r["model_type"], []).append(abs(error(r)))
    lines += ["| model_type | worst |error| |", "|---|---|"]
    lines += [f"| {t} | {max(v):.1%} |" for t, v in by_type.items()]
    lines += ["", "Known gaps: falcon with sdpa (Falcon always passes a causal mask, and SDPA with a mask takes the",
              "math path on the CPU, materialising the scores, which CUDA's memory-efficient kernel does not: the",
              "trace, not the formula, may be off there; unverified without a GPU); gemma2 eager (about one more",
              "fp32 score-sized tensor per layer than the llama formulas plus soft-capping keep)."]
    TABLE.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    p.add_argument("types", nargs="*", help="trace only these model types (the other records are kept)")
    args = p.parse_args()
    records = recheck([json.loads(x) for x in RECORDS.read_text().splitlines()]) if args.check else run(args.types)
    write_table(records)
    errs = [abs(error(r)) for r in records]
    print(f"median {statistics.median(errs):.1%} worst {max(errs):.1%}")


if __name__ == "__main__":
    main()
