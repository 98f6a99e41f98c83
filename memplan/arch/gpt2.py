"""GPT-2 (pre-LayerNorm, fused c_attn, Conv1D weights stored (in, out), tanh-GELU, dropout everywhere)."""

from __future__ import annotations

from memplan.arch import Arch, register
from memplan.arch._common import V4_28, Ctx, LayerKind, Tensor, attention, lm_head, mask, norm, score_bytes
from memplan.options import HfVersion


def read(cfg: dict, need) -> dict:
    h = need("n_embd")
    heads = need("n_head")
    return dict(
        vocab_size=need("vocab_size"), hidden_size=h, num_layers=need("n_layer"),
        num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
        intermediate_size=cfg.get("n_inner") or 4 * h, max_positions=need("n_positions"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), gated_mlp=False,
        activation=cfg.get("activation_function", "gelu_new"), attention_bias=True, out_bias=True,
        mlp_bias=True, norm="layernorm", pre_norm=True, word_embed_proj_dim=h,
        hidden_dropout=cfg.get("resid_pdrop", 0.1), attention_dropout=cfg.get("attn_pdrop", 0.1),
    )


def _conv1d(prefix: str, module: str, in_f: int, out_f: int, layer, group) -> list[Tensor]:
    """Conv1D: weight (in, out) and bias (out,)."""
    return [Tensor(f"{prefix}{module}.weight", (in_f, out_f), module, layer, group, transposed=True, linear=True),
            Tensor(f"{prefix}{module}.bias", (out_f,), module, layer, group, linear=True)]


def tensors(s) -> list[Tensor]:
    h, f = s.hidden_size, s.intermediate_size
    ts = [
        Tensor("transformer.wte.weight", (s.vocab_size, h), "wte", None, "embeddings"),
        Tensor("transformer.wpe.weight", (s.max_positions, h), "wpe", None, "embeddings"),
    ]
    for i in range(s.num_layers):
        lp = f"transformer.h.{i}."
        ts += norm(lp, "ln_1", h, True, i)
        ts += _conv1d(lp + "attn.", "c_attn", h, 3 * h, i, "attention")
        ts += _conv1d(lp + "attn.", "c_proj", h, h, i, "attention")
        ts += norm(lp, "ln_2", h, True, i)
        ts += _conv1d(lp + "mlp.", "c_fc", h, f, i, "mlp")
        ts += _conv1d(lp + "mlp.", "c_proj", f, h, i, "mlp")
    ts += norm("transformer.", "ln_f", h, True, None)
    return ts + lm_head(s, h)


def saved(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    spec, cb = ctx.spec, ctx.cb
    h, f = spec.hidden_size, spec.intermediate_size
    drop = mask(spec.hidden_dropout)
    n = 2 * ctx.r * h
    n += cb * h if ctx.keeps_linear_inputs else 0  # c_attn's input
    n += attention(ctx)
    n += cb * h if ctx.keeps_linear_inputs else 0  # c_fc's input
    # gelu_new = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): saves x, tanh(.), 1 + tanh(.),
    # 0.5 x (4 tensors; fp32 tanh terms under autocast, where pow runs in fp32), and c_proj its output.
    gelu = (2 * cb + 2 * 4) if ctx.amp else 4 * cb
    n += f * (gelu + (cb if ctx.keeps_linear_inputs else 0))
    n += 2 * drop * h
    return n, score_bytes(ctx, fp32_softmax=False)


GPT2 = register(Arch(
    model_types=("gpt2",), read=read, tensors=tensors, saved=saved, lora_targets=("c_attn",),
    token_embedding="wte", uncast=("wpe",), versions={HfVersion.V4_28: V4_28},
))
