"""What autograd saves in one transformer layer during a training forward, per architecture.

Each function returns bytes per token (and per attention-score element, for eager attention) that
stay alive from a layer's forward until its backward, as transformers 5 runs the layer on a GPU:

- a linear layer saves its input only when its weight trains (autograd saves what the requested
  gradients need); under autocast each linear saves its own 16-bit cast of an fp32 input;
- LayerNorm saves its input; transformers' RMSNorm saves the fp32 upcast and the normalised value;
- eager attention saves the softmax output (fp32 where the model asks for it, or under autocast),
  the probabilities the second matmul reads, and a dropout mask (one byte) when dropout is on;
- SDPA (flash or memory-efficient kernel, `is_causal`, no mask) saves q, k, v and its output;
- dropout saves a bool mask (one byte per element) on CUDA.

Notation: h hidden, f intermediate, q = heads x head_dim, kv = key/value width, cb compute bytes,
r bytes of the residual stream (fp32 under autocast).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.options import Attention, Config, HfVersion, Scheme

ADAPTER_BYTES = 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype=True)


@dataclass(frozen=True, slots=True)
class Trains:
    """Which weights of a layer train: their linear layers save their inputs."""

    qkv: bool
    out: bool
    up: bool
    down: bool

    @classmethod
    def of(cls, cfg: Config) -> Trains:
        if cfg.scheme is Scheme.FT:
            return cls(True, True, True, True)
        return cls(False, False, False, False)  # LoRA's own paths are counted by lora_saved


def _mask(p: float) -> int:
    """Bytes per element a dropout saves: a bool mask when p > 0 in training."""
    return 1 if p > 0 else 0


def score_bytes(cfg: Config, spec, cb: int, amp: bool, *, fp32_softmax: bool) -> int:
    """Bytes per attention-score element an eager attention saves for backward.

    softmax output (fp32 when the model asks for it or under autocast, else cb); then either the
    16-bit probabilities the second matmul reads (a cast, when they differ), or with attention
    dropout its mask and output.
    """
    sm = 4 if (fp32_softmax or amp or cb == 4) else cb
    if spec.attention_dropout > 0:
        return sm + 1 + cb
    return sm + (cb if cb != sm else 0)


def _attention(cfg: Config, spec, cb: int, trains: Trains, *, repeat_kv: bool = False) -> int:
    """q, k, v and the output as the attention kernel saves them, plus o_proj's input."""
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
    return cb * (q + 2 * k_width) + (cb * q if trains.out else 0)


def opt_layer(cfg: Config, spec, cb: int, r: int, amp: bool, trains: Trains) -> tuple[int, int]:
    """OPT (pre-LayerNorm, ReLU MLP, dropout after attention and MLP)."""
    h, f = spec.hidden_size, spec.intermediate_size
    drop = _mask(spec.hidden_dropout)
    n = 2 * r * h  # the two LayerNorm inputs (the residual stream)
    n += (3 if amp else 1) * cb * h if trains.qkv else 0  # q/k/v input: shared, or one cast each
    n += _attention(cfg, spec, cb, trains)
    n += cb * h if trains.up else 0  # fc1's input (the second LayerNorm output, or its cast)
    n += cb * f  # ReLU saves its output, which is fc2's input too
    n += 2 * drop * h
    if cfg.hf_version is HfVersion.V4_28:
        # 4.28: torch.max(scores + mask, min) saves its input (fp32 under autocast, where the mask
        # is fp32), then the fp32 softmax output and the 16-bit probabilities.
        return n, (4 if amp else cb) + 4 + (cb if cb != 4 else 0)
    return n, score_bytes(cfg, spec, cb, amp, fp32_softmax=True)


def llama_layer(cfg: Config, spec, cb: int, r: int, amp: bool, trains: Trains) -> tuple[int, int]:
    """Llama, Mistral, Qwen2 (pre-RMSNorm, rotary, GQA, SiLU-gated MLP, no dropout)."""
    h, f = spec.hidden_size, spec.intermediate_size
    # RMSNorm: x.float() (x itself when already fp32), and, when its weight trains, the normalised
    # value cast back that `weight * x` saves (fp32 when the input is): 4 + cb, or 8; frozen: 4.
    norm = 4 + ((4 if r == 4 else cb) if trains.qkv else 0)
    n = 2 * norm * h
    if trains.qkv:
        n += (3 if amp else 1) * cb * h
    n += _attention(cfg, spec, cb, trains, repeat_kv=True)
    if trains.up:
        n += (2 if amp else 1) * cb * h  # gate and up read the second norm's output
    # act(gate) saves gate's output; act * up saves both factors; down saves the product.
    n += cb * f * (4 if trains.down else 3)
    return n, score_bytes(cfg, spec, cb, amp, fp32_softmax=True)


def gpt2_layer(cfg: Config, spec, cb: int, r: int, amp: bool, trains: Trains) -> tuple[int, int]:
    """GPT-2 (pre-LayerNorm, fused c_attn, tanh-GELU written out in Python, dropout everywhere)."""
    h, f = spec.hidden_size, spec.intermediate_size
    drop = _mask(spec.hidden_dropout)
    n = 2 * r * h
    n += cb * h if trains.qkv else 0  # c_attn's input
    n += _attention(cfg, spec, cb, trains)
    n += cb * h if trains.up else 0  # c_fc's input
    # gelu_new = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): saves x, tanh(.), 1 + tanh(.),
    # 0.5 x (4 tensors; fp32 tanh terms under autocast, where pow runs in fp32), and c_proj its output.
    gelu = (2 * cb + 2 * 4) if amp else 4 * cb
    n += f * (gelu + (cb if trains.down else 0))
    n += 2 * drop * h
    return n, score_bytes(cfg, spec, cb, amp, fp32_softmax=False)


def roberta_layer(cfg: Config, spec, cb: int, r: int, amp: bool, trains: Trains) -> tuple[int, int]:
    """RoBERTa (post-LayerNorm encoder, GELU MLP, dropout everywhere)."""
    h, f = spec.hidden_size, spec.intermediate_size
    drop = _mask(spec.hidden_dropout)
    n = 2 * r * h  # the two LayerNorm inputs (sum of a sublayer's output and its input)
    n += (3 if amp else 1) * cb * h if trains.qkv else 0
    n += _attention(cfg, spec, cb, trains)
    n += cb * h if trains.up else 0  # intermediate.dense's input
    n += cb * f * (2 if trains.down else 1)  # GELU's input, and output.dense's input
    n += 2 * drop * h
    return n, score_bytes(cfg, spec, cb, amp, fp32_softmax=False)


LAYERS = {"opt": opt_layer, "llama": llama_layer, "mistral": llama_layer, "qwen2": llama_layer,
          "gpt2": gpt2_layer, "roberta": roberta_layer}


def lora_saved_per_token(cfg: Config, spec, cb: int, wb: int, amp: bool, *, targets: int) -> int:
    """Bytes per token one layer's LoRA paths save: lora_A's input and lora_B's r-wide input.

    peft keeps adapters in fp32 and casts x to fp32 (`_cast_input_dtype`): one new copy per target
    for 16-bit models; fp32 models pass x itself (shared by the targets); under autocast each
    lora_A saves its own 16-bit cast.
    """
    h = spec.hidden_size
    if amp:
        x_saved = targets * h * cb
    elif wb == 4:
        x_saved = h * 4  # the projection input itself, shared by the targets
    else:
        x_saved = targets * h * ADAPTER_BYTES
    middle = targets * cfg.lora_rank * (cb if amp else ADAPTER_BYTES)
    return x_saved + middle
