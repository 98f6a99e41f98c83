"""Mixture-of-experts models on the tracer: transformers 5's grouped experts (stacked 3-D weights,
`aten._grouped_mm`) in every dtype, fake against real, routing, and ZO's largest tensor.

Configs are raw config.json files of shrunk models, as a user's folder would hold them.
"""

import pytest

from memplan.errors import MemplanError
from memplan.options import Config
from memplan.overhead import round_block
from memplan.result import Category as C
from memplan.tracing import trace_step
from tiny import write

H, F, E, K, VOCAB = 64, 192, 4, 2, 128
_SHAPE = {"vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": F, "max_position_embeddings": 256,
          "tie_word_embeddings": False}
MIXTRAL = {"model_type": "mixtral", **_SHAPE, "num_local_experts": E, "num_experts_per_tok": K}
DENSE_TWIN = {"model_type": "mistral", **_SHAPE}  # the same layer with one MLP of width F
QWEN3_MOE = {"model_type": "qwen3_moe", **_SHAPE, "num_experts": E, "num_experts_per_tok": K,
             "moe_intermediate_size": F, "norm_topk_prob": True}
QWEN2_MOE = {"model_type": "qwen2_moe", **_SHAPE, "num_experts": E, "num_experts_per_tok": K,
             "moe_intermediate_size": F, "shared_expert_intermediate_size": F}


def _cfg(path, **kw):
    base = dict(model=path, method="fo-adam", dtype="fp32", attention="sdpa", batch=2, seq=32)
    base.update(kw)
    return Config(**base)


def _weight_bytes(model: dict, wb: int) -> int:
    """Every parameter of a meta-device build, each rounded to 512 B, plus the fp32 rotary buffers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in model.items() if k != "model_type"}
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model["model_type"], **fields))
    return sum(round_block(p.numel() * wb) for p in m.parameters()) + \
        sum(round_block(b.numel() * 4) for b in m.buffers())


@pytest.mark.parametrize("model", [MIXTRAL, QWEN3_MOE, QWEN2_MOE], ids=["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "amp-bf16"])
def test_grouped_experts_trace_in_every_dtype(tmp_path, model, dtype):
    """torch's meta kernel for `aten._grouped_mm` takes bf16 only; the tracer's own takes any dtype.
    The stacked expert tensors count once each, as weights."""
    t = trace_step(_cfg(write(tmp_path, model), method="zo-sgd", dtype=dtype))
    assert t.peak.components[C.WEIGHTS] == _weight_bytes(model, 2 if dtype in ("fp16", "bf16") else 4)


@pytest.mark.parametrize("dtype,method,scheme", [
    ("fp32", "fo-adam", "ft"), ("fp32", "fo-adam", "lora"), ("fp32", "zo-sgd", "ft"),
    ("bf16", "fo-adam", "ft"), ("bf16", "fo-adam", "lora"), ("bf16", "zo-sgd", "ft"),
    ("amp-bf16", "fo-adam", "ft"), ("amp-bf16", "fo-adam", "lora"),
])
def test_moe_fake_equals_real_to_the_byte(tmp_path, dtype, method, scheme):
    """The step on fake tensors (the tracer's grouped_mm kernel in fp32) and on real CPU tensors
    (the real `_grouped_mm`): the same peak, categories and phase. LoRA on q_proj / v_proj leaves
    the stacked experts frozen: autograd asks grouped_mm for no expert gradient, fake or real."""
    c = _cfg(write(tmp_path, MIXTRAL), method=method, scheme=scheme, dtype=dtype)
    fake, real = trace_step(c), trace_step(c, real=True)
    assert fake.peak.allocated == real.peak.allocated
    assert fake.peak.components == real.peak.components
    assert fake.peak.phase == real.peak.phase
    if scheme == "lora":
        wb = 2 if dtype == "bf16" else 4
        # no gradient as large as a stacked expert tensor: only the adapters' (fp32, r = 8)
        assert fake.peak.components.get(C.GRADIENTS, 0) < round_block(E * 2 * F * H * wb)


def _route(monkeypatch, how: str):
    """Replace the router's expert choice (after it computed its logits, as the real one does)."""
    import torch
    from transformers.models.mixtral import modeling_mixtral as mm

    original = mm.MixtralTopKRouter.forward

    def forward(self, hidden_states):
        logits, scores, idx = original(self, hidden_states)
        t = idx.shape[0]
        if how == "natural":
            forced = idx.clone()
        elif how == "uniform":  # round-robin: every expert gets T * K / E slots
            forced = (torch.arange(t * K, device=idx.device) % E).view(t, K)
        elif how == "half":  # the first half of the tokens to experts 0 and 1
            forced = torch.where(torch.arange(t, device=idx.device).unsqueeze(1) < t // 2,
                                 torch.arange(K, device=idx.device), idx)
        else:  # skewed: every token to experts 0 and 1
            forced = torch.arange(K, device=idx.device).expand(t, K).contiguous()
        return logits, scores, forced

    monkeypatch.setattr(mm.MixtralTopKRouter, "forward", forward)


@pytest.mark.parametrize("method,scheme", [("fo-adam", "ft"), ("fo-adam", "lora"), ("zo-sgd", "ft")])
def test_routing_does_not_change_the_peak_with_grouped_experts(tmp_path, monkeypatch, method, scheme):
    """Real CPU tensors: natural, round-robin, half-skewed and fully skewed routing give the same peak
    to the byte. Every tensor of the grouped path has T * K routed rows whatever the routing (sort,
    gather, the two grouped_mm outputs, the weighted sum); histogram and offsets are E-sized."""
    c = _cfg(write(tmp_path, MIXTRAL), method=method, scheme=scheme, dtype="bf16", batch=2, seq=64)
    peaks = {}
    for how in ("natural", "uniform", "half", "skewed"):
        with monkeypatch.context() as m:
            _route(m, how)
            peaks[how] = trace_step(c, real=True).peak
    assert len({p.allocated for p in peaks.values()}) == 1, {k: p.allocated for k, p in peaks.items()}
    assert len({tuple(sorted(p.components.items())) for p in peaks.values()}) == 1


@pytest.mark.parametrize("dtype,wb", [("fp32", 4), ("bf16", 2)])
def test_zo_perturbation_follows_the_stacked_expert_tensor(tmp_path, dtype, wb):
    """MeZO's out-of-place perturbation holds three temporaries of the largest tensor: for Mixtral the
    stacked experts.gate_up_proj (E x 2F x H), for its dense twin one gate / up / down matrix (F x H)."""
    kw = dict(method="zo-sgd", dtype=dtype, batch=1, seq=8)  # short: the perturbation holds the peak
    moe = trace_step(_cfg(write(tmp_path, MIXTRAL), **kw))
    dense = trace_step(_cfg(write(tmp_path, DENSE_TWIN, "dense.json"), **kw))
    gate_up = round_block(E * 2 * F * H * wb)  # 4 x 384 x 64 x wb
    assert moe.peak.components[C.PERTURBATION] == 3 * gate_up
    assert dense.peak.components[C.PERTURBATION] == 3 * round_block(F * H * wb)
    assert moe.peak.components[C.PERTURBATION] == 2 * E * dense.peak.components[C.PERTURBATION]


def test_forward_grad_on_grouped_experts_is_one_clear_line(tmp_path):
    """torch 2.13 has no forward-AD rule for `aten._grouped_mm`: the real step fails on a GPU too."""
    c = _cfg(write(tmp_path, MIXTRAL), method="forward-grad", dtype="bf16")
    with pytest.raises(MemplanError, match=r"forward-grad cannot run .*forward-AD rule for aten._grouped_mm") as e:
        trace_step(c)
    assert "\n" not in str(e.value)
