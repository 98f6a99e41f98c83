"""The generated tensor tables against the models transformers builds, tensor for tensor (parameters and buffers)."""

from __future__ import annotations

import pytest

from memplan import tables
from memplan.errors import MemplanError

TYPES = tables.model_types()
SMALL = {"hidden_size": 256, "num_attention_heads": 8, "vocab_size": 1000, "num_hidden_layers": 3}
# A second shape: other widths, head_dim left to its default rule, 6 heads (head size 32).
OTHER = {"hidden_size": 192, "num_attention_heads": 6, "vocab_size": 777, "num_hidden_layers": 2}
# Per-type fields a shrunk config must change with the width (experts, MLA ranks, kv heads...).
EXTRA = {
    "mixtral": {"num_local_experts": 4, "intermediate_size": 320},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 96, "shared_expert_intermediate_size": 160,
                  "mlp_only_layers": [1]},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 96, "decoder_sparse_step": 2},
    "deepseek_v2": {"n_routed_experts": 4, "moe_intermediate_size": 96, "first_k_dense_replace": 1, "kv_lora_rank": 64,
                    "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 24},
    "deepseek_v3": {"n_routed_experts": 8, "moe_intermediate_size": 96, "first_k_dense_replace": 2, "kv_lora_rank": 64,
                    "q_lora_rank": 96, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 24,
                    "n_group": 2, "topk_group": 1},
    "gptj": {"rotary_dim": 16},
    "falcon": {"num_kv_heads": 2},
    # one rotary buffer pair per layer type present: the table holds both (5 sliding, then 1 full)
    "gemma3_text": {"num_hidden_layers": 6},
}


def meta_build(cfg: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter (tied ones once) and buffer of transformers' model on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
    masked = tables.table(cfg["model_type"])["masked"]
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    out = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    return out


def from_table(cfg: dict) -> dict[str, tuple[int, ...]]:
    return {e.name: e.shape for e in tables.tensors(cfg)}


def _kv(mt: str) -> dict:
    """kv heads under the field the class reads, where it has one."""
    d = tables.table(mt)["defaults"]
    return {"num_key_value_heads": 2} if "num_key_value_heads" in d else {}


def shrunk(mt: str, base: dict) -> dict:
    cfg = {"model_type": mt, **base, **_kv(mt), "pad_token_id": 0, **EXTRA.get(mt, {})}
    d = tables.table(mt)["defaults"]
    for key, width in (("intermediate_size", 512), ("ffn_dim", 512), ("n_inner", 512), ("ffn_hidden_size", 512)):
        if key in d and key not in EXTRA.get(mt, {}):
            cfg[key] = width + base["hidden_size"] // 64
    return cfg


@pytest.mark.parametrize("mt", TYPES)
def test_default_config(mt):
    cfg = {"model_type": mt}
    assert from_table(cfg) == meta_build(cfg)


@pytest.mark.parametrize("mt", TYPES)
@pytest.mark.parametrize("base", [SMALL, OTHER], ids=["small", "other"])
def test_shrunk_configs(mt, base):
    cfg = shrunk(mt, base)
    assert from_table(cfg) == meta_build(cfg)


SWITCHED = [(mt, k) for mt in TYPES for k in tables.table(mt)["switches"]]


@pytest.mark.parametrize("mt, switch", SWITCHED, ids=[f"{m}-{k}" for m, k in SWITCHED])
def test_each_switch_flipped(mt, switch):
    t = tables.table(mt)
    default, flipped = t["switches"][switch]
    cfg = shrunk(mt, SMALL)
    cfg[switch] = {"set": 48, None: None}.get(flipped, flipped) if not isinstance(flipped, bool) else flipped
    got = meta_build(cfg)
    assert from_table(cfg) == got


@pytest.mark.parametrize("mt", [t for t in TYPES if t != "falcon"])  # FalconConfig.head_dim is a read-only property
def test_head_dim_given(mt):
    # head_dim 64 with 8 heads of a 256-wide model: read by the class, by getattr in the model, or ignored.
    cfg = {**shrunk(mt, SMALL), "head_dim": 64}
    assert from_table(cfg) == meta_build(cfg)


def test_two_switches_at_once():
    # Falcon-40B's layout: new decoder architecture, grouped kv heads, no bias, untied head; falcon-rw: alibi off
    # with the old layout and multi_query off.
    for over in ({"new_decoder_architecture": True, "num_kv_heads": 2, "bias": True},
                 {"multi_query": False, "parallel_attn": False, "bias": True, "tie_word_embeddings": False}):
        cfg = {**shrunk("falcon", SMALL), **over}
        assert from_table(cfg) == meta_build(cfg)


def test_aliases_read_as_the_class_does():
    # Hub Qwen3-MoE configs say num_experts; the class calls it num_local_experts (attribute_map).
    cfg = {**shrunk("qwen3_moe", SMALL)}
    assert "num_experts" in cfg
    shapes = from_table(cfg)
    # decoder_sparse_step 2: layers 1, 3... hold experts, layer 0 a dense MLP
    assert shapes["model.layers.1.mlp.experts.gate_up_proj"][0] == 4
    assert "model.layers.0.mlp.experts.gate_up_proj" not in shapes
    assert shapes == meta_build(cfg)


def test_layers_that_differ_by_index():
    # deepseek_v3: the first first_k_dense_replace layers hold a dense MLP, the others stacked experts.
    shapes = from_table(shrunk("deepseek_v3", SMALL))
    assert "model.layers.1.mlp.gate_proj.weight" in shapes and "model.layers.1.mlp.experts.gate_up_proj" not in shapes
    assert shapes["model.layers.2.mlp.experts.gate_up_proj"] == (8, 2 * 96, 256)


def test_partial_rotary_fraction_from_the_config():
    # Pythia reads rotary_pct (0.25 of a 64-wide head: 16 dims, 8 inverse frequencies); Phi-4-mini 0.75.
    cfg = {"model_type": "gpt_neox", **SMALL, "hidden_size": 512, "rotary_pct": 0.25, "intermediate_size": 1024}
    assert from_table(cfg)["gpt_neox.rotary_emb.inv_freq"] == (8,)
    assert from_table(cfg) == meta_build(cfg)
    cfg = {"model_type": "phi3", **SMALL, "intermediate_size": 512, "partial_rotary_factor": 0.75, "pad_token_id": 0}
    assert from_table(cfg)["model.rotary_emb.inv_freq"] == (12,)  # int(32 * 0.75) = 24 dims
    assert from_table(cfg) == meta_build(cfg)


def test_a_broken_guard_refuses():
    # OPT builds project_in/out only when word_embed_proj_dim differs from hidden_size: the default probe
    # did not take that branch, so the table says so instead of guessing.
    with pytest.raises(MemplanError, match="holds only where Eq\\(word_embed_proj_dim, hidden_size\\)"):
        tables.tensors({"model_type": "opt", **SMALL, "ffn_dim": 512, "word_embed_proj_dim": 128})


def test_unknown_type_and_missing_field():
    with pytest.raises(MemplanError, match="model_type 'nope' has no tensor table; tables: .*llama"):
        tables.tensors({"model_type": "nope"})


def test_evaluator_runs_only_whitelisted_syntax():
    assert tables.evaluate("(hidden_size//num_attention_heads)*2 + Max(1, 3)", {"hidden_size": 64,
                                                                                "num_attention_heads": 4}) == 35
    for bad in ("__import__('os')", "hidden_size.__class__", "[x for x in ()]", "open('f')"):
        with pytest.raises(MemplanError, match="unsupported expression"):
            tables.evaluate(bad, {"hidden_size": 1})
