"""The architecture registry: every registered family against transformers and the tracer.

Adding a family is one module in memplan/arch plus a tiny config here; these tests then hold its
tensor list against the meta-device model transformers builds, and its analytic estimate against a
trace of the real step.
"""

from __future__ import annotations

import dataclasses

import pytest

from memplan import analytic, arch
from memplan.api import estimate_config
from memplan.errors import MemplanError
from memplan.hardware import family
from memplan.options import Config
from memplan.result import Category
from memplan.spec import spec_from_config
from tiny import write

# One tiny config per registered model_type (2 layers, hidden 64), dropout off so that the trace's
# CPU kernels and CUDA's agree on what attention keeps.
TINY = {
    "opt": {"model_type": "opt", "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "ffn_dim": 128, "max_position_embeddings": 64, "dropout": 0.0},
    "llama": {"model_type": "llama", "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "max_position_embeddings": 64},
    "mistral": {"model_type": "mistral", "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                "max_position_embeddings": 64},
    "qwen2": {"model_type": "qwen2", "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "max_position_embeddings": 64, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "vocab_size": 2048, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.0, "attn_pdrop": 0.0, "embd_pdrop": 0.0},
    "roberta": {"model_type": "roberta", "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 80,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}
# Analytic against trace on the tiny configs; the recorded grid (calibration/) holds larger models
# to 5 % worst case, and these tiny ones, where the 512 B rounding of small tensors weighs more, to:
TOLERANCE = 0.05
# Hand-written families; the table-driven ones (approximate activations) are held to the trace in test_generic.
TYPES = sorted(t for t, a in arch.ARCHS.items() if not a.activations_note)


def test_every_registered_family_has_a_tiny_config():
    assert set(TINY) == set(TYPES)


@pytest.mark.parametrize("model_type", TYPES)
def test_tensors_match_transformers(model_type, transformers_shapes):
    spec = spec_from_config(TINY[model_type], model_type)
    assert {t.name: t.shape for t in spec.tensors} == transformers_shapes(TINY[model_type])


@pytest.mark.parametrize("method", ["fo-adam", "zo-sgd"])
@pytest.mark.parametrize("model_type", TYPES)
def test_analytic_within_tolerance_of_trace(model_type, method, tmp_path):
    from memplan.tracing import trace_step

    cfg = Config(model=write(tmp_path, TINY[model_type]), method=method, dtype="fp32", attention="eager",
                 batch=4, seq=32)
    est = estimate_config(cfg, search=False)
    analytic_bytes = est.peak_allocated_bytes - est.components[Category.WORKSPACE]
    traced = trace_step(cfg).peak.allocated
    assert abs(analytic_bytes - traced) <= TOLERANCE * traced, (analytic_bytes, traced)


def test_register_rejects_a_duplicate_model_type():
    with pytest.raises(ValueError, match="duplicate architecture registration for model_type llama"):
        arch.register(dataclasses.replace(arch.get("opt"), model_types=("llama", "new-type")))
    assert "new-type" not in arch.ARCHS


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(MemplanError, match=r"model_type 'mamba' is not supported; supported: bert, bloom, .*gemma2, "
                                           r".*qwen3_moe, roberta"):
        arch.get("mamba")


def test_activations_sum_over_a_list_of_layers(monkeypatch):
    # A family whose second layer keeps twice what its first keeps: the sum over the list of layers,
    # not L times one layer, reaches the activations.
    opt = arch.get("opt")

    def saved(kind, ctx):
        tokens, scores = opt.saved(kind, ctx)
        return (2 * tokens, 2 * scores) if kind == "wide" else (tokens, scores)

    alternating = dataclasses.replace(opt, model_types=("opt-alternating",),
                                      layers=lambda s: ("dense", "wide") * (s.num_layers // 2), saved=saved)
    monkeypatch.setitem(arch.ARCHS, "opt-alternating", alternating)
    uniform = spec_from_config(TINY["opt"], "tiny")
    mixed = dataclasses.replace(uniform, name="tiny-alt", model_type="opt-alternating")
    cfg = Config(model="tiny", method="fo-sgd", dtype="fp32", attention="eager", batch=4, seq=32)
    fam = family("default")
    act = analytic.phases(cfg, uniform, fam)[analytic.Phase.FORWARD][Category.ACTIVATIONS]
    act_mixed = analytic.phases(cfg, mixed, fam)[analytic.Phase.FORWARD][Category.ACTIVATIONS]
    # two layers: one as before and one twice as large, so 3/2 of the uniform model's
    assert act_mixed * 2 == act * 3


def test_opt_under_transformers_4_28_is_an_override_of_the_family():
    opt = arch.get("opt")
    old = opt.at(Config.model_fields["hf_version"].annotation.parse("4.28"))
    assert old is not opt and old.kv_cache_by_default and old.saved is not opt.saved
    assert opt.at(Config.model_fields["hf_version"].default) is opt
