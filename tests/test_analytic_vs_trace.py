"""The analytic tier against the trace tier: the recorded grid, and a live re-trace of some of it.

`calibration/analytic_vs_trace.py` traces 88 configurations (OPT, a GQA Llama, GPT-2, RoBERTa; all
eight methods; ft / lora / prefix / prompt; fp32 / fp16 / bf16 / amp; eager and sdpa) and records
the traced peaks. The issue's targets: median error at most 2 %, worst at most 5 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "calibration"))
import analytic_vs_trace as grid  # noqa: E402

RECORDS = [json.loads(line) for line in grid.RECORDS.read_text().splitlines() if line.strip()]


def test_grid_covers_what_the_issue_asks():
    configs = [r["config"] for r in RECORDS]
    assert len(configs) >= 60
    assert {c["model"] for c in configs} >= {"opt-125m", "llama-gqa", "gpt2", "roberta-base"}
    assert {c["method"] for c in configs} == {"fo-sgd", "fo-adam", "forward-grad", "zo-sgd", "zo-sgd-mmt",
                                              "zo-sgd-cons", "zo-sgd-sign", "zo-adam"}
    assert {c["scheme"] for c in configs} == {"ft", "lora", "prefix", "prompt"}
    assert {"fp32", "fp16", "amp-fp16"} <= {c["dtype"] for c in configs}
    assert {c["attention"] for c in configs} == {"eager", "sdpa"}


def test_current_analytic_model_meets_the_targets_on_the_recorded_traces():
    records = grid.recheck([dict(r) for r in RECORDS])
    median, worst = grid.summary(records)
    assert median <= grid.MEDIAN_TARGET, f"median {median:.2%}"
    assert worst <= grid.WORST_TARGET, f"worst {worst:.2%}"


@pytest.mark.parametrize("index", [0, 13, 29, 37, 44, 70])
def test_recorded_traces_are_current(index):
    # Tracing again gives the recorded bytes exactly: the records match today's step and tracer code.
    rec = RECORDS[index]
    fresh = grid.run([tuple(rec["config"].values())], Path(pytest.importorskip("tempfile").mkdtemp()) / "r.jsonl")
    assert fresh[0]["trace_bytes"] == rec["trace_bytes"]


def test_profile_backed_grid_meets_the_targets():
    """calibration/profiles_vs_trace.py: every family's profile-backed analytic tier against concrete
    traces (symbolic: median <= 0.5 %, worst <= 2 %; probe: median <= 2 %, worst <= 5 %)."""
    import statistics

    import profiles_vs_trace as fam

    recs = [r for r in fam.records() if "source" in r]
    assert {r["cell"][0] for r in recs} >= {"llama", "qwen2", "qwen3"}
    for source, (median_target, worst_target) in fam.TARGETS.items():
        errs = [abs(fam.error(p)) for r in recs if r["source"] == source for p in r["points"] if "trace_bytes" in p]
        assert errs, source
        assert statistics.median(errs) <= median_target and max(errs) <= worst_target, source
