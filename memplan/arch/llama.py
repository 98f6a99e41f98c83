"""Llama, Mistral, Qwen2 (pre-RMSNorm, rotary, GQA, SiLU-gated MLP, no dropout).

They differ only in which projections carry biases: Llama as its config says, Qwen2 on q, k and v.
"""

from __future__ import annotations

from memplan.arch import Arch, register
from memplan.arch._common import V4_28, Ctx, LayerKind, Tensor, attention, linear, lm_head, norm, score_bytes
from memplan.options import HfVersion


def read(cfg: dict, need) -> dict:
    mt = cfg.get("model_type")
    h = need("hidden_size")
    heads = need("num_attention_heads")
    llama = mt == "llama"
    return dict(
        vocab_size=need("vocab_size"), hidden_size=h, num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or h // heads,
        max_positions=need("max_position_embeddings"), word_embed_proj_dim=h,
        intermediate_size=need("intermediate_size"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), gated_mlp=True,
        activation=cfg.get("hidden_act", "silu"),
        attention_bias=cfg.get("attention_bias", False) if llama else mt == "qwen2",
        out_bias=cfg.get("attention_bias", False) if llama else False,
        mlp_bias=cfg.get("mlp_bias", False) if llama else False, norm="rmsnorm", pre_norm=True,
        attention_dropout=cfg.get("attention_dropout", 0.0), hidden_dropout=0.0,
    )


def tensors(s) -> list[Tensor]:
    h, f = s.hidden_size, s.intermediate_size
    ts = [Tensor("model.embed_tokens.weight", (s.vocab_size, h), "embed_tokens", None, "embeddings")]
    for i in range(s.num_layers):
        lp = f"model.layers.{i}."
        ts += linear(lp + "self_attn.", "q_proj", s.q_dim, h, s.attention_bias, i, "attention")
        ts += linear(lp + "self_attn.", "k_proj", s.kv_dim, h, s.attention_bias, i, "attention")
        ts += linear(lp + "self_attn.", "v_proj", s.kv_dim, h, s.attention_bias, i, "attention")
        ts += linear(lp + "self_attn.", "o_proj", h, s.q_dim, s.out_bias, i, "attention")
        ts += linear(lp + "mlp.", "gate_proj", f, h, s.mlp_bias, i, "mlp")
        ts += linear(lp + "mlp.", "up_proj", f, h, s.mlp_bias, i, "mlp")
        ts += linear(lp + "mlp.", "down_proj", h, f, s.mlp_bias, i, "mlp")
        ts += norm(lp, "input_layernorm", h, False, i)
        ts += norm(lp, "post_attention_layernorm", h, False, i)
    ts += norm("model.", "norm", h, False, None)
    return ts + lm_head(s, h)


def buffers(s) -> list[Tensor]:
    """Rotary inverse frequencies (fp32), and their original copy."""
    half = s.head_dim // 2
    return [
        Tensor("model.rotary_emb.inv_freq", (half,), "rotary_emb", None, "buffers"),
        Tensor("model.rotary_emb.original_inv_freq", (half,), "rotary_emb", None, "buffers"),
    ]


def saved(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    spec, cb, trains = ctx.spec, ctx.cb, ctx.trains
    h, f = spec.hidden_size, spec.intermediate_size
    # RMSNorm: x.float() (x itself when already fp32), and, when its weight trains, the normalised
    # value cast back that `weight * x` saves (fp32 when the input is): 4 + cb, or 8; frozen: 4.
    rms = 4 + ((4 if ctx.r == 4 else cb) if trains else 0)
    n = 2 * rms * h
    if ctx.keeps_linear_inputs:
        n += (3 if ctx.amp else 1) * cb * h
    n += attention(ctx, repeat_kv=True)
    if ctx.keeps_linear_inputs:
        n += (2 if ctx.amp else 1) * cb * h  # gate and up read the second norm's output
    # act(gate) saves gate's output; act * up saves both factors; down saves the product.
    n += cb * f * (4 if ctx.keeps_linear_inputs else 3)
    return n, score_bytes(ctx, fp32_softmax=True)


LLAMA = register(Arch(
    model_types=("llama", "mistral", "qwen2"), read=read, tensors=tensors, buffers=buffers, saved=saved,
    versions={HfVersion.V4_28: V4_28},
))
