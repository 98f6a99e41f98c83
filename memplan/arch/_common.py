"""Pieces every family shares: the Tensor record, tensor-list helpers, and the default layer and loss formulas.

Layer formulas return bytes per token (and per attention-score element, for eager attention) that
stay alive from a layer's forward until its backward, as transformers 5 runs the layer on a GPU:

- a linear layer saves its input only when its weight trains (autograd saves what the requested
  gradients need); under autocast each linear saves its own 16-bit cast of an fp32 input;
- LayerNorm saves its input; transformers' RMSNorm saves the fp32 upcast and the normalised value;
- eager attention saves the softmax output (fp32 where the model asks for it, or under autocast),
  the probabilities the second matmul reads, and a dropout mask (one byte) when dropout is on;
- SDPA (flash or memory-efficient kernel, `is_causal`, no mask) saves q, k, v and its output;
- dropout saves a bool mask (one byte per element) on CUDA.

Notation: h hidden, f intermediate, q = heads x head_dim, kv = key/value width, cb compute bytes,
r bytes of the residual stream (fp32 under autocast), T tokens, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.options import Attention, Config, Quant, Scheme
from memplan.overhead import round_block

if TYPE_CHECKING:
    from memplan.arch import Arch
    from memplan.spec import ModelSpec

LayerKind = str  # what a family calls one kind of layer ("dense"); `Arch.saved` dispatches on it


@dataclass(frozen=True, slots=True)
class Tensor:
    """One parameter: its transformers name, shape, the module's short name and its layer (or None).

    `transposed`: the weight is stored (in, out), as GPT-2's Conv1D does, instead of nn.Linear's (out, in).
    `itemsize`: bytes per element of a buffer that keeps its own dtype (int64 position ids); `linear`: the
    weight or bias of an nn.Linear / Conv1D other than the output head (what peft's all-linear wraps).
    """

    name: str
    shape: tuple[int, ...]
    module: str
    layer: int | None
    group: str  # embeddings | attention | mlp | norms | lm_head
    transposed: bool = False
    itemsize: int = 4
    linear: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def fan_in(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def fan_out(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]


@dataclass(frozen=True, slots=True)
class Ctx:
    """One configuration's sizes, as the layer and loss formulas read them."""

    cfg: Config
    spec: ModelSpec
    arch: Arch  # the family as the configured transformers release runs it
    tokens: int  # T = batch * seq_in (prompt tokens included)
    seq_q: int  # query length
    seq_k: int  # key length (prefix tokens included)
    wb: int  # bytes per weight element
    cb: int  # bytes per compute element
    r: int  # residual-stream bytes
    amp: bool
    adapter_bytes: int = 4  # adapter weights as they compute: peft's fp32; FSDP2's param_dtype under its mixed precision

    @property
    def trains(self) -> bool:
        """The layers' own weights train (full fine-tuning); LoRA's paths are counted apart."""
        return self.cfg.scheme is Scheme.FT

    @property
    def keeps_linear_inputs(self) -> bool:
        """The layers' linear modules save their input for backward: their weights train, or
        bitsandbytes' int8 matmul (`--quant int8`: MatMul8bitLt keeps A) holds it."""
        return self.trains or self.cfg.quant is Quant.INT8


# ---- tensor lists ---------------------------------------------------------------------------


def linear(prefix: str, module: str, out_f: int, in_f: int, bias: bool, layer, group) -> list[Tensor]:
    ts = [Tensor(f"{prefix}{module}.weight", (out_f, in_f), module, layer, group, linear=True)]
    if bias:
        ts.append(Tensor(f"{prefix}{module}.bias", (out_f,), module, layer, group, linear=True))
    return ts


def norm(prefix: str, module: str, h: int, bias: bool, layer, group="norms") -> list[Tensor]:
    ts = [Tensor(f"{prefix}{module}.weight", (h,), module, layer, group)]
    if bias:
        ts.append(Tensor(f"{prefix}{module}.bias", (h,), module, layer, group))
    return ts


def lm_head(spec: ModelSpec, width: int) -> list[Tensor]:
    """An untied lm_head (V x width); a tied one is the token embedding, listed once."""
    if spec.tie_word_embeddings:
        return []
    return [Tensor("lm_head.weight", (spec.vocab_size, width), "lm_head", None, "lm_head")]


def no_buffers(spec: ModelSpec) -> list[Tensor]:
    return []


def uniform(spec: ModelSpec) -> tuple[LayerKind, ...]:
    """L identical layers."""
    return ("dense",) * spec.num_layers


# ---- layer formulas -------------------------------------------------------------------------


def mask(p: float) -> int:
    """Bytes per element a dropout saves: a bool mask when p > 0 in training."""
    return 1 if p > 0 else 0


def score_bytes(ctx: Ctx, *, fp32_softmax: bool) -> int:
    """Bytes per attention-score element an eager attention saves for backward.

    softmax output (fp32 when the model asks for it or under autocast, else cb); then either the
    16-bit probabilities the second matmul reads (a cast, when they differ), or with attention
    dropout its mask and output.
    """
    cb = ctx.cb
    sm = 4 if (fp32_softmax or ctx.amp or cb == 4) else cb
    if ctx.spec.attention_dropout > 0:
        return sm + 1 + cb
    return sm + (cb if cb != sm else 0)


def attention(ctx: Ctx, *, repeat_kv: bool = False) -> int:
    """q, k, v and the output as the attention kernel saves them, plus o_proj's input."""
    cfg, spec, cb = ctx.cfg, ctx.spec, ctx.cb
    q, kv = spec.q_dim, spec.kv_dim
    if cfg.attention is Attention.SDPA:
        # SDPA saves q, k, v (GQA natively, enable_gqa) and its output, which is also o_proj's input.
        # Prefix tuning makes keys longer than queries, so transformers builds a mask, and with a mask
        # it repeats GQA keys and values to every head before SDPA.
        if repeat_kv and cfg.scheme is Scheme.PREFIX:
            kv = q
        return cb * (2 * q + 2 * kv)
    # Eager: the matmuls save contiguous copies of q, k, v (k and v repeated to every head for GQA),
    # and o_proj saves the transposed output's contiguous copy.
    k_width = q if repeat_kv and spec.num_kv_heads != spec.num_heads else kv
    return cb * (q + 2 * k_width) + (cb * q if ctx.keeps_linear_inputs else 0)


def attention_live(ctx: Ctx, *, residual: bool = False) -> int:
    """Bytes per token inside one attention block's no-grad forward, besides its scores: q, k, v, the
    output, and the normed input; `residual`: also the layer's input, which the residual add keeps."""
    spec = ctx.spec
    return (2 * spec.q_dim + 2 * spec.kv_dim) * ctx.cb + (2 if residual else 1) * spec.hidden_size * ctx.r


def dense_live(kind: LayerKind, ctx: Ctx) -> int:
    """Largest set of temporaries inside one attention + MLP layer's no-grad forward, besides scores."""
    spec, cb = ctx.spec, ctx.cb
    mlp = (3 if spec.gated_mlp else 2) * spec.intermediate_size * cb + spec.hidden_size * ctx.r
    return max(attention_live(ctx), mlp)


# ---- the loss -------------------------------------------------------------------------------


def causal_loss(ctx: Ctx) -> tuple[int, int]:
    """(upcast, loss) bytes per logit: transformers' ForCausalLMLoss upcasts with `.float()`: fp32 loss."""
    return (4 if ctx.cb != 4 else 0), 4


def masked_loss(ctx: Ctx) -> tuple[int, int]:
    """(upcast, loss) bytes per logit of a masked-LM head: CrossEntropyLoss on the logits as they are
    (fp32 under autocast, which casts them for log_softmax)."""
    return (4 if ctx.amp else 0), (4 if ctx.amp or ctx.cb == 4 else ctx.cb)


def causal_logits_forward(ctx: Ctx) -> tuple[int, int]:
    """(kept, transient) bytes of logits and loss at the end of the forward pass.

    transformers 5: logits (cb), their upcast and the log_softmax output, all alive while the loss
    is computed.
    """
    up, loss = ctx.arch.loss(ctx)
    return ctx.tokens * ctx.spec.vocab_size * (ctx.cb + up + loss), 0


def causal_logits_backward(ctx: Ctx) -> int:
    """Bytes of the loss's backward at its peak: log_softmax output, nll gradient, log_softmax gradient.

    The logits themselves died with the model output; all three are in the loss dtype.
    """
    return ctx.tokens * ctx.spec.vocab_size * 3 * ctx.arch.loss(ctx)[1]


def chunk_tokens(ctx: Ctx) -> int:
    """Tokens in the largest chunk of `--loss chunked`: torch.chunk cuts seq into pieces of ceil(seq / n)."""
    return ctx.cfg.batch * -(-ctx.seq_q // ctx.cfg.loss_chunks)


def chunked_logits_forward(ctx: Ctx) -> tuple[int, int]:
    """(kept, transient) bytes of `--loss chunked` at the last chunk of the forward pass.

    Per chunk of Tc tokens: lm_head's logits (cb) die once `.float()` has copied them, and the fp32
    logits (the upcast, or the logits themselves in fp32) live while log_softmax writes its fp32
    output: Tc * V * max(cb + up, 4 + loss). With autograd every chunk's log_softmax output stays
    saved for backward, so the earlier chunks keep (T - Tc) * V * loss; a no-grad forward keeps nothing.
    """
    v, tc = ctx.spec.vocab_size, chunk_tokens(ctx)
    up, loss = ctx.arch.loss(ctx)
    kept = (ctx.tokens - tc) * v * loss + head_casts(ctx) if ctx.cfg.method.is_fo else 0
    return kept, tc * v * max(ctx.cb + up, 4 + loss)


def head_casts(ctx: Ctx) -> int:
    """Autocast casts a frozen lm_head once per call and each chunk's backward keeps its own 16-bit
    copy: (chunks - 1) * V * width * cb beyond the one copy the full loss keeps (a trainable head
    sits in the cast cache, cast once)."""
    if not ctx.amp or ctx.trains:
        return 0
    piece = -(-ctx.seq_q // ctx.cfg.loss_chunks)
    chunks = -(-ctx.seq_q // piece)
    return (chunks - 1) * round_block(ctx.spec.vocab_size * ctx.spec.word_embed_proj_dim * ctx.cb)


def chunked_logits_backward(ctx: Ctx) -> int:
    """Bytes of `--loss chunked`'s backward at its peak: every chunk's saved log_softmax output, and,
    for the first chunk it reaches (the last one), the nll gradient and the log_softmax gradient:
    T * V * loss + 2 * Tc * V * loss."""
    loss = ctx.arch.loss(ctx)[1]
    return (ctx.tokens + 2 * chunk_tokens(ctx)) * ctx.spec.vocab_size * loss + head_casts(ctx)


def chunked_loss_refusal(cfg: Config, *, masked: bool) -> str | None:
    """Why `--loss chunked` cannot run this configuration, or None."""
    if masked:
        return "--loss chunked needs a causal LM; masked-LM heads (roberta) compute their loss in full"
    if cfg.method.family == "fg":
        return "--loss chunked is not modelled for forward-grad (its dual forward calls the model whole)"
    if cfg.scheme in (Scheme.PREFIX, Scheme.PROMPT):
        return (f"--loss chunked supports --scheme ft and lora; --scheme {cfg.scheme.value} feeds its "
                "virtual tokens through peft's own forward")
    return None


def v4_28_logits_forward(ctx: Ctx) -> tuple[int, int]:
    """transformers 4.28: logits (cb), shift_logits' contiguous copy (cb), log_softmax output (cb,
    fp32 under autocast, whose input cast is transient)."""
    tv = ctx.tokens * ctx.spec.vocab_size
    lsm = 4 if ctx.amp else ctx.cb
    return tv * (2 * ctx.cb + lsm), tv * (4 if ctx.amp else 0)


def v4_28_logits_backward(ctx: Ctx) -> int:
    """transformers 4.28: three logits-sized tensors in the log_softmax dtype."""
    return ctx.tokens * ctx.spec.vocab_size * 3 * (4 if ctx.amp else ctx.cb)


# transformers 4.28 as MeZO and ZO-Bench pin it: every causal LM shifted its logits inside the model
# and kept the KV cache (use_cache defaulted to True) during a forward.
V4_28 = {"logits_forward": v4_28_logits_forward, "logits_backward": v4_28_logits_backward,
         "kv_cache_by_default": True}
