"""The steps on tiny models with real tensors: restoration, estimates, descent, frozen weights."""

import math

import pytest
import torch

from memplan.options import Config, Method
from memplan.methods import zo
from memplan.steps import Step, build_model, make_batch
from tiny import TINY_LLAMA, TINY_OPT, write, fp64_model


@pytest.fixture
def opt(tmp_path):
    return write(tmp_path, TINY_OPT)


def _cfg(model, **kw):
    base = dict(model=model, dtype="fp32", attention="eager", batch=2, seq=8, lora_targets=())
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("mode", ["inplace", "mezo"])
def test_perturbation_restores_weights_within_fp32_rounding(opt, mode):
    torch.manual_seed(0)
    c = _cfg(opt, perturbation=mode)
    model = build_model(c)
    step = Step(c, model, eps=1e-3)
    before = {n: p.detach().clone() for n, p in step.params}
    for scale in (1.0, -2.0, 1.0):
        zo.perturb(step, seed=123, scale=scale)
    torch.manual_seed(123)
    u = 2.0 ** -24  # fp32 unit roundoff (round to nearest)
    for n, p in step.params:
        w = before[n]
        ez = 1e-3 * torch.normal(0, 1, size=w.shape)
        # Each of the three updates rounds eps*s*z and the sum once: |w3 - w| <= u (3|w| + 6|eps z|) + O(u^2).
        bound = u * (3 * w.abs() + 6 * ez.abs()) * 1.01
        assert torch.all((p.detach() - w).abs() <= bound), n


def test_zo_projected_gradient_is_the_directional_derivative(tmp_path):
    """fp64: per seed, (f(w+eps z) - f(w-eps z)) / 2eps = grad . z + O(eps^2); averaged, E[g z . u] = grad . u.

    OPT rather than Llama: Llama's RMSNorm and rotary run in fp32 even in an fp64 model.
    """
    torch.manual_seed(0)
    c = _cfg(write(tmp_path, TINY_OPT), dtype="fp32", attention="sdpa")  # eager softmaxes in fp32
    model, batch = fp64_model(c)  # fp64, no dropout
    loss = model(**batch, use_cache=False).loss
    params = [p for _, p in model.named_parameters()]
    grad = torch.autograd.grad(loss, params)
    step = Step(c, model, eps=1e-6)
    n, proj, dirs = 60, [], []
    for seed in range(n):
        _, g = zo.projected_grad(step, batch, seed)
        torch.manual_seed(seed)
        zs = [torch.normal(0, 1, size=p.shape, dtype=p.dtype) for p in params]
        d = sum((gi * z).sum() for gi, z in zip(grad, zs)).item()
        # Central difference: error eps^2 f'''(z,z,z)/6 with |z| ~ sqrt(1e5), and an O(eps |z|) error
        # where a ReLU kink lies within eps |z| ~ 3e-5; fp64 rounding of the loss adds 1e-16 / 1e-7.
        assert g.item() == pytest.approx(d, rel=1e-5, abs=1e-8)
        proj.append(g.item())
        dirs.append(sum((gi * z).sum() for gi, z in zip(grad, zs)).item() / math.sqrt(sum((gi ** 2).sum().item() for gi in grad)))
    # Unbiasedness along u = grad/|grad|: mean of g * (z . u) -> |grad|; each term has std sqrt(2)|grad|,
    # so the mean over n has std sqrt(2/n)|grad|; 4 sigma keeps a false failure below 1e-4.
    norm = math.sqrt(sum((gi ** 2).sum().item() for gi in grad))
    mean = sum(g * d for g, d in zip(proj, dirs)) / n
    assert abs(mean - norm) <= 4 * math.sqrt(2 / n) * norm


def test_forward_grad_jvp_equals_autograd_directional_derivative(opt):
    torch.manual_seed(0)
    c = _cfg(opt, method="forward-grad", attention="sdpa")  # sdpa's math path: fp64 throughout
    model, batch = fp64_model(c)  # fp64, no dropout
    params = [p for _, p in model.named_parameters()]
    loss = model(**batch, use_cache=False).loss
    grad = torch.autograd.grad(loss, params)
    step = Step(c, model, lr=0.0, seed=7)
    info = step.run(batch)
    torch.manual_seed(info.seeds[0])
    vs = [torch.randn_like(p) for p in params]
    d = sum((g * v).sum() for g, v in zip(grad, vs)).item()
    assert info.jvp.item() == pytest.approx(d, rel=1e-9)


@pytest.mark.parametrize("method", list(Method))
def test_every_method_lowers_the_loss_on_a_memorisable_batch(tmp_path, method):
    torch.manual_seed(0)
    c = _cfg(write(tmp_path, TINY_OPT), method=method, batch=1, seq=6)
    model = build_model(c)
    model.eval()  # no dropout
    batch = make_batch(c, model)
    zo = method.is_zo
    # Learning rates from a sweep over 40 steps (ZO steps move by lr * g * z, |z| ~ sqrt(5e4)).
    lr = {"fo-sgd": 0.5, "fo-adam": 1e-2, "forward-grad": 3e-3, "zo-sgd": 1e-3, "zo-sgd-mmt": 3e-4,
          "zo-sgd-cons": 3e-3, "zo-sgd-sign": 3e-3, "zo-adam": 3e-3,
          "hizoo": 1e-3, "mezo-svrg": 5e-4, "sparse-mezo": 3e-3, "lozo": 1e-3, "lozo-m": 1e-3,
          "subzero": 1e-3}[method.value]
    step = Step(c, model, lr=lr, eps=1e-3, seed=1)
    start = model(**batch, use_cache=False).loss.item()
    for _ in range(40 if zo or method is Method.FORWARD_GRAD else 10):
        step(batch)
    end = model(**batch, use_cache=False).loss.item()
    assert end < start - 0.2, (start, end)


@pytest.mark.parametrize("scheme", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("method", ["fo-adam", "zo-sgd", "forward-grad"])
def test_frozen_weights_stay_untouched(tmp_path, scheme, method):
    torch.manual_seed(0)
    c = _cfg(write(tmp_path, TINY_LLAMA), scheme=scheme, method=method, perturbation="mezo")
    model = build_model(c)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained
    step = Step(c, model, lr=1e-2)
    batch = make_batch(c, model)
    step(batch)
    step(batch)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert any(not torch.equal(p.detach(), trained[n]) for n, p in model.named_parameters() if n in trained)


def test_q_queries_keep_an_accumulator_and_cons_takes_one(opt):
    c = _cfg(opt, method="zo-sgd", zo_queries=3)
    model = build_model(c)
    step = Step(c, model)
    info = step.run(make_batch(c, model))
    assert len(info.projected_grads) == 3 and len(info.seeds) == 3
    assert all(p.grad is None for _, p in step.params)  # freed after the update
    with pytest.raises(Exception, match="one query"):
        Step(_cfg(opt, method="zo-sgd-cons", zo_queries=2), model)


@pytest.mark.parametrize("method", ["zo-sgd", "fo-adam"])
def test_prompt_tuning_where_token_embeddings_are_narrower_than_the_layers(tmp_path, method):
    # OPT-350m's shape: tokens embed in word_embed_proj_dim (here 32) and project in to hidden (64);
    # peft's virtual tokens must be as wide as the token embeddings, not hidden_size.
    torch.manual_seed(0)
    c = _cfg(write(tmp_path, {**TINY_OPT, "word_embed_proj_dim": 32}), method=method, scheme="prompt")
    model = build_model(c)
    step = Step(c, model)
    loss = step(make_batch(c, model))
    assert torch.isfinite(loss)
    assert sum(p.numel() for _, p in step.params) == 10 * 32  # prompt_tokens x token width
