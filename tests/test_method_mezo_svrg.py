"""MeZO-SVRG: its real step on tiny models (anchor copy, restoration, estimates, descent) and its bytes."""

import statistics

import pytest
import torch
from typer.testing import CliRunner

from memplan.api import estimate_config
from memplan.cli import app
from memplan.methods import mezo_svrg
from memplan.options import Config
from memplan.result import Category as C
from memplan.result import Phase
from memplan.steps import Step, build_model, make_batch
from memplan.tracing import trace_step
from tiny import TINY_LLAMA, TINY_OPT, write

W, EMBED = 355_840, 65_536  # tiny OPT fp32: weights, and its embedding (first and largest tensor)


def _cfg(model, **kw):
    base = dict(model=model, method="mezo-svrg", dtype="fp32", attention="eager", batch=2, seq=8)
    base.update(kw)
    return Config(**base)


def _step(tmp_path, lr=1e-3, **kw):
    c = _cfg(write(tmp_path, TINY_OPT), **kw)
    torch.manual_seed(0)
    model = build_model(c)
    model.eval()
    return Step(c, model, lr=lr, eps=1e-3, seed=2), make_batch(c, model)


def test_anchor_pass_keeps_a_real_copy_and_steps_along_the_estimate(tmp_path):
    step, batch = _step(tmp_path)
    before = [p.detach().clone() for _, p in step.params]
    info = step.run(batch)  # step 0: an anchor pass
    anchor, estimate = step.state["anchor"], step.state["estimate"]
    torch.manual_seed(info.seeds[0])
    for (n, p), w0, a, e in zip(step.params, before, anchor, estimate):
        assert a.untyped_storage().data_ptr() != p.untyped_storage().data_ptr(), n  # not the live weights
        assert torch.allclose(a, w0, atol=1e-6), n  # the anchor: w at the anchor pass
        z = torch.normal(0, 1, size=p.shape)
        assert torch.allclose(e, e.flatten()[0] / z.flatten()[0] * z, rtol=1e-4, atol=1e-7), n  # g_hat = g z
        assert torch.allclose(p.detach(), w0 - 1e-3 * e, atol=1e-6), n  # w <- w - lr g_hat


@pytest.mark.parametrize("mode", ["mezo", "inplace"])
def test_minibatch_step_restores_weights_and_anchor_at_lr_zero(tmp_path, mode):
    step, batch = _step(tmp_path, lr=0.0, perturbation=mode)
    step.run(batch)  # anchor pass (lr 0: w unchanged)
    with torch.no_grad():
        for a in step.state["anchor"]:
            a.add_(0.01)  # an anchor apart from w, so a swap that forgot to swap back would show
    w = [p.detach().clone() for _, p in step.params]
    anchor = [a.clone() for a in step.state["anchor"]]
    info = step.run(batch)  # a minibatch step: estimates at w and at the anchor
    assert len(info.seeds) == 2
    for (n, p), w0, a0, a in zip(step.params, w, anchor, step.state["anchor"]):
        assert torch.allclose(p.detach(), w0, atol=1e-6), n
        assert torch.allclose(a, a0, atol=1e-6), n


def test_loss_goes_down_on_a_memorisable_batch(tmp_path):
    for interval in (1, 3):
        (tmp_path / str(interval)).mkdir()
        step, batch = _step(tmp_path / str(interval), batch=1, seq=6, svrg_interval=interval)
        start = step.model(**batch, use_cache=False).loss.item()
        for _ in range(30):
            step(batch)
        assert step.model(**batch, use_cache=False).loss.item() < start - 0.2, interval


def test_trace_of_an_anchor_refresh_holds_the_old_and_the_new_estimate(tmp_path):
    t = trace_step(_cfg(write(tmp_path, TINY_OPT), svrg_interval=1))
    assert t.peak.phase is Phase.OPTIMIZER_STEP
    # W, the anchor (W) and the old estimate (W), the new estimate all but built (W), and z beside
    # the previous z when the last tensors are drawn; ids and 0-d losses: a few 512 B blocks.
    assert 4 * W <= t.peak.allocated <= 4 * W + 2 * EMBED
    est = estimate_config(_cfg(write(tmp_path, TINY_OPT), svrg_interval=1), search=False)
    assert abs(est.peak_allocated_bytes - est.components[C.WORKSPACE] - t.peak.allocated) <= 0.01 * t.peak.allocated


def test_trace_measures_a_whole_cycle_of_steps(tmp_path):
    # At interval 2 the step after the warm-up is a minibatch step and the next an anchor pass: the
    # trace measures both (the method's cycle), so it holds the anchor pass's peak, as the analytic does.
    c = _cfg(write(tmp_path, TINY_OPT), svrg_interval=2)
    t = trace_step(c)
    assert not any("repeat every" in w for w in t.warnings)
    est = estimate_config(c, search=False)
    assert abs(est.peak_allocated_bytes - est.components[C.WORKSPACE] - t.peak.allocated) <= 0.01 * t.peak.allocated
    assert 4 * W <= t.peak.allocated  # W, the anchor, the old and the new estimate
    # A cycle longer than the trace measures is said.
    assert any("repeat every 9; the trace measured the first 8" in w
               for w in trace_step(_cfg(write(tmp_path, TINY_OPT), svrg_interval=9)).warnings)


def test_anchor_batches_take_two_forwards_each(tmp_path):
    step, batch = _step(tmp_path, svrg_anchor_batches=3)
    phases = []
    step.hooks.phase = phases.append
    step.run(batch)
    assert phases.count(Phase.FORWARD) == 2 * 3 + 1  # the estimate's two sides, then the logged loss


def test_svrg_options_refuse_bad_values_in_one_line():
    r = CliRunner().invoke(app, ["fit", "opt-125m", "--method", "mezo-svrg", "--svrg-interval", "0"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "memplan: error: --svrg-interval must be a positive integer, got 0"


SAMPLE = [  # (config, scheme, dtype, perturbation); interval 1: the measured step is an anchor refresh
    (TINY_OPT, "ft", "fp32", "mezo"), (TINY_OPT, "ft", "fp16", "inplace"), (TINY_LLAMA, "ft", "bf16", "mezo"),
    (TINY_LLAMA, "ft", "fp32", "inplace"),
]


def test_analytic_matches_the_trace_on_a_sample(tmp_path):
    errors = []
    for i, (tiny, scheme, dtype, mode) in enumerate(SAMPLE):
        c = Config(model=write(tmp_path, tiny, f"{i}.json"), method="mezo-svrg", scheme=scheme, dtype=dtype,
                   attention="sdpa", batch=2, seq=8, perturbation=mode, svrg_interval=1)
        trace = trace_step(c).peak.allocated
        est = estimate_config(c, search=False)
        errors.append(abs(est.peak_allocated_bytes - est.components[C.WORKSPACE] - trace) / trace)
    assert statistics.median(errors) <= 0.01, errors
    assert max(errors) <= 0.03, errors
