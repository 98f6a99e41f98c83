"""RoBERTa (post-LayerNorm encoder, GELU MLP, dropout everywhere), trained as a masked LM."""

from __future__ import annotations

from memplan.arch import Arch, register
from memplan.arch._common import V4_28, Ctx, LayerKind, Tensor, attention, linear, mask, masked_loss, norm, score_bytes
from memplan.options import HfVersion


def read(cfg: dict, need) -> dict:
    h = need("hidden_size")
    heads = need("num_attention_heads")
    return dict(
        vocab_size=need("vocab_size"), hidden_size=h, num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim") or h // heads,
        max_positions=need("max_position_embeddings"), word_embed_proj_dim=h,
        intermediate_size=need("intermediate_size"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True), gated_mlp=False,
        activation=cfg.get("hidden_act", "gelu"), attention_bias=True, out_bias=True, mlp_bias=True,
        norm="layernorm", pre_norm=False, type_vocab_size=cfg.get("type_vocab_size", 2),
        hidden_dropout=cfg.get("hidden_dropout_prob", 0.1),
        attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
    )


def tensors(s) -> list[Tensor]:
    h, f = s.hidden_size, s.intermediate_size
    p = "roberta.embeddings."
    ts = [
        Tensor(p + "word_embeddings.weight", (s.vocab_size, h), "word_embeddings", None, "embeddings"),
        Tensor(p + "position_embeddings.weight", (s.max_positions, h), "position_embeddings", None, "embeddings"),
        Tensor(p + "token_type_embeddings.weight", (s.type_vocab_size, h), "token_type_embeddings", None,
               "embeddings"),
    ]
    ts += norm(p, "LayerNorm", h, True, None)
    for i in range(s.num_layers):
        lp = f"roberta.encoder.layer.{i}."
        for m in ("query", "key", "value"):
            ts += linear(lp + "attention.self.", m, h, h, True, i, "attention")
        ts += linear(lp + "attention.output.", "dense", h, h, True, i, "attention")
        ts += norm(lp + "attention.output.", "LayerNorm", h, True, i)
        ts += linear(lp + "intermediate.", "dense", f, h, True, i, "mlp")
        ts += linear(lp + "output.", "dense", h, f, True, i, "mlp")
        ts += norm(lp + "output.", "LayerNorm", h, True, i)
    # RobertaForMaskedLM head: dense + layer_norm + decoder (tied to word_embeddings) + bias.
    ts += linear("lm_head.", "dense", h, h, True, None, "lm_head")
    ts += norm("lm_head.", "layer_norm", h, True, None, group="lm_head")
    ts.append(Tensor("lm_head.bias", (s.vocab_size,), "lm_head", None, "lm_head"))
    if not s.tie_word_embeddings:
        # transformers 5 ties decoder.bias to lm_head.bias only together with the word embeddings
        # (_tied_weights_keys), so an untied head carries both vectors; 4.x always shared them.
        ts.append(Tensor("lm_head.decoder.weight", (s.vocab_size, h), "decoder", None, "lm_head"))
        ts.append(Tensor("lm_head.decoder.bias", (s.vocab_size,), "decoder", None, "lm_head"))
    return ts


def buffers(s) -> list[Tensor]:
    """The embeddings' int64 position and token-type ids, one per position (1 x max_positions each)."""
    return [Tensor(f"roberta.embeddings.{n}", (1, s.max_positions), "embeddings", None, "buffers", itemsize=8)
            for n in ("position_ids", "token_type_ids")]


def saved(kind: LayerKind, ctx: Ctx) -> tuple[int, int]:
    spec, cb, trains = ctx.spec, ctx.cb, ctx.trains
    h, f = spec.hidden_size, spec.intermediate_size
    drop = mask(spec.hidden_dropout)
    n = 2 * ctx.r * h  # the two LayerNorm inputs (sum of a sublayer's output and its input)
    n += (3 if ctx.amp else 1) * cb * h if trains else 0
    n += attention(ctx)
    n += cb * h if trains else 0  # intermediate.dense's input
    n += cb * f * (2 if trains else 1)  # GELU's input, and output.dense's input
    n += 2 * drop * h
    return n, score_bytes(ctx, fp32_softmax=False)


ROBERTA = register(Arch(
    model_types=("roberta",), read=read, tensors=tensors, buffers=buffers, saved=saved, loss=masked_loss,
    objective="masked",
    lora_targets=("query", "value"), token_embedding="word_embeddings",
    uncast=("position_embeddings", "token_type_embeddings"), versions={HfVersion.V4_28: V4_28},
))
