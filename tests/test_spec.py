"""Resolving what the user typed into a spec, and the spec's branches that no catalog model exercises."""

from __future__ import annotations

import json

import pytest

from memplan.errors import MemplanError
from memplan.spec import SUPPORTED_TYPES, catalog_entries, resolve, spec_from_config

TINY_LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40,
              "max_position_embeddings": 32}
# Tiny llama: layer = q 16*16 + k,v 2*8*16 + o 16*16 + mlp 3*16*40 + 2 norms 2*16 = 2,720;
# x2 = 5,440 + embed 97*16 1,552 + head 1,552 + final norm 16 = 8,560
TINY_LLAMA_PARAMS = 8_560


# ---- by name ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", catalog_entries(), ids=[e["id"] for e in catalog_entries()])
def test_resolves_id_and_aliases_in_any_case(entry):
    for name in (entry["id"], *entry["aliases"]):
        for typed in (name, name.upper(), f"  {name.lower()} "):
            assert resolve(typed).name == entry["id"]


def test_catalog_spec_carries_its_source():
    spec = resolve("opt-350m")
    assert "facebook/opt-350m" in spec.source
    assert spec.word_embed_proj_dim == 512 and not spec.pre_norm


def test_unknown_name_suggests_close_matches():
    with pytest.raises(MemplanError, match=r"unknown model 'opt-13' \(did you mean .*opt-13b"):
        resolve("opt-13")


def test_unknown_hub_id_suggests_close_matches(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # not cached, and no hub: tests/test_hub.py fetches online
    with pytest.raises(MemplanError, match=r"did you mean .*meta-llama/Llama-2-7b-hf.*give a local config"):
        resolve("meta-llama/Llama-2-7b")


# ---- from files --------------------------------------------------------------------------------

def test_config_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    spec = resolve(str(path))
    assert spec.param_count == TINY_LLAMA_PARAMS
    assert spec.source == str(path)


def test_folder_holding_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert resolve(str(tmp_path)).param_count == TINY_LLAMA_PARAMS


def test_folder_without_config_json(tmp_path):
    with pytest.raises(MemplanError, match="holds no config.json"):
        resolve(str(tmp_path))


def test_missing_json_file(tmp_path):
    with pytest.raises(MemplanError, match="no such file"):
        resolve(str(tmp_path / "nope.json"))


def test_hub_id_from_local_hf_cache(monkeypatch, tmp_path):
    snapshot = tmp_path / "models--acme--tiny-llama" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(TINY_LLAMA))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    spec = resolve("acme/tiny-llama")
    assert spec.name == "acme/tiny-llama@abc"  # the snapshot's folder names the commit
    assert spec.param_count == TINY_LLAMA_PARAMS
    assert spec.source == str(snapshot / "config.json")


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_type": "llama",\n  "hidden_size": 16,,\n}')
    # Line 3 is '  "hidden_size": 16,,': the stray comma is its 21st character.
    with pytest.raises(MemplanError, match=r"not valid JSON \(line 3, column 21"):
        resolve(str(path))


def test_missing_field_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in TINY_LLAMA.items() if k != "hidden_size"}))
    with pytest.raises(MemplanError, match=r"lacks 'hidden_size'"):
        resolve(str(path))


def test_bad_field_value_is_named():
    with pytest.raises(MemplanError, match=r"'num_hidden_layers' must be a positive integer, got 0"):
        spec_from_config({**TINY_LLAMA, "num_hidden_layers": 0}, "x")


def test_unsupported_model_type_lists_supported(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_LLAMA, "model_type": "mamba"}))
    with pytest.raises(MemplanError, match=r"model_type 'mamba' is not supported; supported: " + ", ".join(SUPPORTED_TYPES)):
        resolve(str(path))


def test_heads_must_divide_by_kv_heads():
    with pytest.raises(MemplanError, match="multiple of num_key_value_heads"):
        spec_from_config({**TINY_LLAMA, "num_key_value_heads": 3}, "x")


# ---- branches no catalog model takes, held against transformers on tiny shapes ------------------

T = {"vocab_size": 97, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
     "max_position_embeddings": 32}
VARIANTS = {
    "opt-untied": {"model_type": "opt", "ffn_dim": 40, "tie_word_embeddings": False, **T},
    "opt-no-bias": {"model_type": "opt", "ffn_dim": 40, "enable_bias": False, **T},
    "opt-no-affine-ln": {"model_type": "opt", "ffn_dim": 40, "layer_norm_elementwise_affine": False, **T},
    "opt-no-final-ln": {"model_type": "opt", "ffn_dim": 40, "_remove_final_layer_norm": True, **T},
    "opt-350m-like-untied": {"model_type": "opt", "ffn_dim": 40, "word_embed_proj_dim": 8,
                             "do_layer_norm_before": False, "tie_word_embeddings": False, **T},
    "llama-biases-gqa": {"model_type": "llama", "intermediate_size": 40, "num_key_value_heads": 2,
                         "attention_bias": True, "mlp_bias": True, **T},
    "llama-head-dim-tied": {"model_type": "llama", "intermediate_size": 40, "head_dim": 8,
                            "tie_word_embeddings": True, **T},
    "mistral-mqa-head-dim": {"model_type": "mistral", "intermediate_size": 40, "num_key_value_heads": 1,
                             "head_dim": 8, **T},
    "qwen2-untied": {"model_type": "qwen2", "intermediate_size": 40, "num_key_value_heads": 2,
                     "tie_word_embeddings": False, **T},
    "gpt2-n-inner-untied": {"model_type": "gpt2", "vocab_size": 97, "n_embd": 16, "n_layer": 2, "n_head": 4,
                            "n_positions": 32, "n_inner": 24, "tie_word_embeddings": False,
                            "bos_token_id": 0, "eos_token_id": 0},
    "roberta-untied": {"model_type": "roberta", "intermediate_size": 40, "type_vocab_size": 2,
                       "tie_word_embeddings": False, **T},
}


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_matches_transformers(cfg, transformers_shapes):
    spec = spec_from_config(cfg, "variant")
    assert {t.name: t.shape for t in spec.tensors} == transformers_shapes(cfg)


def test_rotary_buffers_follow_head_dim():
    spec = spec_from_config({**TINY_LLAMA, "head_dim": 8}, "x")
    assert [b.shape for b in spec.buffers] == [(4,), (4,)]
    assert resolve("gpt2").buffers == ()
