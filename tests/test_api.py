"""The Python API: one exception type, `memplan.MemplanError`, one line, for every bad argument."""

from __future__ import annotations

import pytest

import memplan
from memplan.errors import MemplanError


def test_memplan_error_is_exported():
    assert memplan.MemplanError is MemplanError and "MemplanError" in memplan.__all__


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=0), "batch must be a positive integer, got 0"),
    (dict(batch=-3), "batch must be a positive integer, got -3"),
    (dict(batch=1.5), "batch must be a positive integer, got 1.5"),
    (dict(batch=None), "batch must be a positive integer, got None"),
    (dict(batch=True), "batch must be a positive integer, got True"),  # A4: a bool is not a size
    (dict(seq=False), "seq must be a positive integer, got False"),
    (dict(lora_rank=0), "lora_rank must be a positive integer, got 0"),
    (dict(momentum=1.0), "momentum must be < 1.0, got 1.0"),
    (dict(lora_targets="q_proj"), "lora_targets must be a list of module names"),
    (dict(bacth=4), "unknown option 'bacth' \\(did you mean batch\\?\\)"),
    (dict(dtype="fp8"), "unknown dtype 'fp8'; valid: amp-bf16"),
    (dict(gpu=123), "gpu: a GPU name .* or 'auto', got 123"),  # A2: was AttributeError
    (dict(gpu="h1000"), "unknown GPU 'h1000'"),
])
def test_every_bad_argument_raises_memplan_error(kwargs, message):
    with pytest.raises(memplan.MemplanError, match=message) as info:
        memplan.estimate("opt-125m", "zo-sgd", **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model, message", [(None, "model must be a string, got None"),
                                            (123, "model must be a string, got 123"),
                                            ("opt-14b", "unknown model 'opt-14b'")])
def test_bad_model(model, message):
    with pytest.raises(memplan.MemplanError, match=message):
        memplan.estimate(model)


def test_all_is_not_one_method_but_estimate_all_takes_it():
    """A3: `all` is accepted where a list comes back."""
    with pytest.raises(memplan.MemplanError, match="'all' is not one method; use memplan.estimate_all"):
        memplan.estimate("opt-125m", "all")
    ests = memplan.estimate_all("opt-125m", "all", gpu="h100", batch=2)
    assert [e.method for e in ests] == list(memplan.Method)
    assert ests[0].peak_device_bytes == memplan.estimate("opt-125m", "fo-sgd", gpu="h100", batch=2).peak_device_bytes
    assert [e.method.value for e in memplan.estimate_all("opt-125m", ["zo-sgd,fo-adam", "zo-sgd"])] == [
        "zo-sgd", "fo-adam"]
    with pytest.raises(memplan.MemplanError, match="names no method"):
        memplan.estimate_all("opt-125m", [])


def test_a_valid_call_still_gives_the_same_numbers():
    est = memplan.estimate("opt-13b", "fo-adam", batch=16, gpu="h100-80gb")
    again = memplan.estimate_config(memplan.Config(model="opt-13b", method="fo-adam", batch=16),
                                    memplan.api.resolve_gpu("h100-80gb"))
    assert est.model_dump() == again.model_dump()
    assert est.config.batch == 16 and est.fits is False and est.max_batch == 0
