"""--optim, --activation-offload, --optimizer-in-backward, --grad-accum: formulas on tiny shapes,
the analytic tier against the trace of the real step, refusals, and where they show (table, plans).

The model: a Llama of hidden 128 and intermediate 1024, so its MLP matrices (131072 elements) are
past bitsandbytes' 8-bit (4096) and paging (1e5) thresholds, and its attention matrices are not.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memplan import savers
from memplan.cli import app
from memplan.errors import MemplanError
from memplan.options import Config, Optim
from memplan.pipeline import estimate_config
from memplan.result import Category, Phase
from tests.tiny import TINY_LLAMA, TINY_OPT

LLAMA = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 1024}
OPT = {**TINY_OPT, "hidden_size": 128, "ffn_dim": 1024, "word_embed_proj_dim": 128}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("savers")
    out = {}
    for name, cfg in (("llama", LLAMA), ("opt", OPT)):
        (d / f"{name}.json").write_text(json.dumps(cfg))
        out[name] = str(d / f"{name}.json")
    return out


def _cfg(models, fam="llama", **kw) -> Config:
    return Config.make(model=models[fam], **{"method": "fo-adam", "dtype": "bf16", "batch": 1, "seq": 8, **kw})


# ---- formulas on tiny shapes ------------------------------------------------------------------


def test_adam8bit_state_of_one_tensor():
    # 4096 elements: two uint8 states of 4096 B, two fp32 absmax of 16 blocks (64 B -> 512 B).
    assert savers.adam8bit_state_bytes(4096) == 2 * 4096 + 2 * 512
    # 4095 elements stay 32-bit: two fp32 states of 16380 B, rounded to 16384.
    assert savers.adam8bit_state_bytes(4095) == 2 * 16384
    # 131072 elements: 2 * 131072 + 2 * round512(4 * 512 blocks = 2048).
    assert savers.adam8bit_state_bytes(131072) == 2 * 131072 + 2 * 2048


def test_paged_state_goes_to_the_host_from_1e5_elements():
    assert savers.paged_state_host_bytes(99_999) == 0
    assert savers.paged_state_host_bytes(131072) == 2 * 131072


def test_adafactor_state_is_factored():
    # (1024, 128): fp32 rows 1024 * 4 = 4096, columns 128 * 4 = 512, and the 0-d RMS (512).
    assert savers.adafactor_state_bytes((1024, 128)) == 4096 + 512 + 512
    # a vector keeps a whole fp32 second moment: 128 * 4 -> 512, plus RMS.
    assert savers.adafactor_state_bytes((128,)) == 512 + 512


def test_loop_temporaries_keep_the_previous_tensors_last_one():
    # sizes 100, 300, 200 (already rounded), k = 2: max(0 + 200, 100 + 600, 300 + 400) = 700.
    assert savers.loop_temporaries((100, 300, 200), 2) == 700


def test_effective_batch():
    cfg = Config(model="x", batch=2, grad_accum=8)
    assert savers.effective_batch(cfg) == 16


# ---- the analytic tier against the trace of the real step --------------------------------------


def _both(cfg):
    return estimate_config(cfg, search=False), estimate_config(cfg, search=False, tier="trace")


@pytest.mark.parametrize("optim", ["loop", "fused", "adafactor"])
def test_optimizer_step_bytes_match_the_trace(models, optim):
    # batch 1 x seq 8: the step's temporaries decide its phase. The trace also holds the batch's
    # input_ids and labels (two 512 B blocks), which the formulas leave out.
    an, tr = _both(_cfg(models, optim=optim))
    assert tr.phases[Phase.OPTIMIZER_STEP] - an.phases[Phase.OPTIMIZER_STEP] == 1024


@pytest.mark.parametrize("optim", ["8bit", "paged-8bit"])
def test_bitsandbytes_state_matches_the_trace(models, optim):
    pytest.importorskip("bitsandbytes")
    an, tr = _both(_cfg(models, optim=optim))
    assert an.components[Category.OPTIMIZER_STATE] == tr.components[Category.OPTIMIZER_STATE]
    assert an.host_bytes == tr.host_bytes
    # paged: the six MLP matrices of 131072 elements keep 2 x 131072 B each in unified memory.
    assert an.host_bytes == (6 * 2 * 131072 if optim == "paged-8bit" else 0)


@pytest.mark.parametrize("fam,optim", [("llama", "foreach"), ("opt", "foreach"), ("llama", "adafactor")])
def test_optimizer_in_backward_matches_the_trace(models, fam, optim):
    an, tr = _both(_cfg(models, fam, optim=optim, optimizer_in_backward=True))
    assert an.peak_phase is tr.peak_phase is Phase.BACKWARD
    assert an.peak_allocated_bytes == pytest.approx(tr.peak_allocated_bytes, rel=0.002)
    plain = estimate_config(_cfg(models, fam, optim=optim), search=False)
    assert an.peak_allocated_bytes < plain.peak_allocated_bytes  # no gradient outlives its step


def test_activation_offload_against_the_trace(models):
    # The GPU side within 3.5 %, the host side within 7 % (the final norm's and the embedding's
    # saved tensors go to the host too; the formula counts the layers').
    cfg = _cfg(models, batch=4, seq=64, activation_offload=True)
    an, tr = _both(cfg)
    assert an.peak_allocated_bytes == pytest.approx(tr.peak_allocated_bytes, rel=0.035)
    assert an.host_bytes == pytest.approx(tr.host_bytes, rel=0.07)
    assert 0 < an.host_bytes
    plain = estimate_config(_cfg(models, batch=4, seq=64), search=False)
    assert plain.host_bytes == 0


def test_grad_accum_keeps_the_micro_batch_peak(models):
    one = estimate_config(_cfg(models), search=False)
    four = estimate_config(_cfg(models, grad_accum=4), search=False)
    assert four.peak_device_bytes == one.peak_device_bytes
    assert four.config.grad_accum == 4


# ---- the option's spelling, refusals --------------------------------------------------------------


def test_foreach_is_a_deprecated_alias_of_optim():
    assert Config.make(model="x", foreach=False).optim is Optim.LOOP
    assert Config.make(model="x", foreach=True).optim is Optim.FOREACH
    with pytest.raises(MemplanError, match="give optim alone"):
        Config.make(model="x", foreach=True, optim="8bit")


@pytest.mark.parametrize("kw,match", [
    ({"method": "fo-sgd", "optim": "8bit"}, "fo-sgd takes foreach, fused or loop"),
    ({"method": "zo-sgd", "optim": "adafactor"}, "fo-adam only"),
    ({"method": "zo-adam", "optim": "fused"}, "takes foreach or loop"),
    ({"method": "zo-sgd", "activation_offload": True}, "first-order methods only"),
    ({"method": "forward-grad", "optimizer_in_backward": True}, "first-order methods only"),
    ({"method": "fo-adam", "optimizer_in_backward": True, "grad_accum": 2}, "cannot accumulate"),
])
def test_refusals(models, kw, match):
    with pytest.raises(MemplanError, match=match):
        estimate_config(_cfg(models, **kw), search=False)


def test_cli_refuses_in_one_line(models):
    r = CliRunner().invoke(app, ["fit", models["llama"], "--method", "fo-sgd", "--optim", "8bit"])
    assert r.exit_code == 2
    assert "memplan: error:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["fit", models["llama"], "--method", "fo-adam", "--optim", "9bit"])
    assert r.exit_code == 2 and "foreach" in r.output


def test_cli_shows_host_memory_and_the_effective_batch():
    r = CliRunner().invoke(app, ["fit", "llama-3.1-8b", "--method", "fo-adam", "--dtype", "bf16",
                                 "--optim", "paged-8bit", "--grad-accum", "4", "--batch", "2"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "host" in r.output and "effective batch 8" in r.output
    r = CliRunner().invoke(app, ["fit", "llama-3.1-8b", "--method", "fo-adam", "--json", "--optim", "paged-8bit"])
    est = json.loads(r.output)["estimates"][0]
    assert est["host_bytes"] > 0 and est["config"]["optim"] == "paged-8bit"


def test_suggestions_name_the_savers_and_what_each_saves():
    from memplan import hardware
    from memplan.api import estimate
    from memplan.spec import resolve
    from memplan.suggest import savings, suggestions

    est = estimate("llama-3.1-8b", "fo-adam", dtype="bf16", batch=2, seq=2048, gpu="rtx-4090")
    found = dict((f.flag, n) for f, n in savings(est, resolve("llama-3.1-8b")))
    assert "--loss chunked" in found and "--optim 8bit" in found
    # Here backward peaks as it starts, before any gradient: stepping in backward saves nothing. With a
    # short sequence the optimizer step holds the peak, and it saves the gradients (and temporaries).
    assert "--optimizer-in-backward" not in found
    short = estimate("llama-3.1-8b", "fo-adam", dtype="bf16", batch=1, seq=128, gpu="rtx-4090")
    found = dict((f.flag, n) for f, n in savings(short, resolve("llama-3.1-8b")))
    assert found["--optimizer-in-backward"] >= short.trainable_params * 2  # at least the bf16 gradients
    lines = suggestions(est, resolve("llama-3.1-8b"), hardware.get_gpu("rtx-4090"))
    assert any("`--optim 8bit` saves" in line for line in lines)


def test_check_explains_the_effective_batch():
    from memplan import plan

    pf = plan.parse("gpus: [rtx-4090]\nruns:\n  - model: llama-3.1-8b\n    method: fo-adam\n    dtype: bf16\n"
                    "    batch: 2\n    seq: 2048\n    grad_accum: 8\n    optim: paged-8bit\n")
    (result,) = plan.check(pf)
    assert "effective batch 16 = batch 2 x grad_accum 8 x 1 GPU" in result.summary()
    assert result.to_json_dict()["effective_batch"] == 16
    assert result.estimate.host_bytes > 0


def test_readme_numbers_are_the_codes():
    # The README quotes these estimates; they must be what the code gives.
    from pathlib import Path

    from memplan.api import estimate

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()

    def peak(**kw) -> str:
        est = estimate("llama-3.1-8b", "fo-adam", dtype="bf16", search=False, **kw)
        return f"{est.peak_device_bytes / 2**30:.2f}"

    short = {"batch": 1, "seq": 512}
    for optim in ("foreach", "fused", "loop", "8bit", "paged-8bit", "adafactor"):
        assert peak(**short, optim=optim) in readme, optim
    assert peak(**short, optimizer_in_backward=True) in readme
    assert peak(**short, optimizer_in_backward=True, optim="8bit") in readme
    lora = {"scheme": "lora", "batch": 4, "seq": 2048}
    assert peak(**lora) in readme and peak(**lora, activation_offload=True) in readme
    assert peak(batch=2, seq=2048, grad_accum=8) == peak(batch=2, seq=2048) and peak(batch=2, seq=2048) in readme


@pytest.mark.parametrize("kw", [{"optim": "loop"}, {"optim": "fused"}, {"optim": "adafactor"}, {"optim": "8bit"},
                                {"optim": "paged-8bit"}, {"activation_offload": True},
                                {"optimizer_in_backward": True}], ids=lambda kw: next(f"{k}={v}" for k, v in kw.items()))
def test_fake_tensors_count_what_real_ones_do(models, kw):
    from memplan.tracing import trace_step

    if "8bit" in str(kw.get("optim")):
        pytest.importorskip("bitsandbytes")
    cfg = _cfg(models, batch=2, seq=16, **kw)
    fake, real = trace_step(cfg).peak, trace_step(cfg, real=True).peak
    # bitsandbytes builds its two 1 KiB quantisation maps in its constructor on the host; CUDA copies
    # them to the device in the first step, which is where the fake-tensor step makes them.
    maps = 2048 if "8bit" in str(kw.get("optim")) else 0
    assert fake.allocated == real.allocated + maps
    assert fake.host_bytes == real.host_bytes


def test_paged_state_note_says_the_gpu_share():
    from memplan.api import estimate

    est = estimate("llama-3.1-8b", "fo-adam", dtype="bf16", optim="paged-8bit", search=False)
    # The largest paged tensor is the 128256 x 4096 embedding: two uint8 states, 2 * 525336576 B.
    assert any("unified memory" in w and f"{2 * 525336576 / 2**20:.1f} MiB" in w for w in est.warnings)
    assert not estimate("llama-3.1-8b", "fo-adam", dtype="bf16", optim="8bit", search=False).warnings
