"""Every catalog model, tensor by tensor, against the model transformers builds from the same config."""

from __future__ import annotations

import pytest

from catalog_helpers import group_counts, layer_numel
from memplan.spec import catalog_entries, catalog_names, resolve, spec_from_config

ENTRIES = catalog_entries()
GROUPS = {"embeddings", "attention", "mlp", "norms", "lm_head"}


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_spec_matches_transformers(entry, transformers_shapes):
    spec = spec_from_config(entry["config"], entry["id"])
    assert {t.name: t.shape for t in spec.tensors} == transformers_shapes(entry["config"])
    groups = group_counts(spec)
    assert set(groups) <= GROUPS
    assert sum(groups.values()) == spec.param_count
    # The layers' parameters plus what lies outside them make the whole model.
    outside = sum(t.numel for t in spec.tensors if t.layer is None)
    assert sum(layer_numel(spec, i) for i in range(spec.num_layers)) + outside == spec.param_count


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_entry_is_documented(entry):
    assert set(entry) - {"published_params"} == {"id", "aliases", "source", "config"}
    assert entry["source"].strip()
    assert entry["config"]["model_type"]
    assert all(a == a.strip() for a in entry["aliases"])


def test_names_are_unique_ignoring_case():
    lowered = [n.lower() for n in catalog_names()]
    assert len(lowered) == len(set(lowered))


def test_short_aliases_people_type():
    for alias, model_id in {
        "opt-13b": "facebook/opt-13b", "llama-2-7b": "meta-llama/Llama-2-7b-hf",
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "vicuna-7b": "lmsys/vicuna-7b-v1.5",
        "mistral-7b": "mistralai/Mistral-7B-v0.1", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "gpt2-small": "gpt2",
        "roberta-large": "roberta-large", "FacebookAI/roberta-base": "roberta-base",
        "openai-community/gpt2-xl": "gpt2-xl",
    }.items():
        assert resolve(alias).name == model_id


KNOWN_TOTALS = {
    # OPT-13B: h=5120, L=40, ffn=20480, V=50272, 2048+2 learned positions, tied head.
    # layer = 4*(h*h+h) + 2*2h + (ffn*h+ffn) + (h*ffn+h) = 104,878,080 + 20,480 + 104,878,080 + 104,862,720
    #       = 314,639,360; x40 = 12,585,574,400
    # + V*h 257,392,640 + 2050*h 10,496,000 + final LN 2h 10,240 = 12,853,473,280
    "facebook/opt-13b": 12_853_473_280,
    # Llama-2-7B: h=4096, L=32, ffn=11008, V=32000, untied head.
    # layer = 4*h*h 67,108,864 + 3*h*ffn 135,266,304 + 2h 8,192 = 202,383,360; x32 = 6,476,267,520
    # + 2*V*h 262,144,000 + final norm 4,096 = 6,738,415,616
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    # Llama-2-70B, GQA with 8 kv heads of 128: kv_dim = 1024.
    # layer = 2*h*h 134,217,728 + 2*h*1024 16,777,216 + 3*h*28672 704,643,072 + 2h 16,384 = 855,654,400
    # x80 = 68,452,352,000 + 2*32000*8192 524,288,000 + 8,192 = 68,976,648,192
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    # GPT-2 small: h=768, L=12, V=50257, 1024 positions, Conv1D layers with biases, tied head.
    # layer = ln 3,072 + c_attn 1,771,776 + attn c_proj 590,592 + c_fc 2,362,368 + mlp c_proj 2,360,064
    #       = 7,087,872; x12 = 85,054,464 + wte 38,597,376 + wpe 786,432 + ln_f 1,536 = 124,439,808
    "gpt2": 124_439_808,
    # Qwen2.5-0.5B: h=896, L=24, 14 heads of 64, 2 kv heads (kv_dim 128), ffn=4864, V=151936, tied head.
    # layer = q 803,712 (with bias) + k,v 229,632 (with bias) + o 802,816 + mlp 13,074,432 + 2h 1,792
    #       = 14,912,384; x24 = 357,897,216 + V*h 136,134,656 + 896 = 494,032,768 (the model card's 0.49B)
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    # RoBERTa-base for masked LM: embeddings 50265*768 + 514*768 + 768 + LN 1,536 = 39,000,576
    # layer 7,087,872 (as GPT-2's, other layout); x12 = 85,054,464
    # head: dense 590,592 + LN 1,536 + bias 50,265 = 642,393; total 124,697,433
    "roberta-base": 124_697_433,
}


@pytest.mark.parametrize("model_id, total", KNOWN_TOTALS.items())
def test_known_totals(model_id, total):
    assert resolve(model_id).param_count == total


PUBLISHED = [e for e in ENTRIES if "published_params" in e]


@pytest.mark.parametrize("entry", PUBLISHED, ids=[e["id"] for e in PUBLISHED])
def test_count_within_one_percent_of_the_published_size(entry):
    # published_params: the parameter count the model card / hub page gives for that checkpoint
    count = spec_from_config(entry["config"], entry["id"]).param_count
    assert abs(count - entry["published_params"]) <= 0.01 * entry["published_params"], count


def test_catalog_covers_the_families_people_fine_tune():
    types = {e["config"]["model_type"] for e in ENTRIES}
    assert {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi", "phi3", "mixtral",
            "olmo2", "granite", "falcon", "gpt_neox", "gptj", "bloom", "bert", "opt", "gpt2", "roberta"} <= types
