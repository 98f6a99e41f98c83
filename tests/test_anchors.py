"""The analytic estimator against published measurements (../shared/anchors/public.json).

ZO-Bench's sequence-length figure: OPT-13B, batch 2, full fine-tuning, transformers 4.28 (eager
attention, KV cache kept), `max_memory_allocated`. Tolerance: 5 % per point, as the values were
read exactly from the vector figure but some conditions are inferred (amp-fp16 for FO-SGD, one
device). Our largest FO-SGD gap is -4.5 % at seq 1472, our largest ZO-SGD gap +0.4 %. The FO
gap grows with the sequence; one candidate: at 97 GiB and more, ZO-Bench ran FO on several GPUs and
logs the sum of each device's own peak, which is at least the peak of the sum that memplan models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.api import estimate
from memplan.result import GIB
from memplan.spec import resolve

ANCHORS = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "public.json"
if not ANCHORS.is_file():  # a copy kept with the tests, for clones without ../shared
    ANCHORS = Path(__file__).with_name("data") / "anchors-public.json"
CURVE = json.loads(ANCHORS.read_text())["zo_bench_seq_len_curve"]
TOLERANCE = 0.05


def _peak_gib(method: str, dtype: str, seq: int) -> float:
    est = estimate("facebook/opt-13b", method, dtype=dtype, batch=CURVE["batch"], seq=seq,
                   attention=CURVE["attention"], hf_version="4.28", search=False)
    return est.peak_allocated_bytes / GIB


@pytest.mark.parametrize("seq,measured", list(zip(CURVE["seq"], CURVE["zo-sgd fp16"])))
def test_zo_bench_zo_sgd_curve(seq, measured):
    assert _peak_gib("zo-sgd", "fp16", seq) == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize("seq,measured", list(zip(CURVE["seq"], CURVE["fo-sgd amp-fp16"])))
def test_zo_bench_fo_sgd_curve(seq, measured):
    assert _peak_gib("fo-sgd", "amp-fp16", seq) == pytest.approx(measured, rel=TOLERANCE)


def test_zo_sgd_flat_then_grows_where_the_figure_bends():
    # The figure is flat (perturbation-bound) up to 608 and grows from 704 (forward-bound).
    assert _peak_gib("zo-sgd", "fp16", 32) == _peak_gib("zo-sgd", "fp16", 608)
    assert _peak_gib("zo-sgd", "fp16", 800) > _peak_gib("zo-sgd", "fp16", 608)


# ZO-Bench's theoretical table, where its assumptions hold: |x| = parameters in fp32, a half-
# precision copy is |x|/2, and activations are negligible (batch 1, seq 32).
X = resolve("opt-13b").param_count * 4


def _short(method: str, dtype: str, **kw) -> int:
    return estimate("opt-13b", method, dtype=dtype, batch=1, seq=32, search=False, **kw).peak_allocated_bytes


@pytest.mark.parametrize("method,dtype,multiple", [
    ("zo-sgd", "fp16", 0.5),  # 1/2|x| + max_l 1/2|x_l|
    ("zo-sgd-mmt", "fp16", 1.0),  # |x| + max_l 1/2|x_l|
    ("zo-adam", "fp16", 1.5),  # 3/2|x| + max_l 1/2|x_l|
    ("fo-sgd", "amp-fp16", 2.0),  # |x| + max{1/2|a| + 1/2|x|, |x|} -> 2|x| at short seq
    ("forward-grad", "fp32", 2.0),  # |x| + |x| + max_l |a_l|
])
def test_zo_bench_theory_table(method, dtype, multiple):
    # Our peak adds what the formula leaves out (a few temporaries of the largest tensor, logits,
    # workspace): at most 5 % above the formula, never below it.
    peak = _short(method, dtype, perturbation="inplace")
    assert multiple * X <= peak <= multiple * X * 1.05
