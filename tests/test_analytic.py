"""Analytic formulas on tiny shapes (exact bytes, arithmetic in comments) and properties over configs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan import analytic
from memplan.api import device_bytes, estimate, estimate_config
from memplan.result import Category, Phase
from memplan.hardware import family, get_gpu
from memplan.options import Config, Method
from memplan.spec import spec_from_config

# A 2-layer OPT: h=64, f=256, V=1000, 32 positions (+2 offset), tied lm_head.
TINY = spec_from_config({
    "model_type": "opt", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 32,
}, "tiny-opt")
FAM = family("default")


def test_tiny_weight_bytes_exact():
    # embed 1000x64 = 64,000 elements; positions 34x64 = 2,176; final LN 2x64.
    # per layer: 4 x (64x64 + 64) attention + 2 LNs x 128 + fc1 256x64+256 + fc2 64x256+64 = 49,984.
    assert TINY.param_count == 64_000 + 2_176 + 128 + 2 * 49_984
    # fp16, each tensor rounded up to 512 B: embed 128,000 B (exact); positions 4,352 -> 4,608;
    # each 64-vector 128 -> 512 B.
    per_layer = 4 * (8_192 + 512) + 2 * 2 * 512 + (32_768 + 512) + (32_768 + 512)
    assert analytic.weight_bytes(TINY, 2) == 128_000 + 4_608 + 2 * 512 + 2 * per_layer


def test_zo_perturb_phase_is_three_copies_of_largest_tensor():
    cfg = Config(model="tiny", method="zo-sgd", dtype="fp16", batch=1, seq=8)
    per_phase = analytic.phases(cfg, TINY, FAM)
    # MeZO out of place: z, scale*z, scale*z*eps alive at once -> 3 x embed (128,000 B).
    assert per_phase[Phase.PERTURB][Category.PERTURBATION] == 3 * 128_000
    inplace = analytic.phases(cfg.replace(perturbation="inplace"), TINY, FAM)
    # In place: z of the embedding and, while the next z is drawn, the positions' z (4,608 B).
    assert inplace[Phase.PERTURB][Category.PERTURBATION] == 128_000 + 4_608


def test_fo_adam_step_phase_exact():
    cfg = Config(model="tiny", method="fo-adam", dtype="fp32", batch=1, seq=8)
    step = analytic.phases(cfg, TINY, FAM)[Phase.OPTIMIZER_STEP]
    w = analytic.weight_bytes(TINY, 4)
    # weights + grads (1x) + exp_avg, exp_avg_sq (2x) + foreach sqrt temporary (1x).
    assert step[Category.WEIGHTS] == w
    assert step[Category.GRADIENTS] == w
    assert step[Category.OPTIMIZER_STATE] == 3 * w


def test_lora_trainable_params_exact():
    cfg = Config(model="tiny", method="fo-adam", scheme="lora", lora_rank=8)
    # q_proj and v_proj in 2 layers: A 8x64 + B 64x8 = 1,024 each -> 4 x 1,024.
    assert analytic.trainable(cfg, TINY).params == 4 * 1_024


def test_prefix_and_prompt_trainable_params_exact():
    prefix = Config(model="tiny", method="zo-sgd", scheme="prefix", prefix_tokens=5)
    prompt = Config(model="tiny", method="zo-sgd", scheme="prompt", prompt_tokens=10)
    assert analytic.trainable(prefix, TINY).params == 5 * 2 * 2 * 64  # tokens x layers x (k, v) x h
    assert analytic.trainable(prompt, TINY).params == 10 * 64


def test_eager_scores_cost_and_sdpa_does_not():
    cfg = Config(model="opt-13b", method="fo-sgd", dtype="bf16", batch=4, seq=2048, attention="eager")
    eager = estimate_config(cfg, search=False)
    sdpa = estimate_config(cfg.replace(attention="sdpa"), search=False)
    # 40 layers x E = 4 x 40 x 2048^2 scores x (4 B fp32 softmax output + 2 B probabilities) saved.
    e = 4 * 40 * 2048 * 2048
    diff = eager.components[Category.ACTIVATIONS] - sdpa.components[Category.ACTIVATIONS]
    # Both save q, k, v and one T x h x 2 B output (sdpa's own; eager's copy for out_proj): only the
    # scores differ.
    assert diff == 40 * e * 6


def test_peak_phase_is_the_max_over_phases():
    est = estimate("opt-13b", "fo-adam", dtype="bf16", batch=1, seq=128, search=False)
    assert est.phases[est.peak_phase] == max(est.phases.values()) == est.peak_allocated_bytes
    assert est.peak_allocated_bytes <= est.peak_reserved_bytes <= est.peak_device_bytes


# ---- properties ---------------------------------------------------------------------------

MODELS = st.sampled_from(["opt-125m", "opt-13b"])
DTYPES = st.sampled_from(["fp32", "fp16", "bf16", "amp-fp16", "amp-bf16"])
METHODS = st.sampled_from([m.value for m in Method])
SCHEMES = st.sampled_from(["ft", "lora", "prefix", "prompt"])
ATTN = st.sampled_from(["eager", "sdpa"])
SIZES = st.integers(1, 4096)


def _peak(**kw) -> int:
    return estimate_config(Config(**kw), search=False).peak_device_bytes


@settings(max_examples=150, deadline=None)
@given(model=MODELS, method=METHODS, scheme=SCHEMES, dtype=DTYPES, attention=ATTN, batch=st.integers(1, 64),
       seq=SIZES, grow=st.integers(1, 512))
def test_peak_grows_with_batch_and_seq(model, method, scheme, dtype, attention, batch, seq, grow):
    kw = dict(model=model, method=method, scheme=scheme, dtype=dtype, attention=attention)
    base = _peak(batch=batch, seq=seq, **kw)
    assert _peak(batch=batch + grow, seq=seq, **kw) >= base
    assert _peak(batch=batch, seq=seq + grow, **kw) >= base


@settings(max_examples=100, deadline=None)
@given(model=MODELS, scheme=SCHEMES, dtype=DTYPES, attention=ATTN, batch=st.integers(1, 64), seq=SIZES)
def test_zo_state_ordering_and_zo_below_fo(model, scheme, dtype, attention, batch, seq):
    kw = dict(model=model, scheme=scheme, dtype=dtype, attention=attention, batch=batch, seq=seq)
    zo, mmt, adam = (_peak(method=m, **kw) for m in ("zo-sgd", "zo-sgd-mmt", "zo-adam"))
    assert zo <= mmt <= adam
    if scheme == "ft":
        assert zo < _peak(method="fo-sgd", **kw)


@settings(max_examples=100, deadline=None)
@given(model=MODELS, method=st.sampled_from(["fo-sgd", "fo-adam"]), scheme=st.sampled_from(["lora", "prefix", "prompt"]),
       dtype=DTYPES, attention=ATTN, batch=st.integers(1, 64), seq=SIZES)
def test_peft_needs_no_more_than_ft_for_fo(model, method, scheme, dtype, attention, batch, seq):
    kw = dict(model=model, method=method, dtype=dtype, attention=attention, batch=batch)
    # Prompt tuning lengthens the sequence by its virtual tokens: compare at the same total length.
    ft_seq = seq + (10 if scheme == "prompt" else 0)
    if scheme == "lora" and dtype in ("fp16", "bf16"):
        return  # the known exception: see test_lora_16bit_can_exceed_ft
    assert _peak(scheme=scheme, seq=seq, **kw) <= _peak(scheme="ft", seq=ft_seq, **kw)


@settings(max_examples=40, deadline=None)
@given(model=MODELS, method=METHODS, dtype=DTYPES, attention=ATTN, seq=st.integers(16, 2048))
def test_max_batch_is_exact(model, method, dtype, attention, seq):
    gpu = get_gpu("h100")
    cfg = Config(model=model, method=method, dtype=dtype, attention=attention, batch=1, seq=seq)
    est = estimate_config(cfg, gpu)
    spec = __import__("memplan.spec", fromlist=["resolve"]).resolve(model)
    if est.max_batch:
        assert device_bytes(cfg.model_copy(update={"batch": est.max_batch}), spec, gpu) <= gpu.total_bytes
    assert device_bytes(cfg.model_copy(update={"batch": est.max_batch + 1}), spec, gpu) > gpu.total_bytes
    if est.max_seq:
        assert device_bytes(cfg.model_copy(update={"seq": est.max_seq}), spec, gpu) <= gpu.total_bytes
    assert device_bytes(cfg.model_copy(update={"seq": est.max_seq + 1}), spec, gpu) > gpu.total_bytes


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_every_method_every_scheme_estimates(method):
    for scheme in ("ft", "lora", "prefix", "prompt"):
        est = estimate("opt-125m", method, scheme=scheme, dtype="bf16", batch=2, seq=64, search=False)
        assert est.peak_device_bytes > est.peak_allocated_bytes > 0


def test_lora_16bit_can_exceed_ft():
    # peft keeps adapters in fp32 and casts each 16-bit input to fp32 for lora_A: one T x h x 4 B copy
    # per target (q_proj, v_proj), more than the T x h x 2 B inputs full fine-tuning saves for the
    # frozen-in-LoRA projections. With activations dominant, LoRA needs more (peft issue 1514 measured it).
    kw = dict(model="opt-13b", method="fo-sgd", dtype="fp16", attention="sdpa", batch=29, seq=839)
    assert _peak(scheme="lora", **kw) > _peak(scheme="ft", **kw)
    amp = dict(kw, dtype="amp-fp16")
    assert _peak(scheme="lora", **amp) < _peak(scheme="ft", **amp)


def test_python_api_top_level():
    import memplan

    est = memplan.estimate("opt-13b", "zo-sgd", batch=16, seq=512, gpu="a100-80gb")
    assert isinstance(est, memplan.Estimate) and est.fits and est.max_batch >= 16


# ---- forward gradient (D3) ------------------------------------------------------------------------

def test_forward_grad_forward_takes_the_larger_moment():
    # opt-1.3b forward-grad prompt fp16 eager, batch 32: the dual forward holds a tangent beside every
    # live activation, so its forward phase holds at least the weights plus twice one layer's peak.
    # The old comparison (act against logits, not 2 x act) reported 113.3 GiB at seq 3072 and 150 GiB
    # at seq 4096, below what the activations and their tangents alone take.
    from memplan.spec import resolve

    spec = resolve("opt-1.3b")
    for seq, at_least_gib in ((3072, 154), (4096, 268)):  # 154.2 and 268.7 GiB now
        cfg = Config(model="opt-1.3b", method="forward-grad", scheme="prompt", dtype="fp16", attention="eager",
                     batch=32, seq=seq)
        act = analytic.layer_peak(cfg, spec, analytic.shapes(cfg, spec))
        weights = analytic.phases(cfg, spec, FAM)[Phase.LOAD][Category.WEIGHTS]
        _, _, totals = analytic.peak(cfg, spec, FAM)
        assert totals[Phase.FORWARD] >= weights + 2 * act
        assert totals[Phase.FORWARD] >= at_least_gib * 2**30


@pytest.mark.parametrize("scheme", ["ft", "lora", "prefix", "prompt"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_forward_grad_peak_is_monotone_in_batch_and_seq(scheme, attention):
    kw = dict(model="opt-13b", method="forward-grad", scheme=scheme, dtype="fp16", attention=attention)
    by_seq = [_peak(batch=2, seq=s, **kw) for s in range(4, 600, 7)]
    assert by_seq == sorted(by_seq)
    by_batch = [_peak(batch=b, seq=256, **kw) for b in range(1, 40)]
    assert by_batch == sorted(by_batch)


def test_prefix_kv_cache_is_fp32_under_autocast():
    # The fp32 prefix (peft keeps adapters in fp32) is the cache's first entry; torch.cat under autocast
    # promotes the 16-bit keys it appends, so every cached element is 4 bytes, not the compute dtype's 2.
    # TINY at batch 2 x seq 8, 5 prefix tokens: 2 layers x 2 x 13 keys x 2 (k and v) x 64 wide.
    elements = 2 * 2 * (8 + 5) * 2 * 64
    for dtype, per_element in (("amp-bf16", 4), ("amp-fp16", 4), ("bf16", 2), ("fp32", 4)):
        cfg = Config(model="tiny-opt", method="zo-sgd", scheme="prefix", dtype=dtype, batch=2, seq=8)
        assert analytic.kv_cache_bytes(cfg, TINY, analytic.shapes(cfg, TINY)) == elements * per_element
    # Without prefix tuning the cache starts empty and holds the compute dtype.
    cfg = Config(model="tiny-opt", method="zo-sgd", dtype="amp-bf16", batch=2, seq=8, use_cache=True)
    assert analytic.kv_cache_bytes(cfg, TINY, analytic.shapes(cfg, TINY)) == 2 * 2 * 8 * 2 * 64 * 2
