"""HiZOO: its real step on tiny models (round trip, estimates, descent) and its bytes, analytic against trace."""

import statistics
import sys
from pathlib import Path

import pytest
import torch

from memplan import analytic
from memplan.api import estimate_config
from memplan import methods
from memplan.methods import hizoo, zo
from memplan.options import Config
from memplan.result import Category as C
from memplan.result import Phase
from memplan.pipeline import family_of
from memplan.spec import resolve
from memplan.steps import Step, build_model, make_batch
from memplan.tracing import trace_step
from tiny import TINY_LLAMA, TINY_OPT, write, fp64_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibration"))
from analytic_vs_trace import LLAMA_GQA  # noqa: E402

# Tiny OPT, fp32: weights W (tests/test_tracing.py shows the sum); the embedding, its largest tensor,
# 256 x 64 x 4 = 65,536 B, is also its first (embed_positions, 66 x 64 x 4 = 16,896 B, comes next).
W, EMBED = 355_840, 65_536


def _cfg(model, **kw):
    base = dict(model=model, method="hizoo", dtype="fp32", attention="eager", batch=2, seq=8)
    base.update(kw)
    return Config(**base)


def _random_hessian(step):
    torch.manual_seed(5)
    step.state["hessian"] = [torch.rand_like(p) * 3 + 0.25 for _, p in step.params]


@pytest.mark.parametrize("mode", ["mezo", "inplace"])
def test_perturbation_round_trip_restores_the_weights(tmp_path, mode):
    c = _cfg(write(tmp_path, TINY_OPT), perturbation=mode)
    torch.manual_seed(0)
    step = Step(c, build_model(c))
    _random_hessian(step)  # H = 1 would hide a missing 1 / sqrt(H)
    before = {n: p.detach().clone() for n, p in step.params}
    moved = None
    for scale in (1.0, -2.0, 1.0):
        hizoo.perturb(step, seed=11, scale=scale)
        if moved is None:
            moved = {n: p.detach().clone() for n, p in step.params}
    torch.manual_seed(11)
    for (n, p), h in zip(step.params, step.state["hessian"]):
        z = torch.normal(0, 1, size=p.shape)
        # the first move is eps z / sqrt(H) (fp32 rounding of w + d: |w| u at most)
        assert torch.allclose(moved[n] - before[n], 1e-3 * z / h.sqrt(), atol=2e-7 * (1 + before[n].abs().max()))
        # three moves round three times: |w3 - w| <= 3 u |w| + 6 u |eps z / sqrt(H)|
        bound = 2.0 ** -24 * (3 * before[n].abs() + 6 * (1e-3 * z / h.sqrt()).abs()) * 1.01 + 1e-12
        assert torch.all((p.detach() - before[n]).abs() <= bound), n


def test_the_difference_quotient_is_the_derivative_along_z_over_sqrt_h(tmp_path):
    # fp64, no dropout: (f(w + eps v) - f(w - eps v)) / 2 eps = grad . v + O(eps^2) with v = z / sqrt(H).
    c = _cfg(write(tmp_path, TINY_OPT), attention="sdpa")
    torch.manual_seed(0)
    model, batch = fp64_model(c)  # fp64, no dropout
    params = [p for _, p in model.named_parameters()]
    grad = torch.autograd.grad(model(**batch, use_cache=False).loss, params)
    step = Step(c, model, eps=1e-6)
    _random_hessian(step)
    for seed in range(5):
        hizoo.perturb(step, seed, 1.0)
        l1 = zo.forward(step, batch)
        hizoo.perturb(step, seed, -2.0)
        l2 = zo.forward(step, batch)
        hizoo.perturb(step, seed, 1.0)
        torch.manual_seed(seed)
        d = sum((g * torch.normal(0, 1, size=p.shape, dtype=p.dtype) / h.sqrt()).sum()
                for g, p, h in zip(grad, params, step.state["hessian"])).item()
        assert ((l1 - l2) / 2e-6).item() == pytest.approx(d, rel=1e-5, abs=1e-8)


def test_one_step_updates_the_hessian_then_the_weights_as_the_reference(tmp_path):
    c = _cfg(write(tmp_path, TINY_OPT))
    torch.manual_seed(0)
    model = build_model(c)
    model.eval()
    step = Step(c, model, lr=1e-3, eps=1e-3, seed=3)
    before = {n: p.detach().clone() for n, p in step.params}
    info = step.run(make_batch(c, model))
    l0, l1, l2 = info.losses
    a, eps = hizoo.HESSIAN_SMOOTH, 1e-3
    torch.manual_seed(info.seeds[0])
    for (n, p), h in zip(step.params, step.state["hessian"]):
        z = torch.normal(0, 1, size=p.shape)
        # H started at ones: H = (1 - a) + a |l1 + l2 - 2 l0| z^2 / (2 eps^2)
        expected_h = (1 - a) + a * abs(l1 + l2 - 2 * l0) * z * z / (2 * eps * eps)
        assert torch.allclose(h, expected_h, rtol=1e-5), n
        # w <- w - lr g z / sqrt(H), g = (l1 - l2) / 2 eps (weight decay 0)
        expected_w = before[n] - 1e-3 * info.projected_grads[0] * z / expected_h.sqrt()
        assert torch.allclose(p.detach(), expected_w, rtol=1e-4, atol=1e-6), n


def test_loss_goes_down_on_a_memorisable_batch(tmp_path):
    c = _cfg(write(tmp_path, TINY_OPT), batch=1, seq=6)
    torch.manual_seed(0)
    model = build_model(c)
    model.eval()
    batch = make_batch(c, model)
    step = Step(c, model, lr=1e-3, eps=1e-3, seed=1)
    start = model(**batch, use_cache=False).loss.item()
    for _ in range(40):
        step(batch)
    assert model(**batch, use_cache=False).loss.item() < start - 0.2


def test_hizoo_takes_one_query(tmp_path):
    c = _cfg(write(tmp_path, TINY_OPT), zo_queries=2)
    with pytest.raises(Exception, match="one query"):
        Step(c, build_model(c))


def test_trace_peak_is_the_update_of_the_embedding_to_the_byte(tmp_path):
    t = trace_step(_cfg(write(tmp_path, TINY_OPT)))
    assert t.peak.phase is Phase.OPTIMIZER_STEP
    # W, H (1x W), and six embedding-sized temporaries (z, H z z, estimate, g z, sqrt(H), g z / sqrt(H));
    # the rest: the ids and 0-d losses and scalars alive then (512 B each).
    assert t.peak.components[C.WEIGHTS] == W
    assert t.peak.components[C.OPTIMIZER_STATE] == W
    assert t.peak.components[C.PERTURBATION] == 6 * EMBED
    assert t.peak.allocated - (2 * W + 6 * EMBED) <= 8 * 512


def test_last_forward_holds_the_last_tensors_leftovers(tmp_path):
    # Llama's last trainable tensor is lm_head (256 x 64 x 4 = 65,536 B): z, H z z, the estimate and the
    # gradient of it stay bound through the reference's final forward.
    c = _cfg(write(tmp_path, TINY_LLAMA), attention="sdpa")
    forward = analytic.phases(c, resolve(c.model), family_of(None)[0])[Phase.FORWARD]
    assert forward[C.PERTURBATION] == 4 * 65_536
    traced = trace_step(c).peak.phases[Phase.FORWARD]
    assert abs(traced - (methods.total(forward) - forward[C.WORKSPACE])) <= 0.03 * traced


# ---- analytic against trace: a sample of the grid (calibration/methods_vs_trace.py runs all of it) ----

SAMPLE = [  # (family, scheme, dtype, perturbation)
    ("opt", "ft", "fp32", "mezo"), ("opt", "lora", "fp16", "mezo"), ("opt", "prefix", "bf16", "inplace"),
    ("opt", "prompt", "fp32", "mezo"), ("llama", "ft", "bf16", "inplace"), ("llama", "lora", "fp32", "mezo"),
    ("llama", "prefix", "fp16", "mezo"), ("llama", "prompt", "bf16", "mezo"),
]
OPT_SMALL = {**TINY_OPT, "vocab_size": 8192, "hidden_size": 256, "ffn_dim": 1024, "num_hidden_layers": 4,
             "num_attention_heads": 8, "max_position_embeddings": 256}
LLAMA_SMALL = {**LLAMA_GQA, "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688}


def test_analytic_matches_the_trace_on_a_sample(tmp_path):
    opt, llama = write(tmp_path, OPT_SMALL, "opt.json"), write(tmp_path, LLAMA_SMALL, "llama.json")
    errors = []
    for family, scheme, dtype, mode in SAMPLE:
        c = Config(model=opt if family == "opt" else llama, method="hizoo", scheme=scheme, dtype=dtype,
                   attention="sdpa", batch=4, seq=64, perturbation=mode)
        trace = trace_step(c).peak.allocated
        est = estimate_config(c, search=False)
        analytic = est.peak_allocated_bytes - est.components[C.WORKSPACE]
        errors.append(abs(analytic - trace) / trace)
    assert statistics.median(errors) <= 0.01, errors
    assert max(errors) <= 0.03, errors
