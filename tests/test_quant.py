"""--quant: bitsandbytes base weights (transformers' BitsAndBytesConfig layout, peft's
prepare_model_for_kbit_training), analytic against the real and the fake model.

Weight bytes are exact on tiny shapes: every quantised weight (4-bit packed two per byte, absmax
per 64, codes; int8 with its row statistics), every fp32 parameter prepare_model_for_kbit_training
leaves, and the adapters. The peaks are held against the recorded grid of
`calibration/quant_vs_trace.py` (median <= 1 %, worst <= 3 %) and a live re-trace of some of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memplan import analytic
from memplan.errors import MemplanError
from memplan.options import Config, Quant
from memplan.overhead import round_block
from memplan.spec import resolve
from tiny import TINY_LLAMA, TINY_OPT, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "calibration"))
import quant_vs_trace as grid  # noqa: E402

RECORDS = [json.loads(line) for line in grid.RECORDS.read_text().splitlines() if line.strip()]
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tiny")
    return {name: write(d, cfg, f"{name}.json") for name, cfg in
            (("llama", TINY_LLAMA), ("opt", TINY_OPT), ("gpt2", TINY_GPT2))}


@pytest.mark.parametrize("method", ["fo-adam", "zo-sgd", "forward-grad"])
def test_full_fine_tuning_of_quantised_weights_is_refused(method, tiny):
    cfg = Config(model=tiny["llama"], method=method, scheme="ft", quant="nf4")
    with pytest.raises(MemplanError, match="bitsandbytes weights are not trainable; use --scheme lora, prefix or prompt"):
        analytic.shapes(cfg, resolve(tiny["llama"]))


def test_cli_refuses_ft_in_one_line(run_cli):
    code, out, err = run_cli("fit", "llama-3.1-8b", "--scheme", "ft", "--quant", "nf4")
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "bitsandbytes weights are not trainable" in err


def test_unknown_quant_names_the_valid_ones(run_cli):
    code, _, err = run_cli("fit", "llama-3.1-8b", "--scheme", "lora", "--quant", "nf3")
    assert code == 2 and "valid: fp4, int8, nf4, nf4-dq, none" in err


def test_4bit_bytes_per_weight_follow_bitsandbytes():
    # A 4096 x 4096 weight: 8 MiB packed, 262,144 fp32 absmax (1 MiB), the 16-entry code (one 512 B block);
    # double quantisation: uint8 absmax (256 KiB), a 0-d offset, 1,024 fp32 second-level constants and
    # the 256-entry fp32 second-level code.
    from memplan.arch._common import Tensor

    t = Tensor("w", (4096, 4096), "q_proj", 0, "attention")
    from memplan import quant

    assert quant.tensor_bytes(Quant.NF4, t) == 8 * 2**20 + 2**20 + 512
    assert quant.tensor_bytes(Quant.FP4, t) == quant.tensor_bytes(Quant.NF4, t)
    assert quant.tensor_bytes(Quant.NF4_DQ, t) == 8 * 2**20 + 512 + 2**18 + 512 + 4096 + 1024
    assert quant.tensor_bytes(Quant.INT8, t) == 16 * 2**20 + 16384


def _device_bytes(model, cfg) -> int:
    """Every parameter, buffer and quantisation-state storage of a built model, each rounded to 512 B."""
    from memplan import quant

    seen = {}
    for t in [*model.parameters(), *model.buffers(), *quant.state_tensors(model)]:
        st = t.untyped_storage()
        seen[st._cdata] = round_block(st.nbytes())
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("q", ["nf4", "nf4-dq", "fp4", "int8"])
def test_weight_bytes_are_exact_on_the_real_and_the_fake_model(family, q, tiny):
    pytest.importorskip("bitsandbytes")
    from memplan._compat import fake_tensor_mode
    from memplan.build import build_model
    from memplan.tracing import fake_model

    cfg = Config(model=tiny[family], method="fo-adam", scheme="lora", dtype="bf16", quant=q,
                 lora_targets=("c_attn",) if family == "gpt2" else ())
    spec = resolve(tiny[family])
    expected = analytic.model_weight_bytes(cfg, spec, analytic.shapes(cfg, spec)) + analytic.trainable(cfg, spec).bytes
    assert _device_bytes(build_model(cfg), cfg) == expected
    assert _device_bytes(fake_model(cfg, fake_tensor_mode()()), cfg) == expected


def test_the_output_embedding_and_norms_stay_unquantised_in_fp32(tiny):
    pytest.importorskip("bitsandbytes")
    import torch
    import bitsandbytes as bnb
    from memplan.build import build_model

    model = build_model(Config(model=tiny["llama"], method="fo-adam", scheme="lora", dtype="bf16", quant="nf4"))
    base = model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert base.model.norm.weight.dtype == torch.float32
    layer = base.model.layers[0]
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    w = layer.mlp.down_proj.weight  # 64 x 128 packed two per byte, stored (n / 2, 1)
    assert w.dtype == torch.uint8 and tuple(w.shape) == (64 * 128 // 2, 1)
    assert w.quant_state.absmax.numel() == 64 * 128 // 64 and w.quant_state.dtype == torch.bfloat16
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("family,q,method,scheme", [
    ("llama", "nf4-dq", "fo-adam", "lora"), ("opt", "int8", "fo-sgd", "prefix"), ("gpt2", "fp4", "zo-sgd", "lora"),
])
def test_fake_trace_equals_the_real_step_to_the_byte(family, q, method, scheme, tiny):
    pytest.importorskip("bitsandbytes")
    from memplan.tracing import trace_step

    cfg = Config(model=tiny[family], method=method, scheme=scheme, dtype="fp16", quant=q, batch=2, seq=16,
                 lora_targets=("c_attn",) if family == "gpt2" and scheme == "lora" else ())
    fake, real = trace_step(cfg), trace_step(cfg, real=True)
    assert fake.peak.allocated == real.peak.allocated
    assert fake.peak.components == real.peak.components


def test_zo_on_a_quantised_base_perturbs_only_the_adapters(tiny):
    pytest.importorskip("bitsandbytes")
    from memplan.build import build_model, trainable

    model = build_model(Config(model=tiny["llama"], method="zo-sgd", scheme="lora", dtype="bf16", quant="nf4"))
    assert {n.split(".")[-2] for n, _ in trainable(model)} == {"default"}
    assert all("lora_" in n for n, _ in trainable(model))


def test_recorded_grid_meets_the_targets():
    assert {r["config"]["quant"] for r in RECORDS} == set(grid.QUANTS)
    assert {r["config"]["method"] for r in RECORDS} == {"fo-adam", "fo-sgd", "zo-sgd"}
    assert {r["config"]["model"] for r in RECORDS} == {"llama-gqa", "opt-125m"}
    assert {r["config"]["scheme"] for r in RECORDS} == {"lora", "prefix"}
    assert {(r["config"]["dtype"], r["config"]["attention"]) for r in RECORDS} >= {("fp16", "eager"), ("bf16", "sdpa")}
    assert {r["config"]["quant"] for r in RECORDS if r["config"]["grad_checkpointing"]} >= {"nf4", "int8"}
    median, worst = grid.summary(grid.recheck([dict(r) for r in RECORDS]))
    assert median <= grid.MEDIAN_TARGET, f"median {median:.2%}"
    assert worst <= grid.WORST_TARGET, f"worst {worst:.2%}"


@pytest.mark.parametrize("index", [1, 27, -1])
def test_recorded_traces_are_current(index, tmp_path):
    pytest.importorskip("bitsandbytes")
    rec = RECORDS[index]
    fresh = grid.run([tuple(rec["config"].values())], tmp_path / "r.jsonl")
    assert fresh[0]["trace_bytes"] == rec["trace_bytes"]


def test_a_4bit_base_is_suggested_for_adapters_that_do_not_fit(run_cli):
    code, out, err = run_cli("fit", "llama-3.1-8b", "-m", "fo-adam", "--scheme", "lora", "--dtype", "bf16",
                             "--batch", "1", "--seq", "512", "--gpu", "v100-16gb")
    assert "--quant nf4 (12.9 GiB)" in out + err


def test_plans_and_the_api_take_quant(tmp_path, run_cli):
    from memplan.api import estimate

    plain = estimate("llama-3.1-8b", "zo-sgd", scheme="lora", dtype="bf16", search=False)
    nf4 = estimate("llama-3.1-8b", "zo-sgd", scheme="lora", dtype="bf16", quant="nf4", search=False)
    assert nf4.config.quant is Quant.NF4 and nf4.peak_allocated_bytes < plain.peak_allocated_bytes
    plan = tmp_path / "plan.yaml"
    plan.write_text("gpus: [v100-16gb]\nruns:\n  - model: llama-3.1-8b\n    method: fo-adam\n    scheme: lora\n"
                    "    dtype: bf16\n    quant: nf4\n    batch: 1\n    seq: 512\n")
    code, out, _ = run_cli("check", str(plan))
    assert code == 0 and "fits" in out
    plan.write_text(plan.read_text().replace("scheme: lora", "scheme: ft"))
    code, out, err = run_cli("check", str(plan))
    assert code != 0 and "bitsandbytes weights are not trainable" in out + err


def test_gemm_4bit_scratch_is_the_dequantised_weight():
    # 64 rows x a (4096, 1024) weight in bf16: 8 MiB; nested adds its fp32 absmax twice (2 x 64 KiB).
    class Op:
        def name(self):
            return "bitsandbytes::gemm_4bit"

    class A:
        shape = (2, 32, 1024)

        def numel(self):
            return 2 * 32 * 1024

        def element_size(self):
            return 2

    class Absmax:
        def numel(self):
            return 4096 * 1024 // 64

    from memplan import quant

    assert quant.gemm_4bit_scratch(Op(), (A(), None, [4096, 1024], None, 64, "nf4"), {}) == 8 * 2**20
    assert quant.gemm_4bit_scratch(Op(), (A(), None, [4096, 1024], None, 64, "nf4"), {"absmax_8bit": Absmax()}) \
        == 8 * 2**20 + 2 * 2**18


def test_a_layer_in_flight_sets_the_forward_peak_when_the_vocabulary_is_small(tmp_path):
    # vocab 384, intermediate 2048: the last down_proj (its weight dequantised, 2 MiB, its input, cast and
    # output) outweighs the logits; the analytic forward moment holds it within 2 %.
    pytest.importorskip("bitsandbytes")
    from memplan.pipeline import family_of
    from memplan.result import Category, Phase
    from memplan.tracing import trace_step

    path = write(tmp_path, {**grid.LLAMA_GQA, "vocab_size": 384, "intermediate_size": 2048, "num_hidden_layers": 2})
    cfg = Config(model=path, method="fo-adam", scheme="lora", dtype="bf16", quant="nf4", batch=1, seq=64)
    traced = trace_step(cfg).peak
    assert traced.phase is Phase.FORWARD and traced.op == "gemm_4bit.default"
    moment = analytic.phases(cfg, resolve(path), family_of(None)[0])[Phase.FORWARD]
    forward = sum(moment.values()) - moment.get(Category.WORKSPACE, 0)
    assert forward == pytest.approx(traced.phases[Phase.FORWARD], rel=0.02)


def test_trace_without_bitsandbytes_says_what_to_install(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    code, _, err = run_cli("trace", "opt-125m", "--scheme", "lora", "--quant", "nf4")
    assert code == 2 and err.strip() == "memplan: error: --quant nf4 needs the bitsandbytes package (pip install bitsandbytes)"
