"""Table-driven families: hand families agree with the tables, LoRA defaults, all-linear, catalog filters,
and the borrowed activation formulas against the trace (approximate: the error is measured and bounded)."""

from __future__ import annotations

import pytest

from memplan import analytic, arch, tables
from memplan.errors import MemplanError
from memplan.options import Config
from memplan.spec import catalog_entries, spec_from_config
from test_arch import TINY

HAND = [t for t, a in arch.ARCHS.items() if not a.activations_note]


@pytest.mark.parametrize("mt", HAND)
def test_hand_families_agree_with_the_tables(mt):
    configs = [TINY[mt]] + [e["config"] for e in catalog_entries() if e["config"]["model_type"] == mt][:3]
    for cfg in configs:
        spec = spec_from_config(cfg, mt)
        if cfg.get("word_embed_proj_dim", cfg.get("hidden_size")) != cfg.get("hidden_size"):
            # OPT-350m's project_in/out: a branch the table's probe did not take; it refuses, the hand family serves
            with pytest.raises(MemplanError, match="holds only where"):
                tables.tensors(cfg)
            continue
        table = {e.name: e.shape for e in tables.tensors(cfg) if not e.buffer}
        assert {t.name: t.shape for t in spec.tensors} == table
        table_buffers = {e.name: e.shape for e in tables.tensors(cfg) if e.buffer}
        assert {t.name: t.shape for t in spec.buffers} == table_buffers


def test_every_table_type_is_a_family():
    assert set(tables.model_types()) <= set(arch.supported_types())
    for mt in tables.model_types():
        assert arch.get(mt).model_types == (mt,) or mt in HAND


@pytest.mark.parametrize("mt, targets", [
    ("phi3", ("qkv_proj",)), ("olmo2", ("q_proj", "v_proj")), ("granite", ("q_proj", "v_proj")),
    ("qwen3_moe", ("q_proj", "v_proj")), ("deepseek_v3", ("q_proj", "q_b_proj", "kv_b_proj")),
])
def test_lora_defaults_where_peft_has_none(mt, targets):
    assert arch.get(mt).lora_targets == targets
    spec = spec_from_config({"model_type": mt}, mt)
    cfg = Config(model="x", scheme="lora")
    assert analytic.trainable(cfg, spec).params > 0  # they match modules of the model


def test_lora_defaults_follow_peft_where_it_has_them():
    peft_map = pytest.importorskip("peft.utils.constants").TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for mt in arch.supported_types():
        if mt in peft_map:
            assert tuple(arch.get(mt).lora_targets) == tuple(peft_map[mt]), mt


def test_lora_targets_help_names_the_defaults():
    text = Config.model_fields["lora_targets"].description
    assert "all-linear" in text and "qkv_proj for Phi-3" in text and "OLMo-2, Granite, Qwen3-MoE" in text


SMALL = {
    "llama": TINY["llama"], "gpt2": TINY["gpt2"], "roberta": TINY["roberta"], "opt": TINY["opt"],
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "intermediate_size": 128, "max_position_embeddings": 64},
    "phi3": {"model_type": "phi3", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64, "pad_token_id": 0},
    "falcon": {"model_type": "falcon", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "max_position_embeddings": 64},
}


@pytest.mark.parametrize("mt", sorted(set(SMALL) - {"qwen3_moe"}))
def test_all_linear_matches_peft(mt, tmp_path):
    pytest.importorskip("peft")
    from memplan.build import build_model
    from tiny import write

    cfg = Config(model=write(tmp_path, SMALL[mt]), scheme="lora", lora_targets=("all-linear",), dtype="fp32")
    model = build_model(cfg, device="meta")
    peft_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spec = spec_from_config(SMALL[mt], mt)
    assert analytic.trainable(cfg, spec).params == peft_count


def test_models_filters_by_family_and_size(run_cli):
    import json

    code, out, _ = run_cli("models", "--family", "qwen3", "--max-params", "10B", "--json")
    assert code == 0
    ids = [r["id"] for r in json.loads(out)["models"]]
    assert ids == ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B"]
    code, out, _ = run_cli("models", "--family", "qwen3", "--min-params", "100B", "--json")
    assert [r["id"] for r in json.loads(out)["models"]] == ["Qwen/Qwen3-235B-A22B"]
    code, _, err = run_cli("models", "--max-params", "lots")
    assert code == 2 and "not a parameter count" in err


def test_generic_estimates_say_activations_are_approximate(fit_json):
    # MEMPLAN_TRACE=never (the suite's setting): no trace on first use, the borrowed formulas answer
    # (bf16: memplan ships Qwen3-8B's profiles for fit's defaults, fp16, only)
    _, ests = fit_json("qwen3-8b", "-m", "zo-sgd", "--batch", "1", "--seq", "512", "--dtype", "bf16")
    assert any("activations for qwen3 are approximate" in w and "MEMPLAN_TRACE=never" in w
               for w in ests[0]["warnings"])
    _, ests = fit_json("llama-2-7b", "-m", "zo-sgd", "--batch", "1", "--seq", "512")
    assert not any("approximate" in w for w in ests[0]["warnings"])


def test_all_linear_on_moe_says_it_is_not_modelled():
    # peft 0.21 wraps Qwen3-MoE's stacked experts and router too (30,784 adapter parameters on the tiny config
    # against 7,168 in its nn.Linear modules): refused rather than under-counted.
    spec = spec_from_config(SMALL["qwen3_moe"], "tiny-moe")
    cfg = Config(model="x", scheme="lora", lora_targets=("all-linear",))
    with pytest.raises(MemplanError, match="all-linear on tiny-moe: peft also adapts its stacked expert"):
        analytic.trainable(cfg, spec)


def test_all_linear_stands_alone():
    spec = spec_from_config(SMALL["llama"], "tiny")
    cfg = Config(model="x", scheme="lora", lora_targets=("all-linear", "q_proj"))
    with pytest.raises(MemplanError, match="all-linear stands alone"):
        analytic.trainable(cfg, spec)


def test_moe_largest_tensor_is_a_stacked_expert_tensor():
    # Mixtral-8x7B: experts.gate_up_proj is (8, 2 * 14336, 4096); in bf16 8 * 28672 * 4096 * 2 B = 1.75 GiB,
    # the tensor MeZO's out-of-place perturbation copies (not one expert's 0.22 GiB matrix).
    from memplan.spec import resolve

    spec = resolve("mixtral-8x7b")
    cfg = Config(model="mixtral-8x7b", dtype="bf16")
    assert analytic.trainable(cfg, spec).largest_bytes == 8 * 28672 * 4096 * 2 == 1_879_048_192
    assert spec.num_experts == 8 and spec.experts_per_token == 2 and spec.expert_size == 14336


def test_types_without_sdpa_run_eager_attention(fit_json):
    """transformers 5.24 has no SDPA attention for gemma2 and bloom (the tables record each class's
    `_supports_sdpa`); `--attention sdpa`, the default, runs what transformers picks then: eager."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    for mt in tables.model_types():
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) or MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(mt)
        assert tables.has_sdpa(mt) == getattr(transformers, name)._supports_sdpa, mt
    assert not tables.has_sdpa("gemma2") and not tables.has_sdpa("bloom")
    _, ests = fit_json("gemma-2-2b", "-m", "zo-sgd")
    _, eager = fit_json("gemma-2-2b", "-m", "zo-sgd", "--attention", "eager")
    assert ests[0]["attention"] == "eager" and "gemma2 has no SDPA attention" in ests[0]["warnings"][0]
    assert ests[0]["peak_allocated_bytes"] == eager[0]["peak_allocated_bytes"]


def test_warnings_print_as_written(run_cli):
    """A warning naming `pip install 'memplan[torch]'` keeps its brackets on the terminal (rich reads
    `[torch]` as a markup tag unless the text is escaped)."""
    code, _, err = run_cli("fit", "qwen3-8b", "-m", "zo-sgd", "--dtype", "bf16")
    assert code in (0, 1) and "pip install 'memplan[torch]'" in " ".join(err.split())
