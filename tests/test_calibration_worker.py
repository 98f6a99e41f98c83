"""The CPU meter's arithmetic and the worker on every method (in-process; tiny OPT)."""

import pytest

torch = pytest.importorskip("torch")

from memplan.calibration.meter import CpuMeter  # noqa: E402
from memplan.calibration.worker import run_job  # noqa: E402
from memplan.result import Phase  # noqa: E402

from calib_records import TINY  # noqa: E402

CPU = {"device": "cpu", "warmup_steps": 1, "measured_steps": 1, "seed": 0, "cpu_cap_bytes": None}


def test_cpu_meter_counts_live_storage_in_512_byte_blocks():
    with CpuMeter() as m:
        a = torch.empty(1000)  # 4000 B -> 4096 (8 blocks of 512)
        assert m.allocated_bytes() == 4096
        b = torch.empty(10)  # 40 B -> 512
        v = a.view(10, 100)  # a view shares the storage: nothing new
        assert m.allocated_bytes() == 4096 + 512
        del a, v
        assert m.allocated_bytes() == 512
        m.on_phase(Phase.FORWARD)
        c = torch.empty(2000)  # 8000 B -> 8192
        r = m.readings()
        del b, c
    assert r["peak_allocated_bytes"] == 512 + 8192  # the first peak, 4608, is lower
    assert r["phases"] == {"load": 4608, "forward": 8704}
    assert r["peak_reserved_bytes"] is None and r["peak_device_bytes"] is None


def test_cpu_meter_reset_forgets_earlier_peaks():
    with CpuMeter() as m:
        a = torch.empty(1024)  # 4096
        del a
        m.reset_peak()
        b = torch.empty(128)  # 512
        assert m.readings()["peak_allocated_bytes"] == 512
        del b


def test_cpu_meter_cap_raises_cuda_like_out_of_memory():
    with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory: 4096 live bytes exceed the cap of 4000"):
        with CpuMeter(cap_bytes=4000):
            torch.empty(1000)


@pytest.mark.parametrize("method, scheme, dtype, extra, phases", [
    ("zo-sgd-mmt", "ft", "fp32", {}, {"load", "perturb", "forward", "optimizer_step"}),
    ("zo-sgd-cons", "ft", "bf16", {"perturbation": "inplace"}, {"load", "perturb", "forward", "optimizer_step"}),
    ("zo-sgd-sign", "lora", "fp32", {}, {"load", "perturb", "forward", "optimizer_step"}),
    ("zo-adam", "ft", "amp-bf16", {}, {"load", "perturb", "forward", "optimizer_step"}),
    ("fo-sgd", "ft", "bf16", {"momentum": 0.9, "attention": "eager"}, {"load", "forward", "backward", "optimizer_step"}),
    ("forward-grad", "lora", "fp32", {"attention": "sdpa"}, {"load", "forward", "optimizer_step"}),
])
def test_worker_measures_every_method(method, scheme, dtype, extra, phases):
    cfg = {"model": "tiny-opt", "method": method, "scheme": scheme, "dtype": dtype, "batch": 2, "seq": 16, **extra}
    rec = run_job({"config": cfg, "model_config": TINY}, CPU)
    assert rec["status"] == "ok", rec.get("traceback")
    assert set(rec["phases"]) == phases
    assert rec["peak_allocated_bytes"] == max(rec["phases"].values()) == rec["phases"][rec["peak_phase"]]
    assert rec["meter"] == "cpu-live-bytes" and rec["env"]["family"] == "cpu"
    assert rec["trainable_params"] < rec["total_params"] if scheme == "lora" else True


def test_zo_sgd_measured_matches_the_analytic_tensor_model():
    """MeZO ZO-SGD on the CPU meter against the analytic allocated view with no workspace (CPU)."""
    from memplan.calibration.report import CPU_FAMILY
    from memplan.analytic import peak
    from memplan.options import Config
    from memplan.spec import spec_from_config

    cfg = Config(model="tiny-opt", method="zo-sgd", dtype="fp32", batch=2, seq=16)
    rec = run_job({"config": cfg.model_dump(mode="json"), "model_config": TINY}, CPU)
    _, comps, _ = peak(cfg, spec_from_config(TINY, "tiny-opt"), CPU_FAMILY)
    assert abs(sum(comps.values()) - rec["peak_allocated_bytes"]) <= 0.02 * rec["peak_allocated_bytes"]


def test_out_of_memory_is_a_record_not_a_crash():
    rec = run_job({"config": {"model": "tiny-opt", "method": "fo-adam", "dtype": "fp32", "batch": 64, "seq": 16},
                   "model_config": TINY}, {**CPU, "cpu_cap_bytes": 2_000_000})
    assert rec["status"] == "oom" and rec["oom_phase"] in {"load", "forward", "backward", "optimizer_step"}
    assert "peak_allocated_bytes" not in rec and rec["reached_allocated_bytes"] > 2_000_000


@pytest.mark.parametrize("method", ["fo-adam", "forward-grad", "zo-sgd-cons"])
def test_worker_runs_the_shared_steps(method):
    """The worker measures the same step code the tracer follows."""
    rec = run_job({"config": {"model": "tiny-opt", "method": method, "dtype": "fp32", "batch": 2, "seq": 16},
                   "model_config": TINY}, CPU)
    assert rec["status"] == "ok", rec.get("traceback")
    assert rec["steps_impl"] == "memplan.steps"
