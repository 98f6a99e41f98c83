"""--loss chunked: the per-chunk loss equals transformers' loss, and the analytic model follows the trace."""

from __future__ import annotations

import json

import pytest

from memplan.api import estimate_config
from memplan.arch._common import chunked_logits_backward, chunked_logits_forward
from memplan.options import Config, Method
from memplan.result import Category
from tiny import TINY_LLAMA, write

torch = pytest.importorskip("torch")

# GQA Llama with a Llama-sized vocabulary, so the logits dominate a tiny model's step.
BIG_VOCAB_LLAMA = {**TINY_LLAMA, "vocab_size": 32000, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write(tmp_path_factory.mktemp("llama"), BIG_VOCAB_LLAMA)


def _real(cfg: Config):
    from memplan.steps import Step, build_model, make_batch

    torch.manual_seed(0)
    model = build_model(cfg).float()
    model.config.use_cache = False
    return model, Step(cfg, model), make_batch(cfg, model)


@pytest.mark.parametrize("scheme", ["ft", "lora"])
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_chunked_loss_and_gradients_equal_the_full_loss(tmp_path, scheme, chunks):
    cfg = Config(model=write(tmp_path, TINY_LLAMA), method="fo-sgd", dtype="fp32", batch=2, seq=19,
                 scheme=scheme, loss="chunked", loss_chunks=chunks)
    model, step, batch = _real(cfg)
    full = model(**batch).loss
    g_full = torch.autograd.grad(full, [p for _, p in step.params])
    chunked = step.loss(batch)
    g_chunked = torch.autograd.grad(chunked, [p for _, p in step.params])
    assert abs(chunked.item() - full.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(g_full, g_chunked)) < 1e-5


def _errors(cfg: Config) -> tuple[float, int, int]:
    from memplan.tracing import trace_step

    traced = trace_step(cfg).peak.allocated
    est = estimate_config(cfg, search=False)
    analytic = est.peak_allocated_bytes - est.components[Category.WORKSPACE]
    return (analytic - traced) / traced, analytic, traced


@pytest.mark.parametrize("method", ["fo-adam", "fo-sgd", "zo-sgd"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "amp-bf16"])
@pytest.mark.parametrize("scheme", ["ft", "lora"])
@pytest.mark.parametrize("model", ["llama", "opt-125m"])
def test_analytic_against_the_trace(request, llama, model, method, dtype, scheme):
    # OPT-125m at 4 x 128 tokens: its fp32 logits (4 x 128 x 50272 x 4 B = 103 MB) are a large
    # part of every FO peak; the tiny Llama's 32000-wide vocabulary dominates at 2 x 64.
    size = dict(batch=2, seq=64) if model == "llama" else dict(batch=4, seq=128)
    cfg = Config(model=llama if model == "llama" else model, method=method, dtype=dtype, scheme=scheme,
                 loss="chunked", loss_chunks=4, **size)
    err, analytic, traced = _errors(cfg)
    if (model, scheme, method) == ("opt-125m", "ft", "fo-sgd") and dtype != "amp-bf16":
        # Known gap, measured -2.7 %: a tied lm_head's gradient made while chunks' logits are still
        # alive, not modelled yet. Held to what it is, so a change in either direction is seen.
        assert -0.03 < err < -0.02, (analytic, traced)
    elif (model, scheme, method, dtype) == ("opt-125m", "lora", "zo-sgd", "amp-bf16"):
        # Known gap, measured -6.9 %: no-grad autocast casts of the frozen head per chunk, not modelled yet.
        assert -0.075 < err < -0.06, (analytic, traced)
    else:
        assert abs(err) < 0.01, (analytic, traced)


def test_logits_drop_by_all_but_one_chunk(llama):
    # fo-sgd fp16 ft, T = 2 x 64 = 128 tokens, V = 32000, 4 chunks of Tc = 32 tokens.
    # full backward: 3 x T x V x 4 = 49_152_000 B (log_softmax output, nll and log_softmax gradients);
    # chunked: every chunk's log_softmax output (T x V x 4) + one chunk's two gradients (2 x Tc x V x 4)
    # = (128 + 64) x 32000 x 4 = 24_576_000 B.
    base = Config(model=llama, method="fo-sgd", dtype="fp16", batch=2, seq=64)
    full = estimate_config(base, search=False).components[Category.LOGITS]
    chunked = estimate_config(base.replace(loss="chunked", loss_chunks=4), search=False).components[Category.LOGITS]
    assert (full, chunked) == (49_152_000, 24_576_000)
    # zo-sgd (no grad) fp16: full T x V x (2 + 4 + 4) = 40_960_000 B; chunked one chunk's fp32 logits and
    # log_softmax, Tc x V x 8 = 8_192_000 B = (1 - 1/N) less than the full fp32 logits and log_softmax.
    zo = base.replace(method="zo-sgd")
    from memplan.analytic import shapes
    from memplan.spec import resolve as load_spec

    s = shapes(zo.replace(loss="chunked", loss_chunks=4), load_spec(llama))
    assert chunked_logits_forward(s) == (0, 8_192_000)
    s_fo = shapes(base.replace(loss="chunked", loss_chunks=4), load_spec(llama))
    assert chunked_logits_forward(s_fo) == (96 * 32000 * 4, 8_192_000)
    assert chunked_logits_backward(s_fo) == 24_576_000


def test_default_full_changes_nothing(llama):
    cfg = Config(model=llama, method="fo-adam", dtype="amp-bf16", batch=2, seq=64)
    assert cfg.loss.value == "full" and cfg.loss_chunks == 8
    a = estimate_config(cfg, search=False)
    b = estimate_config(cfg.replace(loss_chunks=3), search=False)  # chunks only matter when chunked
    assert a.peak_allocated_bytes == b.peak_allocated_bytes


@pytest.mark.parametrize("args, message", [
    (["--loss-chunks", "0"], "--loss-chunks must be a positive integer, got 0"),
    (["--loss", "sliced"], "unknown loss 'sliced'"),
    (["--loss", "chunked", "--method", "forward-grad"], "not modelled for forward-grad"),
    (["--loss", "chunked", "--scheme", "prefix"], "supports --scheme ft and lora"),
])
def test_bad_input_one_line_exit_2(run_cli, args, message):
    code, out, err = run_cli("fit", "opt-125m", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_masked_lm_refuses_chunked(run_cli):
    code, _, err = run_cli("fit", "roberta-base", "--loss", "chunked")
    assert code == 2 and "needs a causal LM" in err


def test_method_all_leaves_out_a_method_that_cannot_take_the_options(run_cli):
    # forward-grad refuses --loss chunked: `-m all` answers for the others and says which was left out;
    # naming forward-grad alone is bad input.
    code, out, err = run_cli("fit", "opt-125m", "-m", "all", "--loss", "chunked", "--json")
    methods = [e["method"] for e in json.loads(out)["estimates"]]
    assert code == 0 and "forward-grad" not in methods and len(methods) == len(Method) - 1
    assert err.strip() == ("memplan: note: forward-grad left out: --loss chunked is not modelled for "
                           "forward-grad (its dual forward calls the model whole)")
    code, out, err = run_cli("fit", "opt-125m", "-m", "forward-grad", "--loss", "chunked")
    assert code == 2 and err.startswith("memplan: error: --loss chunked is not modelled for forward-grad")


def test_a_plan_run_with_every_method_leaves_out_the_same(run_cli, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("gpus: [h100-80gb]\nruns:\n  - {name: r, model: opt-125m, method: all, loss: chunked}\n")
    code, out, err = run_cli("check", str(plan), "--json")
    methods = {r["method"] for r in json.loads(out)["results"]}
    assert code == 0 and "forward-grad" not in methods and len(methods) == len(Method) - 1
    assert err.strip() == ("memplan: note: r: forward-grad left out: --loss chunked is not modelled for "
                           "forward-grad (its dual forward calls the model whole)")
    plan.write_text("gpus: [h100-80gb]\nruns:\n  - {name: r, model: opt-125m, method: forward-grad, loss: chunked}\n")
    assert run_cli("check", str(plan))[0] == 2
