"""LoRA options that change memory: --lora-dropout.

peft wraps each adapter's input in `nn.Dropout(p)` when p > 0 (`nn.Identity` at 0). In training
mode dropout saves a bool mask (1 byte per element on CUDA; the tracker counts the CPU's noise
tensor so) when its input needs a gradient, and lora_A saves the dropped-out fp32 copy in place of
the fp32 cast of x it saves at p = 0 (under autocast: its 16-bit cast of that copy, as before).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memplan.api import estimate_config
from memplan.options import Config
from memplan.result import Category, Phase
from memplan.tracing import trace_step
from tiny import TINY_OPT, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "calibration"))
import analytic_vs_trace as grid  # noqa: E402


def _analytic(cfg: Config) -> int:
    est = estimate_config(cfg, search=False)
    return est.peak_allocated_bytes - est.components[Category.WORKSPACE]


@pytest.fixture(scope="module")
def llama_gqa(tmp_path_factory) -> str:
    return write(tmp_path_factory.mktemp("llama"), grid.LLAMA_GQA)


@pytest.mark.parametrize("dtype,extra", [
    # T = 2 x 32 = 64 tokens, h = 64, targets q_proj and v_proj, 2 layers. Layer 0's input comes from
    # the frozen embeddings and needs no gradient, so only layer 1 saves masks: 2 x 64 x 64 x 1 B.
    # The fp32 dropped-out copy (64 x 64 x 4 B per target) replaces the fp32 cast of x saved at p = 0.
    ("fp16", 2 * 64 * 64),
    # Under autocast lora_A saves its 16-bit cast of the dropped-out copy instead of x's: masks only.
    ("amp-bf16", 2 * 64 * 64),
    # fp32: at p = 0 the targets share x itself (64 x 64 x 4 B per layer); with dropout each target
    # saves its own copy: per layer 2 x 64 x 64 x 4 - 64 x 64 x 4 = 16384 more, plus layer 1's masks.
    ("fp32", 2 * 16384 + 2 * 64 * 64),
])
def test_dropout_saves_a_mask_and_a_copy_per_target(tmp_path, dtype, extra):
    opt = write(tmp_path, TINY_OPT)
    base = Config(model=opt, method="fo-sgd", scheme="lora", dtype=dtype, attention="sdpa", batch=2, seq=32)
    drop = base.replace(lora_dropout=0.1)
    t0, t1 = trace_step(base).peak, trace_step(drop).peak
    assert t0.phase is t1.phase is Phase.BACKWARD
    assert t1.allocated - t0.allocated == extra
    assert t1.components[Category.ACTIVATIONS] - t0.components[Category.ACTIVATIONS] == extra
    assert _analytic(drop) - _analytic(base) == extra


SAMPLE = [
    ("opt-125m", "fo-adam", "fp16", ()),
    ("opt-125m", "fo-sgd", "bf16", ()),
    ("opt-125m", "fo-adam", "amp-bf16", ()),
    ("llama-gqa", "fo-adam", "bf16", ()),
    ("llama-gqa", "fo-sgd", "fp16", ()),
    ("llama-gqa", "fo-sgd", "amp-bf16", ()),
]


@pytest.mark.parametrize("model,method,dtype,targets", SAMPLE)
def test_dropout_analytic_within_1_percent_of_trace(llama_gqa, model, method, dtype, targets):
    cfg = Config(model=llama_gqa if model == "llama-gqa" else model, method=method, scheme="lora", dtype=dtype,
                 attention="sdpa", batch=8, seq=128, lora_dropout=0.1, lora_targets=targets)
    traced = trace_step(cfg).peak.allocated
    assert abs(_analytic(cfg) - traced) / traced <= 0.01


def test_dropout_in_a_no_grad_forward_is_a_transient_only():
    # ZO forwards run in train mode, so dropout runs, but under no_grad nothing is saved: the mask and
    # the copy die with each adapter call, below the forward's peak (the logits).
    base = Config(model="opt-125m", method="zo-sgd", scheme="lora", dtype="fp16", attention="sdpa", batch=8, seq=128)
    drop = base.replace(lora_dropout=0.1)
    assert trace_step(drop).peak.allocated == trace_step(base).peak.allocated
    assert _analytic(drop) == _analytic(base)


def test_dropout_fake_equals_real_to_the_byte(tmp_path):
    c = Config(model=write(tmp_path, TINY_OPT), method="fo-adam", scheme="lora", dtype="fp32", attention="sdpa",
               batch=2, seq=32, lora_dropout=0.1)
    fake, real = trace_step(c), trace_step(c, real=True)
    assert fake.peak.allocated == real.peak.allocated
    assert fake.peak.components == real.peak.components


def test_default_dropout_changes_no_number(llama_gqa):
    # The recorded grid's LoRA rows were traced before the option existed (the real step had
    # lora_dropout=0.0 hard-coded): tracing and estimating them at the default gives the same bytes.
    rec = next(r for r in map(json.loads, grid.RECORDS.read_text().splitlines())
               if r["config"]["scheme"] == "lora" and r["config"]["model"] == "opt-125m")
    c = rec["config"]
    cfg = Config(**c)
    assert cfg.lora_dropout == 0.0
    assert trace_step(cfg).peak.allocated == rec["trace_bytes"]
    assert _analytic(cfg) == _analytic(cfg.replace(lora_dropout=0.0))


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1"])
def test_bad_dropout_one_line_exit_2(run_cli, value):
    code, out, err = run_cli("fit", "opt-125m", "--scheme", "lora", "--lora-dropout", value)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("memplan: error:") and "--lora-dropout" in err
