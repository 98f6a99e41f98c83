"""sparse-mezo (Sparse MeZO): the masked step, its kept thresholds, and its analytic phases against the trace."""

import math

import pytest
import torch
from typer.testing import CliRunner

from memplan.api import estimate_config
from memplan.cli import app
from memplan.methods import sparse_mezo as sm
from memplan.options import Config
from memplan.result import Category as C
from memplan.result import Phase
from memplan.steps import Step, build_model, make_batch
from memplan.tracing import trace_step
from tiny import TINY_OPT, fp64_model, write


@pytest.fixture
def opt(tmp_path):
    return write(tmp_path, TINY_OPT)


def _cfg(model, **kw):
    base = dict(model=model, method="sparse-mezo", dtype="fp32", attention="eager", batch=2, seq=8,
                lora_targets=())
    base.update(kw)
    return Config(**base)


def test_forwards_leave_the_weights_bit_for_bit(opt):
    # The weights never move: each module runs on a rebuilt copy that dies when it returns.
    torch.manual_seed(0)
    c = _cfg(opt)
    model = build_model(c)
    step = Step(c, model)
    batch = make_batch(c, model)
    before = {n: p.detach().clone() for n, p in step.params}
    storages = {n: p.data.data_ptr() for n, p in step.params}
    sm.forward(step, batch, 123, 1.0)
    sm.forward(step, batch, 123, -1.0)
    for n, p in step.params:
        assert torch.equal(p.detach(), before[n]), n
        assert p.data.data_ptr() == storages[n], n


def test_update_moves_only_the_small_entries_and_keeps_one_threshold_per_tensor(opt):
    torch.manual_seed(0)
    c = _cfg(opt, zo_sparsity=0.75)
    model = build_model(c)
    step = Step(c, model, lr=1e-2)
    batch = make_batch(c, model)
    before = {n: p.detach().clone() for n, p in step.params}
    step(batch)
    hs = step.state[sm.STATE_KEY]
    assert hs.shape == (len(step.params),) and hs.dtype == torch.float32
    moved = total = 0
    for i, (n, p) in enumerate(step.params):
        w = before[n]
        # h is the ceil(0.25 n)-th smallest |w|: entries above it never move.
        k = max(1, math.ceil(0.25 * w.numel()))
        assert hs[i].item() == w.abs().flatten().kthvalue(k).values.item()
        changed = p.detach() != w
        assert not torch.any(changed & (w.abs() > hs[i])), n
        moved += int(changed.sum())
        total += w.numel()
    # About a quarter of the entries (ties at zero in the norms' biases count as small, and a drawn
    # z moves each eligible entry almost surely).
    assert 0.2 < moved / total <= 0.3
    step(batch)
    assert step.state[sm.STATE_KEY] is hs  # computed once, then kept


def test_projected_gradient_is_the_directional_derivative_along_the_masked_direction(tmp_path):
    """fp64: (f(w + eps m z) - f(w - eps m z)) / 2 eps = grad . (m z) + O(eps^2)."""
    torch.manual_seed(0)
    c = _cfg(write(tmp_path, TINY_OPT), attention="sdpa", zo_sparsity=0.5)
    model, batch = fp64_model(c)  # fp64, no dropout
    loss = model(**batch, use_cache=False).loss
    step = Step(c, model, eps=1e-6)
    params = [p for _, p in step.params]
    grad = torch.autograd.grad(loss, params)
    hs = sm.thresholds(step)
    for seed in range(4):
        g = (sm.forward(step, batch, seed, 1.0) - sm.forward(step, batch, seed, -1.0)) / (2 * step.eps)
        d = sum((gi * sm.masked_z(p, hs[i], seed + i)).sum() for i, (gi, p) in enumerate(zip(grad, params)))
        assert g.item() == pytest.approx(d.item(), rel=1e-5, abs=1e-8)


def test_loss_goes_down_on_a_memorisable_batch(tmp_path):
    torch.manual_seed(0)
    # Half of each tensor perturbed (the default); lr from a short sweep (3e-3 drops the loss by 0.3).
    c = _cfg(write(tmp_path, TINY_OPT), batch=1, seq=6)
    model = build_model(c)
    model.eval()
    batch = make_batch(c, model)
    step = Step(c, model, lr=3e-3, eps=1e-3, seed=1)
    start = model(**batch, use_cache=False).loss.item()
    for _ in range(40):
        step(batch)
    end = model(**batch, use_cache=False).loss.item()
    assert end < start - 0.2, (start, end)


def test_traced_peak_is_the_mezo_update_on_the_embedding(opt):
    t = trace_step(_cfg(opt, seq=16, perturbation="mezo"))
    # Tiny OPT, fp32: weights 355,840 (tests/test_tracing.py), the embedding 256 x 64 x 4 = 65,536.
    # Update p = p - (lr g) (m z) on the embedding: m z, (lr g) m z and the new tensor (3 x 65,536);
    # the thresholds: 30 tensors x 4 B -> 512; the ids, a loss and the projected gradient: 3 x 512.
    assert t.peak.phase is Phase.OPTIMIZER_STEP
    assert t.peak.components == {C.WEIGHTS: 355_840, C.OPTIMIZER_STATE: 512, C.PERTURBATION: 3 * 65_536,
                                 C.ACTIVATIONS: 3 * 512}


def test_in_place_update_holds_z_the_absolute_values_and_the_mask(opt):
    t = trace_step(_cfg(opt, seq=16, perturbation="inplace"))
    # z and |p| (2 x 65,536) and the bool mask (16,384 B) while masking the embedding's z.
    assert t.peak.phases[Phase.OPTIMIZER_STEP] == 355_840 + 512 + 2 * 65_536 + 16_384 + 3 * 512


# Realistic shapes, where the analytic model is meant to hold (tiny models are dominated by 512 B
# rounding of small tensors). Llama: grouped-query attention, gated MLP, untied head.
LLAMA_GQA = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1376,
             "max_position_embeddings": 2048, "tie_word_embeddings": False}
SAMPLE = [  # (family, scheme, dtype, perturbation)
    ("opt", "ft", "fp32", "mezo"), ("opt", "ft", "fp16", "inplace"), ("opt", "lora", "bf16", "mezo"),
    ("opt", "prompt", "fp16", "mezo"), ("llama", "ft", "bf16", "mezo"), ("llama", "lora", "fp32", "inplace"),
    ("llama", "prefix", "fp16", "mezo"), ("llama", "prompt", "bf16", "mezo"),
]
MEDIAN, WORST = 0.01, 0.03


def test_analytic_phases_match_the_trace_on_a_sample(tmp_path):
    llama = write(tmp_path, LLAMA_GQA)
    errors = []
    for family, scheme, dtype, perturbation in SAMPLE:
        c = Config(model="opt-125m" if family == "opt" else llama, method="sparse-mezo", scheme=scheme,
                   dtype=dtype, perturbation=perturbation, attention="eager", batch=4, seq=128)
        traced = trace_step(c).peak.allocated
        est = estimate_config(c, search=False)
        analytic = est.peak_allocated_bytes - est.components[C.WORKSPACE]
        errors.append(abs(analytic - traced) / traced)
    errors.sort()
    median = (errors[3] + errors[4]) / 2
    assert median <= MEDIAN and errors[-1] <= WORST, errors


def test_sparsity_out_of_range_is_one_line_and_exit_2():
    r = CliRunner().invoke(app, ["fit", "opt-125m", "--method", "sparse-mezo", "--zo-sparsity", "1"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["memplan: error: --zo-sparsity must be < 1.0, got 1.0"]


def test_one_query_per_step(opt):
    from memplan.errors import MemplanError

    c = _cfg(opt, zo_queries=2)
    with pytest.raises(MemplanError, match="one query per step"):
        Step(c, build_model(c))
