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

ROWS = [  # (model, method, scheme, sharding, num_gpus, dtype, batch, seq)
    ("llama-gqa", "fo-adam", "lora", "fsdp", 4, "bf16", 4, 256),
    ("llama-gqa", "zo-sgd", "ft", "fsdp", 8, "bf16", 4, 256),
    ("llama-gqa", "fo-adam", "ft", "ddp", 2, "bf16", 4, 256),
    ("llama-gqa", "zo-sgd", "ft", "ddp", 4, "bf16", 4, 256),
    ("llama-gqa", "fo-adam", "ft", "fsdp", 2, "bf16", 4, 256),
    ("opt-125m", "fo-adam", "lora", "fsdp", 2, "amp-bf16", 4, 256),  # LoRA in FSDP2's param_dtype
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "-".join(map(str, r[:6])))
def test_analytic_per_gpu_is_within_3_percent_of_the_sharded_trace(row, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(grid.LLAMA_GQA))
    cfg = grid._config(row, str(path))
    traced = trace_step(cfg).peak.allocated
    analytic, phase = grid._analytic(cfg)
    assert analytic is not None, phase
    assert abs(analytic - traced) / traced <= grid.WORST_TARGET, (analytic, traced, phase)


# One sequence of 8 tokens: FSDP2's buffers outweigh the activations, so every phase's peak is a moment
# of its collectives (a forward copy-out, a block's backward, the last gradients, the root kept gathered).
BUFFER_ROWS = [
    ("llama-gqa", "fo-adam", "ft", "fsdp", 4, "bf16", 1, 8),
    ("llama-gqa", "fo-adam", "lora", "fsdp", 2, "bf16", 1, 8),
    ("llama-gqa", "zo-sgd", "ft", "fsdp", 2, "bf16", 1, 8),
    # amp-*: FSDP2's MixedPrecisionPolicy, 16-bit gathers and compute over fp32 shards (no autocast)
    ("opt-125m", "fo-adam", "ft", "fsdp", 2, "amp-bf16", 1, 8),
    ("llama-gqa", "fo-adam", "lora", "fsdp", 2, "amp-bf16", 1, 8),
]


@pytest.mark.parametrize("row", BUFFER_ROWS, ids=lambda r: "-".join(map(str, r[:6])))
def test_every_fsdp_phase_is_within_1_percent_of_the_sharded_trace(row, tmp_path):
    from memplan import analytic, hardware
    from memplan.result import Category
    from memplan.spec import resolve

    path = tmp_path / "config.json"
    path.write_text(json.dumps(grid.LLAMA_GQA))
    cfg = grid._config(row, str(path))
    traced = trace_step(cfg).peak.phases
    est = analytic.phases(cfg, resolve(cfg.model), hardware.family("hopper"))
    assert set(traced) == set(est)
    for phase, n in traced.items():
        got = sum(v for c, v in est[phase].items() if c is not Category.WORKSPACE)
        assert abs(got - n) <= 0.01 * n, (phase, got, n)
