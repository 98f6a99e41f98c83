"""Borrowed activation formulas of the table-driven families against recorded traces, per family.

`calibration/generic_vs_trace.py` traces a shrunk config of every table-driven type on three cells;
here the current analytic model is re-estimated on every recorded cell (no trace) and held to the
stated per-family tolerance, and one cell is traced live to show the records still describe the trace.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "calibration"))
import generic_vs_trace as grid  # noqa: E402

RECORDS = [json.loads(line) for line in grid.RECORDS.read_text().splitlines() if line.strip()]


def test_every_table_family_is_recorded():
    assert {r["model_type"] for r in RECORDS} == set(grid.types())
    assert {"qwen3", "olmo2", "granite", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe", "deepseek_v3",
            "falcon", "bloom", "gpt_neox", "gptj", "bert"} <= {r["model_type"] for r in RECORDS}


@pytest.mark.parametrize("rec", grid.recheck([dict(r) for r in RECORDS]),
                         ids=[f"{r['model_type']}-{'-'.join(map(str, r['cell'][:4]))}" for r in RECORDS])
def test_within_the_stated_tolerance(rec):
    bound = grid.TOLERANCE.get(rec["model_type"], grid.DEFAULT_TOLERANCE)
    assert abs(grid.error(rec)) <= bound, f"{grid.error(rec):+.1%}"


def test_a_recorded_cell_still_matches_its_trace(tmp_path):
    pytest.importorskip("torch")
    from memplan.tracing import trace_step

    rec = next(r for r in RECORDS if r["model_type"] == "qwen3" and r["cell"][0] == "zo-sgd")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(rec["config"]))
    assert trace_step(grid._config(str(path), tuple(rec["cell"]))).peak.allocated == rec["trace_bytes"]
