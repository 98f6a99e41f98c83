"""Sampled rows of calibration/sharded_vs_trace.py: the analytic per-GPU estimate against the sharded
trace (rank 0 of FSDP2 / DDP on fake tensors), each within the grid's worst-case target (3 %).
The full grid and its table: calibration/SHARDED-VS-TRACE.md."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
import sharded_vs_trace as grid  # noqa: E402

from memplan.tracing import trace_step  # noqa: E402

FSDP_FT_GAP = ("the analytic FSDP backward adds the root's and a block's unsharded gradients and the "
               "reduce-scatter input to the moment backward starts, where the trace has only the logits' "
               "gradient: +11 % to +13 % on this grid, a known gap of the analytic model")
ROWS = [  # (model, method, scheme, sharding, num_gpus, dtype, batch, seq)
    ("llama-gqa", "fo-adam", "lora", "fsdp", 4, "bf16", 4, 256),
    ("llama-gqa", "zo-sgd", "ft", "fsdp", 8, "bf16", 4, 256),
    ("llama-gqa", "fo-adam", "ft", "ddp", 2, "bf16", 4, 256),
    ("llama-gqa", "zo-sgd", "ft", "ddp", 4, "bf16", 4, 256),
    pytest.param(("llama-gqa", "fo-adam", "ft", "fsdp", 2, "bf16", 4, 256),
                 marks=pytest.mark.xfail(strict=True, reason=FSDP_FT_GAP)),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(map(str, r[1:5])))
def test_analytic_per_gpu_is_within_3_percent_of_the_sharded_trace(row, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(grid.LLAMA_GQA))
    cfg = grid._config(row, str(path))
    traced = trace_step(cfg).peak.allocated
    analytic, phase = grid._analytic(cfg)
    assert analytic is not None, phase
    assert abs(analytic - traced) / traced <= grid.WORST_TARGET, (analytic, traced, phase)
