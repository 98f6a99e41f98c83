"""OPT (pre-LayerNorm, learned positions offset by 2, ReLU MLP, dropout after attention and MLP).

OPT-350m embeds tokens in 512 dimensions and projects them in and out of its 1024-wide layers.
"""

from __future__ import annotations

from memplan.arch import Arch, register
from memplan.arch._common import V4_28, Ctx, LayerKind, Tensor, attention, linear, lm_head, mask, norm, score_bytes
from memplan.options import HfVersion


def read(cfg: dict, need) -> dict:
    h = need("hidden_size")
    heads = need("num_attention_heads")
    bias = cfg.get("enable_bias", True)
    return dict(
        vocab_size=need("vocab_size"), hidden_size=h, num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or h // heads,
        max_positions=need("max_position_embeddings"), intermediate_size=need("ffn_dim"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), gated_mlp=False,
        activation=cfg.get("activation_function", "relu"), attention_bias=bias, out_bias=bias, mlp_bias=bias,
        norm="layernorm", pre_norm=cfg.get("do_layer_norm_before", True),
        word_embed_proj_dim=cfg.get("word_embed_proj_dim") or h,
        hidden_dropout=cfg.get("dropout", 0.1), attention_dropout=cfg.get("attention_dropout", 0.0),
    )


def tensors(s) -> list[Tensor]:
    h, f, wpd = s.hidden_size, s.intermediate_size, s.word_embed_proj_dim
    b, affine = s.attention_bias, s.config.get("layer_norm_elementwise_affine", True)
    p = "model.decoder."
    ts = [
        Tensor(p + "embed_tokens.weight", (s.vocab_size, wpd), "embed_tokens", None, "embeddings"),
        # OPT offsets learned positions by 2 (OPTLearnedPositionalEmbedding).
        Tensor(p + "embed_positions.weight", (s.max_positions + 2, h), "embed_positions", None, "embeddings"),
    ]
    if wpd != h:
        ts += linear(p, "project_out", wpd, h, False, None, "embeddings")
        ts += linear(p, "project_in", h, wpd, False, None, "embeddings")
    if s.pre_norm and not s.config.get("_remove_final_layer_norm", False):
        ts += norm(p, "final_layer_norm", h, affine, None) if affine else []
    for i in range(s.num_layers):
        lp = f"{p}layers.{i}."
        for m in ("k_proj", "v_proj", "q_proj", "out_proj"):
            ts += linear(lp + "self_attn.", m, h, h, b, i, "attention")
        if affine:
            ts += norm(lp, "self_attn_layer_norm", h, True, i)
        ts += linear(lp, "fc1", f, h, s.mlp_bias, i, "mlp")
        ts += linear(lp, "fc2", h, f, s.mlp_bias, i, "mlp")
        if affine:
            ts += norm(lp, "final_layer_norm", h, True, i)
    return ts + lm_head(s, wpd)


def _saved_per_token(ctx: Ctx) -> int:
    spec, cb = ctx.spec, ctx.cb
    h, f = spec.hidden_size, spec.intermediate_size
    drop = mask(spec.hidden_dropout)
    n = 2 * ctx.r * h  # the two LayerNorm inputs (the residual stream)
    n += (3 if ctx.amp else 1) * cb * h if ctx.keeps_linear_inputs else 0  # q/k/v input: shared, or one cast each
    n += attention(ctx)
    n += cb * h if ctx.keeps_linear_inputs else 0  # fc1's input (the second LayerNorm output, or its cast)
    n += cb * f  # ReLU saves its output, which is fc2's input too
    return n + 2 * drop * h


def saved(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    return _saved_per_token(ctx), score_bytes(ctx, fp32_softmax=True)


def saved_v4_28(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    """transformers 4.28: torch.max(scores + mask, min) saves its input (fp32 under autocast, where
    the mask is fp32), then the fp32 softmax output and the 16-bit probabilities."""
    cb = ctx.cb
    return _saved_per_token(ctx), (4 if ctx.amp else cb) + 4 + (cb if cb != 4 else 0)


OPT = register(Arch(
    model_types=("opt",), read=read, tensors=tensors, saved=saved,
    uncast=("embed_positions",),
    versions={HfVersion.V4_28: {**V4_28, "saved": saved_v4_28}},
))
