"""Depth extrapolation (memplan.depth): a deep model's profile from three shallow copies of it.

The plans of real configs (which layers repeat, and with what period), the copies' configs, the
affine check, and byte-for-byte agreement of extrapolated profiles with concrete traces of the whole
model at points the copies never ran at.
"""

from __future__ import annotations

import pytest

from memplan import depth
from memplan.options import Config
from memplan.spec import catalog_entries
from tiny import write

pytest.importorskip("transformers")


def _catalog(model_id: str) -> dict:
    return next(e["config"] for e in catalog_entries() if e["id"] == model_id)


def test_plans_of_catalog_models():
    # Qwen3-235B-A22B: 94 alike layers; copies of 4, 5 and 6 layers, two labelled at each end
    assert depth.plan(_catalog("Qwen/Qwen3-235B-A22B")) == depth.Plan(94, 2, 2, 1, (4, 5, 6))
    # 36 layers: three copies (15 layers) plus their fixed cost are still cheaper than the model
    assert depth.plan(_catalog("Qwen/Qwen3-8B")).depths == (4, 5, 6)
    # Gemma-2-27B alternates sliding and global layers (period 2): copies of 8, 10 and 12 layers
    assert depth.plan(_catalog("google/gemma-2-27b")) == depth.Plan(46, 4, 4, 2, (8, 10, 12))
    assert depth.plan(_catalog("google/gemma-2-2b")) is None  # 26 layers: copies would cost as much
    assert depth.plan(_catalog("meta-llama/Llama-3.2-1B")) is None  # 16 layers: traced whole


def test_a_dense_head_before_moe_layers_is_labelled_from_the_start():
    # DeepSeek-V3 keeps its first 3 layers dense: the repeating part starts at layer 3
    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 3, "n_routed_experts": 8,
           "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 256, "q_lora_rank": 16, "kv_lora_rank": 16,
           "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}
    assert depth.plan(cfg) == depth.Plan(61, 5, 2, 1, (7, 8, 9))


def test_copies_keep_the_layer_kinds_of_both_ends(monkeypatch):
    monkeypatch.setattr(depth, "TRACE_BASE_LAYERS", 0)
    cfg = {**_catalog("google/gemma-2-9b"), "num_hidden_layers": 43}  # odd: the last layer is a sliding one
    pl = depth.plan(cfg)
    assert (pl.period, pl.head, pl.tail, pl.depths) == (2, 4, 5, (9, 11, 13))
    from transformers import AutoConfig

    full = AutoConfig.for_model(**cfg).layer_types
    copy = depth.shallow_config(cfg, pl, 11)
    assert copy["num_hidden_layers"] == 11
    assert copy["layer_types"] == full[:6] + full[-5:]
    assert copy["layer_types"][-1] == full[-1] == "sliding_attention"


def test_extrapolate_refuses_what_is_not_affine():
    pl = depth.Plan(10, 1, 1, 1, (2, 3, 4))
    add = lambda a, b: (a or 0) + (b or 0)  # noqa: E731
    scale = lambda v, k: (v or 0) * k  # noqa: E731
    equal = lambda a, b: (a or 0) == (b or 0)  # noqa: E731
    one, two = {"k": ("fwd", {"w": 10})}, {"k": ("fwd", {"w": 13})}
    assert depth.extrapolate([one, two, {"k": ("fwd", {"w": 16})}], pl, scale, add, equal) == \
        {"k": ("fwd", {"w": 10 + 8 * 3})}
    assert depth.extrapolate([one, two, {"k": ("fwd", {"w": 17})}], pl, scale, add, equal) is None
    assert depth.extrapolate([one, two, {"j": ("fwd", {"w": 16})}], pl, scale, add, equal) is None


TINY_QWEN3 = {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 64}
TINY_MOE = {"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 16,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "intermediate_size": 128, "max_position_embeddings": 64}


@pytest.mark.parametrize("config, options, points", [
    (TINY_QWEN3, {"method": "fo-adam", "dtype": "bf16"}, [(1, 37), (5, 23)]),
    (TINY_QWEN3, {"method": "zo-sgd", "dtype": "fp16", "attention": "eager"}, [(3, 50)]),
    (TINY_MOE, {"method": "fo-sgd", "scheme": "lora", "dtype": "fp32"}, [(2, 31)]),
])
def test_extrapolated_profiles_give_the_full_depth_trace(tmp_path, monkeypatch, config, options, points):
    from memplan.symbolic import trace_profile
    from memplan.tracing import trace_step

    monkeypatch.setattr(depth, "TRACE_BASE_LAYERS", 0)  # 16 layers: cheap enough to trace whole and compare
    cfg = Config(model=write(tmp_path, config), **options)
    logs: list[str] = []
    prof = trace_profile(cfg, log=logs.append)
    assert all("from 4/5/6-layer copies" in line for line in logs), logs
    for b, s in points:
        traced = trace_step(cfg.model_copy(update={"batch": b, "seq": s}))
        assert prof.peak(b, s).allocated == traced.peak.allocated, (b, s)
        assert (prof.trainable_params, prof.total_params) == (traced.trainable_params, traced.total_params)


def test_forward_grad_probe_from_copies_and_one_regime_at_a_time(tmp_path, monkeypatch):
    """forward-grad does not trace symbolically: its probe fits concrete traces, here of two copies (a
    third checks them at one point), one regime at a time; within the probe's bound of the whole model."""
    from memplan.probe import probe_profile
    from memplan.tracing import trace_step

    monkeypatch.setattr(depth, "TRACE_BASE_LAYERS", 0)
    cfg = Config(model=write(tmp_path, TINY_QWEN3), method="forward-grad", dtype="bf16")
    logs: list[str] = []
    prof = probe_profile(cfg, at=(1, 40), log=logs.append)
    assert len(prof.regimes) == 1 and "from 4/5/6-layer copies" in logs[0]
    assert prof.peak(3, 40) is None  # b >= 2 is the other regime: fitted when first asked for (`into`)
    for b, s in [(1, 40), (1, 61)]:
        want = trace_step(cfg.model_copy(update={"batch": b, "seq": s}))
        got = prof.peak(b, s)
        assert abs(got.allocated - want.peak.allocated) <= 0.01 * want.peak.allocated, (b, s)
        assert (prof.trainable_params, prof.total_params) == (want.trainable_params, want.total_params)
