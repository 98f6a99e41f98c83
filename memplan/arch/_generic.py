"""Every model_type of the generated tensor tables that no hand-written family covers.

Parameters and buffers are exact: they come from `memplan.tables`, generated from transformers itself.
What each layer keeps for backward is not yet derived from the real code for these types: it reuses
the formulas of the closest hand-written family (a template), picked from the layer's tensors:

- `llama` (pre-norm, RMSNorm, gated MLP): Qwen3, OLMo-2, Granite, Gemma 1-3, Phi-3, Cohere, Mixtral,
  Qwen-MoE and DeepSeek (MoE layers add the routed rows, below);
- `gpt2` (pre-LayerNorm, plain MLP): GPT-NeoX, GPT-J, Falcon, Phi, BLOOM, StarCoder2;
- `roberta` (post-LayerNorm encoder, masked LM): BERT.

A MoE layer is priced as its dense twin with f = the expert width, plus (k - 1) more gated-MLP
saved sets (each routed slot runs one expert's MLP), k * h * cb for the gathered expert inputs, a
shared expert's MLP where the model has one, and E * 4 bytes per token of router logits (fp32):
measured on fake tensors for Mixtral-8x7B and Qwen3-30B-A3B, the dense twin plus these terms is within
784 B per token per layer of the traced activations (grouped_mm experts; routing does not change it).
Estimates carry a warning saying activations are approximate, and that `memplan trace` is exact.
"""

from __future__ import annotations

from memplan import tables
from memplan.arch import ARCHS, Arch, register
from memplan.arch._common import (
    Ctx, LayerKind, Tensor, causal_logits_backward, causal_logits_forward, dense_live, masked_loss, score_bytes,
)
from memplan.arch.gpt2 import saved as gpt2_saved
from memplan.arch.llama import saved as llama_saved
from memplan.arch.roberta import saved as roberta_saved
from memplan.spec import per_spec

# model_type -> peft's default LoRA targets where peft has none (Phi-3 fuses q, k, v into qkv_proj).
# DeepSeek's MLA has no v_proj: its query and key/value up-projections stand in for q_proj and v_proj.
LORA_DEFAULTS = {"phi3": ("qkv_proj",), "deepseek_v2": ("q_proj", "q_b_proj", "kv_b_proj"),
                 "deepseek_v3": ("q_proj", "q_b_proj", "kv_b_proj")}
# peft's own mapping (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21) for the types here
PEFT_DEFAULTS = {
    "bert": ("query", "value"), "bloom": ("query_key_value",),
    "falcon": ("query_key_value",), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"), "gpt_neox": ("query_key_value",), "gptj": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"), "phi": ("q_proj", "v_proj", "fc1", "fc2"), "qwen3": ("q_proj", "v_proj"),
}

_FIRST = {  # canonical ModelSpec field -> config fields that hold it, first present wins
    "heads": ("num_attention_heads",),
    "kv": ("num_key_value_heads", "num_kv_heads"),
    "f": ("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "expert_f": ("moe_intermediate_size",),
    "positions": ("max_position_embeddings", "n_positions", "seq_length"),
}


def _get(values: dict, aliases: dict, key: str):
    return values.get(aliases.get(key, key))


def _first(values: dict, aliases: dict, what: str):
    for key in _FIRST[what]:
        v = _get(values, aliases, key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _kv_heads(mt: str, values: dict, aliases: dict, heads: int) -> int:
    if mt == "falcon" and not values.get("new_decoder_architecture"):
        return 1 if values.get("multi_query", True) else heads
    return _first(values, aliases, "kv") or heads


def read(cfg: dict, need) -> dict:
    mt = cfg["model_type"]
    t = tables.table(mt)
    aliases = t["aliases"]
    values = tables.fields(cfg, t)
    h = _get(values, aliases, "hidden_size")
    heads = _first(values, aliases, "heads")
    layers = values.get(t["layers_key"])
    vocab = values.get("vocab_size")
    for key, v in (("hidden_size", h), ("num_attention_heads", heads), ("num_hidden_layers", layers),
                   ("vocab_size", vocab)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            need(key)  # raises the one-line error naming the field
    head_dim = values.get("qk_head_dim") or values.get("head_dim") or h // heads
    experts = _first(values, aliases, "experts") or 0
    expert_f = _first(values, aliases, "expert_f") or (_first(values, aliases, "f") if experts else 0)
    ts = tables.tensors(cfg)
    layer_names = [e.name for e in ts if e.layer is not None]
    gated = any("gate_proj" in n or "gate_up_proj" in n or "w1." in n for n in layer_names)
    layernorm = any(("norm" in n.lower() or ".ln" in n) and n.endswith(".bias") for n in layer_names) or \
        mt in ("olmo", "gpt_neox", "falcon", "bloom", "gptj", "phi", "starcoder2", "bert")
    window = values.get("sliding_window")
    return dict(
        vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
        num_kv_heads=_kv_heads(mt, values, aliases, heads), head_dim=head_dim,
        intermediate_size=_first(values, aliases, "f") or 4 * h,
        max_positions=_first(values, aliases, "positions") or 0,
        tie_word_embeddings=bool(values.get("tie_word_embeddings", False)), gated_mlp=gated,
        activation=str(values.get("hidden_act") or values.get("activation_function") or "gelu"),
        attention_bias=any(n.endswith(("q_proj.bias", "query_key_value.bias", "qkv_proj.bias", "query.bias"))
                           for n in layer_names),
        out_bias=any(n.endswith(("o_proj.bias", "dense.bias", "out_proj.bias")) for n in layer_names),
        mlp_bias=any(n.endswith(("down_proj.bias", "fc2.bias", "dense_4h_to_h.bias", "fc_out.bias", "c_proj.bias"))
                     for n in layer_names),
        norm="layernorm" if layernorm else "rmsnorm", pre_norm=not t["masked"], word_embed_proj_dim=h,
        type_vocab_size=values.get("type_vocab_size") or 0,
        hidden_dropout=float(values.get("hidden_dropout_prob") or values.get("resid_pdrop")
                             or values.get("hidden_dropout") or 0.0),
        attention_dropout=float(values.get("attention_dropout") or values.get("attention_probs_dropout_prob")
                                or values.get("attn_pdrop") or 0.0),
        num_experts=experts, experts_per_token=(values.get("num_experts_per_tok") or 0) if experts else 0,
        expert_size=expert_f or 0,
        shared_expert_size=(values.get("shared_expert_intermediate_size")
                            or (values.get("n_shared_experts") or 0) * (expert_f or 0)) if experts else 0,
        sliding_window=window if isinstance(window, int) and not isinstance(window, bool) else 0,
    )


_LAYER_WORDS = ("attn", "attention", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")
_MLP_WORDS = ("mlp", "experts", "ffn", "fc", "dense_h_to_4h", "dense_4h_to_h", "intermediate", "output.dense",
              "gate", "router", "feed_forward")


def _group(name: str, layer: int | None, lm_head: str | None) -> str:
    low = name.lower()
    if "norm" in low or ".ln" in low or low.startswith("ln") or "layernorm" in low:
        return "norms" if not (lm_head and name.startswith(lm_head)) else "lm_head"
    if layer is None:
        if lm_head and name.startswith(lm_head):
            return "lm_head"
        return "embeddings"
    if any(w in low for w in _LAYER_WORDS) and "experts" not in low and "mlp" not in low:
        return "attention"
    return "mlp"


def _head_prefix(names: list[str]) -> str | None:
    for p in ("lm_head", "embed_out", "cls.", "score"):
        if any(n.startswith(p) for n in names):
            return p
    return None


def _tensor(e: tables.Entry, head: str | None) -> Tensor:
    parts = e.name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]
    return Tensor(e.name, e.shape, module, e.layer, _group(e.name, e.layer, head), e.transposed, e.itemsize,
                  e.linear)


def tensors(s) -> list[Tensor]:
    entries = [e for e in tables.tensors(s.config, where=s.name) if not e.buffer]
    head = _head_prefix([e.name for e in entries])
    return [_tensor(e, head) for e in entries]


def buffers(s) -> list[Tensor]:
    return [Tensor(e.name, e.shape, e.name.split(".")[-2], e.layer, "buffers", False, e.itemsize)
            for e in tables.tensors(s.config, where=s.name) if e.buffer]


def layers(s) -> tuple[LayerKind, ...]:
    t = tables.table(s.model_type)
    values = tables.fields(s.config, t)
    return tuple(tables.evaluate(t["layer_rule"], {**values, "i": i}) for i in range(s.num_layers))


def _moe_extra(ctx: Ctx) -> int:
    """Bytes per token a MoE layer saves beyond its dense twin (f = expert width)."""
    spec, cb = ctx.spec, ctx.cb
    k, fe = spec.experts_per_token, spec.expert_size
    mlp = cb * fe * (4 if ctx.trains else 3)  # act(gate), gate and up, their product (and down's input)
    shared = cb * spec.shared_expert_size * (4 if ctx.trains else 3)
    return (k - 1) * mlp + k * spec.hidden_size * cb + shared + spec.num_experts * 4


def _is_moe(kind: LayerKind, ctx: Ctx) -> bool:
    return kind == "moe" or (kind == "layer" and ctx.spec.num_experts > 0)


def _gated_saved(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    if not _is_moe(kind, ctx):
        return llama_saved(kind, ctx)  # dense layers (DeepSeek's first ones) use intermediate_size
    n, per_score = llama_saved(kind, _Twin(ctx).ctx)
    return n + _moe_extra(ctx), per_score


class _Twin:
    """`ctx` with the spec's MLP width set to the expert width (the dense twin of a MoE layer)."""

    def __init__(self, ctx: Ctx):
        from dataclasses import replace

        self.ctx = replace(ctx, spec=replace(ctx.spec, intermediate_size=ctx.spec.expert_size, memo={}))


def _live(kind: LayerKind, ctx: Ctx) -> int:
    if _is_moe(kind, ctx):
        return dense_live(kind, _Twin(ctx).ctx)
    return dense_live(kind, ctx)


@per_spec
def _layer_facts(spec) -> tuple[int, bool, bool]:
    """(norms per layer beyond the template's two, q/k norms present, attention logit soft-capping) of layer 0."""
    names = [t.name for t in spec.tensors if t.layer == 0 and t.name.endswith(".weight")]
    qk = any(n.endswith(("q_norm.weight", "k_norm.weight", "q_layernorm.weight", "k_layernorm.weight"))
             for n in names)
    norms = [n for n in names if t_is_norm(n) and not n.endswith(("q_norm.weight", "k_norm.weight",
                                                                  "q_layernorm.weight", "k_layernorm.weight",
                                                                  "q_a_layernorm.weight", "kv_a_layernorm.weight"))]
    return max(0, len(norms) - 2), qk, bool(spec.config.get("attn_logit_softcapping"))


def t_is_norm(name: str) -> bool:
    low = name.lower()
    return "norm" in low or ".ln" in low


def _rms(ctx: Ctx) -> int:
    """Bytes per element an RMSNorm saves: the fp32 upcast, and the normalised value when its weight trains."""
    return 4 + ((4 if ctx.r == 4 else ctx.cb) if ctx.trains else 0)


def _with_norms(saved):
    """`saved` plus what the template lacks: extra norms (Gemma-2/3, OLMo-2 post-norms), q/k norms (Qwen3,
    OLMo-2, Gemma-3) over the q and k widths, and soft-capped scores (Gemma-2: tanh keeps its output)."""

    def with_norms(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
        n, per_score = saved(kind, ctx)
        extra, qk, softcap = _layer_facts(ctx.spec)
        n += extra * ctx.spec.hidden_size * _rms(ctx)
        if qk:
            n += (ctx.spec.q_dim + ctx.spec.kv_dim) * _rms(ctx)
        return n, per_score + (ctx.cb if softcap else 0)

    return with_norms


def _plain_gelu_saved(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    """gpt2's formulas, with one GELU input saved where the model's GELU is one op (exact or torch's tanh
    approximation: GPT-NeoX, Falcon, BLOOM, StarCoder2) instead of gelu_new's four tensors."""
    n, _ = gpt2_saved(kind, ctx)
    # their eager attention runs softmax in fp32 (dtype=torch.float32), which GPT-2's does not
    per_score = score_bytes(ctx, fp32_softmax=True)
    if ctx.spec.activation in ("gelu_new", "gelu_fast", "quick_gelu"):
        return n, per_score
    gelu_new = (2 * ctx.cb + 2 * 4) if ctx.amp else 4 * ctx.cb
    return n - ctx.spec.intermediate_size * (gelu_new - ctx.cb), per_score


def _capped_logits(ctx: Ctx) -> int:
    """Bytes tanh keeps under final_logit_softcapping (Gemma-2: logits / cap, tanh, * cap): T * V * cb."""
    spec = ctx.spec
    cap = spec.config.get("final_logit_softcapping", tables.table(spec.model_type)["defaults"].get(
        "final_logit_softcapping"))
    return ctx.tokens * spec.vocab_size * ctx.cb if cap else 0


def _softcapped_logits_forward(ctx: Ctx) -> tuple[int, int]:
    """Under autograd tanh's output stays saved; a no-grad forward (ZO) frees it as it goes."""
    kept, transient = causal_logits_forward(ctx)
    return kept + (_capped_logits(ctx) if ctx.cfg.method.is_fo else 0), transient


def _softcapped_logits_backward(ctx: Ctx) -> int:
    """The loss backward's peak, with tanh's saved output still alive."""
    return causal_logits_backward(ctx) + _capped_logits(ctx)


TEMPLATES = {"llama": _with_norms(_gated_saved), "gpt2": _with_norms(_plain_gelu_saved), "roberta": roberta_saved}


def template(model_type: str) -> str:
    """The hand-written family whose per-layer formulas stand in for `model_type`."""
    t = tables.table(model_type)
    if t["masked"]:
        return "roberta"
    layer = next(iter(t["variants"][0]["layers"].values()))
    gated = any("gate_proj" in n or "gate_up_proj" in n for kind in t["variants"][0]["layers"].values() for n in kind)
    return "llama" if gated or "experts" in " ".join(layer) else "gpt2"


def note(model_type: str) -> str:
    return (f"activations for {model_type} are approximate (the {template(model_type)} family's per-layer "
            f"formulas); parameters are exact. With torch installed (pip install 'memplan[torch]') memplan "
            f"traces exact ones on first use and caches them, unless MEMPLAN_TRACE=never")


def register_type(mt: str) -> Arch:
    """The generic family of table type `mt` (registered once)."""
    if mt in ARCHS:
        return ARCHS[mt]
    tpl = template(mt)
    masked = tables.table(mt)["masked"]
    capped = "final_logit_softcapping" in tables.table(mt)["defaults"]
    logits = {"logits_forward": _softcapped_logits_forward, "logits_backward": _softcapped_logits_backward} \
        if capped and not masked else {}
    return register(Arch(
        model_types=(mt,), read=read, tensors=tensors, buffers=buffers, layers=layers, saved=TEMPLATES[tpl],
        live=_live, loss=masked_loss if masked else Arch.__dataclass_fields__["loss"].default,
        objective="masked" if masked else "causal",
        lora_targets=LORA_DEFAULTS.get(mt) or PEFT_DEFAULTS.get(mt, ("q_proj", "v_proj")),
        token_embedding=_embedding(mt), activations_note=note(mt), **logits,
    ))


def _embedding(model_type: str) -> str:
    outside = tables.table(model_type)["variants"][0]["outside"]
    for name in outside:
        if name.endswith(".weight") and any(w in name for w in ("embed_tokens", "wte", "word_embeddings",
                                                                 "embed_in")):
            return name.split(".")[-2]
    return "embed_tokens"
