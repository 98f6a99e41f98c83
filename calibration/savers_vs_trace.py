"""The analytic tier against the trace tier for the memory savers of the optimizer and backward pass:
--optim loop|fused|8bit|paged-8bit|adafactor, --activation-offload, --optimizer-in-backward and
--grad-accum, each crossed with ft / lora, fp16 / bf16, eager / sdpa on two families (a Llama with
grouped-query attention, and OPT-125m). fo-adam throughout: it is the method every saver applies to.

As in analytic_vs_trace.py, both sides are the allocated view without the cuBLAS workspace; host
bytes (paged state, offloaded activations) are compared apart.

Run: python calibration/savers_vs_trace.py            (about 20 minutes on 2 cores)
     python calibration/savers_vs_trace.py --check    (re-estimate only, against the recorded traces)
Writes calibration/savers-vs-trace.jsonl and calibration/SAVERS-VS-TRACE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memplan.result import Category  # noqa: E402

RECORDS = ROOT / "calibration" / "savers-vs-trace.jsonl"
TABLE = ROOT / "calibration" / "SAVERS-VS-TRACE.md"
MEDIAN_TARGET, WORST_TARGET = 0.01, 0.03

# The Llama of analytic_vs_trace.py: GQA, gated MLP, RMSNorm, untied head.
LLAMA_GQA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1376,
             "max_position_embeddings": 2048, "tie_word_embeddings": False}

OPTIONS = (  # (label, Config fields)
    ("optim loop", {"optim": "loop"}),
    ("optim fused", {"optim": "fused"}),
    ("optim 8bit", {"optim": "8bit"}),
    ("optim paged-8bit", {"optim": "paged-8bit"}),
    ("optim adafactor", {"optim": "adafactor"}),
    ("activation offload", {"activation_offload": True}),
    ("optimizer in backward", {"optimizer_in_backward": True}),
    ("grad accum 4", {"grad_accum": 4}),
)
SHAPES = {"llama-gqa": (4, 256), "opt-125m": (4, 128)}  # (batch, seq)

GRID = [(model, label, scheme, dtype, attention)
        for model in SHAPES for label, _ in OPTIONS for scheme in ("ft", "lora") for dtype in ("fp16", "bf16")
        for attention in ("eager", "sdpa")]


def _config(row, llama_path: str):
    from memplan.options import Config

    model, label, scheme, dtype, attention = row
    batch, seq = SHAPES[model]
    return Config(model=llama_path if model == "llama-gqa" else model, method="fo-adam", scheme=scheme, dtype=dtype,
                  attention=attention, batch=batch, seq=seq, **dict(OPTIONS)[label])


def _analytic(cfg) -> tuple[int, str, int]:
    from memplan.api import estimate_config

    est = estimate_config(cfg, search=False)
    return est.peak_allocated_bytes - est.components[Category.WORKSPACE], est.peak_phase.value, est.host_bytes


def _key(row) -> str:
    return json.dumps(list(row))


def run(rows: list[tuple], out: Path, *, fresh: bool = False) -> list[dict]:
    """Trace every row not yet recorded (all with `fresh`), appending one JSON line per record."""
    from memplan.errors import MemplanError
    from memplan.tracing import trace_step

    done = {} if fresh or not out.is_file() else {
        _key(tuple(r["config"].values())): r for r in map(json.loads, out.read_text().splitlines()) if r}
    if fresh and out.is_file():
        out.unlink()
    with tempfile.TemporaryDirectory() as d:
        llama = Path(d) / "config.json"
        llama.write_text(json.dumps(LLAMA_GQA))
        for i, row in enumerate(rows, 1):
            if _key(row) in done:
                continue
            cfg = _config(row, str(llama))
            start = time.perf_counter()
            try:
                traced = trace_step(cfg)
            except MemplanError as e:
                print(f"[{i}/{len(rows)}] {row}: cannot trace: {e}", flush=True)
                continue
            analytic, phase, host = _analytic(cfg)
            rec = {"config": dict(zip(("model", "option", "scheme", "dtype", "attention"), row)),
                   "trace_bytes": traced.peak.allocated, "trace_phase": traced.peak.phase.value,
                   "trace_host_bytes": traced.peak.host_bytes,
                   "trace_components": {c.value: n for c, n in traced.peak.components.items()},
                   "analytic_bytes": analytic, "analytic_phase": phase, "analytic_host_bytes": host,
                   "trace_seconds": round(time.perf_counter() - start, 1)}
            with out.open("a") as f:  # one whole line per record: a killed run resumes where it stopped
                f.write(json.dumps(rec) + "\n")
            done[_key(row)] = rec
            print(f"[{i}/{len(rows)}] {row}: analytic {analytic:,} trace {traced.peak.allocated:,} "
                  f"({error(rec):+.2%}); host {host:,} / {traced.peak.host_bytes:,}", flush=True)
    return [done[_key(r)] for r in rows if _key(r) in done]


def error(rec: dict) -> float:
    return (rec["analytic_bytes"] - rec["trace_bytes"]) / rec["trace_bytes"]


def host_error(rec: dict) -> float | None:
    t = rec["trace_host_bytes"]
    return (rec["analytic_host_bytes"] - t) / t if t else (None if not rec["analytic_host_bytes"] else float("inf"))


def recheck(records: list[dict]) -> list[dict]:
    """Re-estimate every recorded configuration with the current analytic model."""
    with tempfile.TemporaryDirectory() as d:
        llama = Path(d) / "config.json"
        llama.write_text(json.dumps(LLAMA_GQA))
        for rec in records:
            cfg = _config(tuple(rec["config"].values()), str(llama))
            rec["analytic_bytes"], rec["analytic_phase"], rec["analytic_host_bytes"] = _analytic(cfg)
    return records


def summary(records: list[dict]) -> tuple[float, float]:
    errs = [abs(error(r)) for r in records]
    return statistics.median(errs), max(errs)


def by_option(records: list[dict]) -> list[str]:
    rows = []
    for label, _ in OPTIONS:
        errs = [abs(error(r)) for r in records if r["config"]["option"] == label]
        if errs:
            rows.append(f"| {label} | {len(errs)} | {statistics.median(errs):.2%} | {max(errs):.2%} |")
    return rows


def write_table(records: list[dict]) -> None:
    med, worst = summary(records)
    host = [(r, host_error(r)) for r in records if r["trace_host_bytes"] or r["analytic_host_bytes"]]
    lines = [
        "# Memory savers: analytic against trace",
        "",
        "Generated by `python calibration/savers_vs_trace.py`; do not edit by hand.",
        "",
        "fo-adam with one saver at a time, crossed with ft / lora, fp16 / bf16, eager / sdpa, on",
        "`llama-gqa` (4 layers, hidden 512, 8 heads, 2 key/value heads, gated MLP; batch 4 x seq 256) and",
        "`opt-125m` (batch 4 x seq 128). Peak allocated bytes without the cuBLAS workspace; error =",
        "(analytic - trace) / trace. The trace runs the real step (torch's optimizers, bitsandbytes' 8-bit",
        "Adam, transformers' Adafactor, the offloading saved-tensor hooks, the per-parameter optimizers) on",
        "fake tensors.",
        "",
        f"**{len(records)} configurations: median absolute error {med:.2%}, worst {worst:.2%}** "
        f"(targets: median <= {MEDIAN_TARGET:.0%}, worst <= {WORST_TARGET:.0%}).",
        "",
        "Where these rows do not reach: on both models fo-adam peaks at the loss or the optimizer step",
        "(32k and 50k vocabularies), so activation offloading's per-layer moments in backward decide no",
        "peak here. On a 2-layer Llama of hidden 128 and vocabulary 256 (tests/test_savers.py), where",
        "they do, the analytic peak is +3.1 % over the trace (it pairs every gradient with a whole layer's",
        "saved bytes, where the trace holds one node's) and host bytes -6 % (the final norm's and the",
        "embedding's saved tensors go to the host too; the formula counts the layers').",
        "Host bytes count tensor bytes in 512 B blocks; torch's pinned host allocator rounds each block up",
        "to a power of two, so a real run's pinned memory can be up to twice the offloaded bytes.",
        "",
        "| option | configurations | median abs error | worst abs error |",
        "|---|---|---|---|",
        *by_option(records),
        "",
        "Host bytes (paged 8-bit state, offloaded activations), analytic against trace:",
        "",
        "| model | option | scheme | dtype | attention | trace host MiB | analytic host MiB | error |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['config']['model']} | {r['config']['option']} | {r['config']['scheme']} | {r['config']['dtype']} | "
          f"{r['config']['attention']} | {r['trace_host_bytes'] / 2**20:.2f} | {r['analytic_host_bytes'] / 2**20:.2f} | "
          f"{'-' if e is None else f'{e:+.2%}'} |" for r, e in host],
        "",
        "Every configuration:",
        "",
        "| model | option | scheme | dtype | attention | trace MiB | analytic MiB | error | trace phase | analytic phase |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        c = r["config"]
        lines.append(f"| {c['model']} | {c['option']} | {c['scheme']} | {c['dtype']} | {c['attention']} | "
                     f"{r['trace_bytes'] / 2**20:.1f} | {r['analytic_bytes'] / 2**20:.1f} | {error(r):+.2%} | "
                     f"{r['trace_phase']} | {r['analytic_phase']} |")
    TABLE.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="re-estimate against the recorded traces only")
    parser.add_argument("--fresh", action="store_true", help="trace every configuration again")
    args = parser.parse_args()
    if args.check:
        records = recheck([json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()])
    else:
        records = recheck(run(GRID, RECORDS, fresh=args.fresh))
    write_table(records)
    med, worst = summary(records)
    print(f"{len(records)} configurations: median {med:.2%}, worst {worst:.2%}")


if __name__ == "__main__":
    main()
