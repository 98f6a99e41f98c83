"""The analytic estimator: closed-form bytes per category and per phase; imports no torch.

Each phase's peak is built from small formulas below. They follow what the step code keeps alive
on a GPU (see `memplan/steps.py`): which tensors autograd saves per layer in transformers' modules,
which temporaries a ZO perturbation or an optimizer step makes. The peak is the max over phases.

Notation in comments: T = batch * seq tokens, h hidden, f intermediate, a heads, kv = key/value
width, V vocab, L layers, E = batch * heads * seq_q * seq_k attention scores, wb / cb bytes per
element of weights / compute, r bytes of the residual stream (fp32 under autocast).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from memplan import methods, quant, savers, sharding
from memplan.arch import Ctx
from memplan.arch._common import attention_live, chunked_logits_backward, chunked_logits_forward, chunked_loss_refusal
from memplan.errors import MemplanError
from memplan.result import Category, Phase
from memplan.options import Attention, Config, Dtype, Loss, Quant, Scheme
from memplan.overhead import round_block
from memplan.spec import ModelSpec, per_spec

C = Category
ALL_LINEAR = "all-linear"  # peft's shorthand: every nn.Linear / Conv1D but the output head
ADAPTER_BYTES = 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype=True)
Shapes = Ctx  # the sizes of one configuration, as formulas read them


def not_modelled(cfg: Config) -> str | None:
    """Options a tier accepts in `Config` but cannot estimate, or None (a layout no library runs,
    a quantised base that cannot train)."""
    if cfg.num_gpus > 1:
        if cfg.quant is not Quant.NONE:
            return "--quant with --num-gpus above 1 is not modelled yet (FSDP + QLoRA): estimate one GPU"
        savers_on = [flag for flag, on in (("--optim " + cfg.optim.value, cfg.optim.value in (
            "8bit", "paged-8bit", "adafactor")), ("--activation-offload", cfg.activation_offload),
            ("--optimizer-in-backward", cfg.optimizer_in_backward)) if on]
        if savers_on:
            return (f"{', '.join(savers_on)} with --num-gpus above 1 is not modelled yet: "
                    "estimate one GPU, or drop the option")
    return quant.refusal(cfg) or sharding.refusal(cfg)


def host_bytes(cfg: Config, spec: ModelSpec) -> int:
    """Host memory the step needs on one machine (offloaded state, paged optimizer state, offloaded
    activations); 0 when everything is on the GPU."""
    layout = 0 if sharding.is_plain(cfg) else sharding.host_bytes(inputs(cfg, spec, None))
    return layout + savers.paged_host_bytes(cfg, spec) + offloaded_activation_bytes(cfg, spec)


def offloaded_activation_bytes(cfg: Config, spec: ModelSpec) -> int:
    """--activation-offload: every layer's saved tensors, in host memory at the end of forward."""
    if not cfg.activation_offload:
        return 0
    from memplan.methods import fo

    s = shapes(cfg, spec)
    return fo.layer_saved(Inputs(cfg, spec, s, {}, trainable(cfg, spec), None))[1]


def shapes(cfg: Config, spec: ModelSpec) -> Ctx:
    refuse = not_modelled(cfg) or savers.refusal(cfg)
    if refuse:
        raise MemplanError(refuse)
    seq_in = cfg.seq + (cfg.prompt_tokens if cfg.scheme is Scheme.PROMPT else 0)
    seq_k = seq_in + (cfg.prefix_tokens if cfg.scheme is Scheme.PREFIX else 0)
    amp = cfg.dtype.is_amp
    arch = spec.arch.at(cfg.hf_version)
    if cfg.loss is Loss.CHUNKED:
        refuse = chunked_loss_refusal(cfg, masked=arch.objective == "masked")
        if refuse:
            raise MemplanError(refuse)
        arch = _chunked(arch)
    if cfg.quant is not Quant.NONE:
        refuse = quant.refusal(cfg, masked=arch.objective == "masked")
        if refuse:
            raise MemplanError(refuse)
        # prepare_model_for_kbit_training leaves fp32 embeddings, norms and lm_head: an fp32 stream.
        return Ctx(cfg=cfg, spec=spec, arch=arch, tokens=cfg.batch * seq_in, seq_q=seq_in, seq_k=seq_k,
                   wb=4, cb=4, r=4, amp=False)
    return Ctx(
        cfg=cfg, spec=spec, arch=arch, tokens=cfg.batch * seq_in, seq_q=seq_in,
        seq_k=seq_k, wb=cfg.dtype.weight_bytes, cb=cfg.dtype.compute_bytes,
        r=4 if amp else cfg.dtype.compute_bytes, amp=amp,
    )


@lru_cache(maxsize=None)
def _chunked(arch):
    """`arch` with `--loss chunked`'s logits formulas."""
    return replace(arch, logits_forward=chunked_logits_forward, logits_backward=chunked_logits_backward)


# ---- parameters -----------------------------------------------------------------------------


@per_spec
def weight_bytes(spec: ModelSpec, wb: int) -> int:
    """Every parameter tensor (rounded to 512 B) plus buffers: sum round512(numel * wb)."""
    params = sum(round_block(t.numel * wb) for t in spec.tensors)
    return params + sum(round_block(t.numel * t.itemsize) for t in spec.buffers)  # rotary: fp32; ids: int64


def model_weight_bytes(cfg: Config, spec: ModelSpec, s: Ctx) -> int:
    """The frozen or trained model's own tensors: in --dtype, or quantised (`quantised_weight_bytes`)."""
    if cfg.quant is Quant.NONE:
        return weight_bytes(spec, s.wb)
    return quantised_weight_bytes(spec, cfg.quant)


@per_spec
def quantised_weight_bytes(spec: ModelSpec, q: Quant) -> int:
    """bitsandbytes' layout (`memplan.quant`): each quantised weight with its state; every other
    parameter (embeddings, norms, lm_head, biases) in fp32, as prepare_model_for_kbit_training casts it."""
    params = sum(quant.tensor_bytes(q, t) if quant.is_quantised(t) else round_block(t.numel * 4)
                 for t in spec.tensors)
    return params + sum(round_block(t.numel * 4) for t in spec.buffers)


@per_spec
def cast_cache_bytes(spec: ModelSpec, cb: int) -> int:
    """16-bit copies autocast makes of the weights that feed matmuls (linear layers and the lm_head).

    Embedding lookups and norms run on the fp32 weights; a tied token embedding is cast for the lm_head.
    """
    total = 0
    arch = spec.arch
    for t in spec.tensors:
        if t.group == "norms" or t.module in arch.uncast or "norm" in t.module.lower():
            continue
        if t.group == "embeddings" and t.module == arch.token_embedding and not spec.tie_word_embeddings:
            continue  # untied: the lm_head has its own weight
        total += round_block(t.numel * cb)
    return total


@dataclass(frozen=True, slots=True)
class Trainable:
    """What trains: parameter count, bytes (each tensor rounded to 512 B), largest tensor, tensors."""

    params: int
    bytes: int
    largest_bytes: int
    count: int


def trainable(cfg: Config, spec: ModelSpec) -> Trainable:
    """What trains under `cfg`'s scheme; only the fields that scheme reads reach the cache key."""
    if cfg.scheme is Scheme.FT:
        return _trainable(spec, Scheme.FT, cfg.dtype.weight_bytes)
    if cfg.scheme is Scheme.LORA:
        return _trainable(spec, Scheme.LORA, cfg.lora_rank, lora_targets(cfg, spec))
    if cfg.scheme is Scheme.PREFIX:
        return _trainable(spec, Scheme.PREFIX, cfg.prefix_tokens)
    return _trainable(spec, Scheme.PROMPT, cfg.prompt_tokens)


@per_spec
def _trainable(spec: ModelSpec, scheme: Scheme, *args) -> Trainable:
    ts = trainable_tensors(spec, scheme, *args)
    return Trainable(params=sum(n for n, _ in ts), bytes=params_bytes(ts), largest_bytes=largest_bytes(ts),
                     count=len(ts))


def lora_targets(cfg: Config, spec: ModelSpec) -> tuple[str, ...]:
    return tuple(cfg.lora_targets) or spec.default_lora_targets


def trainable_tensors(spec: ModelSpec, scheme: Scheme, *args) -> list[tuple[int, int]]:
    """(numel, bytes per element) of every trainable tensor.

    args: ft (weight bytes), lora (rank, targets), prefix (tokens), prompt (tokens).
    """
    if scheme is Scheme.FT:
        (wb,) = args
        return [(t.numel, wb) for t in spec.tensors]
    if scheme is Scheme.LORA:
        # lora_A: r x in, lora_B: out x r, for every targeted weight matrix.
        rank, targets = args
        out = []
        every_linear = tuple(targets) == (ALL_LINEAR,)
        if ALL_LINEAR in targets and not every_linear:
            raise MemplanError(f"--lora-targets: {ALL_LINEAR} stands alone (it already names every linear layer); "
                               f"got {', '.join(targets)}")
        if every_linear and any(len(t.shape) == 3 for t in spec.tensors):
            raise MemplanError(f"--lora-targets all-linear on {spec.name}: peft also adapts its stacked expert "
                               "tensors and router there, which the analytic tier does not model yet; name the "
                               "modules (e.g. q_proj,v_proj) or run `memplan trace`")
        for t in spec.tensors:
            if every_linear and t.linear and len(t.shape) == 2 or \
                    t.module in targets and t.layer is not None and len(t.shape) == 2:
                out += [(rank * t.fan_in, ADAPTER_BYTES), (t.fan_out * rank, ADAPTER_BYTES)]
        if not out:
            linear = sorted({t.module for t in spec.tensors if t.layer is not None and len(t.shape) == 2})
            raise MemplanError(f"LoRA targets {', '.join(sorted(targets))} match no module of {spec.name}; "
                               f"its layers' linear modules: {', '.join(linear)}")
        return out
    (tokens,) = args
    if scheme is Scheme.PREFIX:
        # peft prefix encoder: Embedding(tokens, L * 2 * kv_dim), no reparameterisation.
        return [(tokens * spec.num_layers * 2 * spec.kv_dim, ADAPTER_BYTES)]
    return [(tokens * spec.word_embed_proj_dim, ADAPTER_BYTES)]  # prompt: Embedding(tokens, token dim)


def params_bytes(tensors: list[tuple[int, int]]) -> int:
    """sum round512(numel * bytes) over tensors."""
    return sum(round_block(n * b) for n, b in tensors)


def largest_bytes(tensors: list[tuple[int, int]]) -> int:
    return max(round_block(n * b) for n, b in tensors)


def state_copies(cfg: Config) -> int:
    """Trainable-sized buffers an optimizer keeps between steps (momentum 1, Adam 2, ZO q>1 +1)."""
    return methods.get(cfg.method).state_copies(cfg)


# ---- activations ----------------------------------------------------------------------------


def scores(cfg: Config, spec: ModelSpec, s: Shapes) -> int:
    """E = batch * heads * seq_q * seq_k attention-score elements per layer (eager only)."""
    return scores_elements(cfg, spec, s) if cfg.attention is Attention.EAGER else 0


def scores_elements(cfg: Config, spec: ModelSpec, s: Shapes) -> int:
    """E = batch * heads * seq_q * seq_k: one layer's attention scores, whichever kernel computes them."""
    return cfg.batch * spec.num_heads * s.seq_q * s.seq_k


def scores_transient_per_element(cfg: Config, s: Shapes) -> int:
    """Peak bytes per score element while one layer's attention runs (no grad).

    Masked scores (cb, fp32 under autocast) + softmax's fp32 output + its cast back to cb; bf16
    scores are first copied to fp32 inside softmax (ATen's `toType`: only CUDA fp16 has a fused
    half-to-float kernel), so at the softmax the masked scores, that copy and the output live."""
    masked = 4 if s.amp else s.cb
    after = masked + 4 + (s.cb if s.cb != 4 else 0)
    return max(after, masked + 8) if cfg.dtype is Dtype.BF16 else after


def lora_saved_per_token(cfg: Config, spec: ModelSpec, s: Ctx, *, targets: int) -> int:
    """Bytes per token one layer's LoRA paths save: lora_A's input and lora_B's r-wide input.

    peft casts x to the adapters' dtype (`_cast_input_dtype`; adapters are fp32, or FSDP2's 16-bit
    param_dtype under its mixed precision): one new copy per target when that differs from the
    stream's (16-bit models, fp32 adapters); otherwise x itself, shared by the targets; under
    autocast each lora_A saves its own 16-bit cast.
    With lora_dropout > 0, each target's `nn.Dropout` saves a bool mask (1 byte per element) and
    lora_A saves the dropped-out copy in the adapters' dtype instead of x (under autocast: its
    16-bit cast), so the targets no longer share x.
    """
    h = spec.hidden_size
    mask = 1 if cfg.lora_dropout > 0 else 0
    ab = s.adapter_bytes
    if s.amp:
        x_saved = targets * h * (s.cb + mask)
    elif mask:
        x_saved = targets * h * (ab + mask)
    elif ab == s.cb:
        # the projection input itself, shared by the targets (and by an int8 base layer, which saves it too)
        x_saved = 0 if s.keeps_linear_inputs else h * ab
    else:
        x_saved = targets * h * ab
    middle = targets * cfg.lora_rank * (s.cb if s.amp else ab)
    return x_saved + middle


def lora_unsaved_masks(cfg: Config, spec: ModelSpec, s: Ctx, *, targets: int) -> int:
    """Bytes of dropout masks that `lora_saved_per_token` counts but the first layer does not save.

    Dropout saves its mask only when its input needs a gradient: the first layer's attention input
    comes from frozen embeddings, so its targets' masks are never saved (T * targets * h).
    """
    return s.tokens * targets * spec.hidden_size if cfg.lora_dropout > 0 else 0


def dequantised_weight_bytes(cfg: Config, spec: ModelSpec, *, backward: bool) -> int:
    """One layer's weight dequantised while its matmul runs (`--quant`), the largest layer's: 0 unquantised.

    4-bit: the weight in the compute dtype (CUDA's `gemm_4bit` inside the op in forward, on its unfused
    path; `MatMul4Bit`'s backward as an op output); int8: `CB * SCB` in fp32 (`memplan.quant.dequantised_bytes`).
    """
    if cfg.quant is Quant.NONE:
        return 0
    return max(quant.dequantised_bytes(cfg, t, backward=backward) for t in spec.tensors if quant.is_quantised(t))


def quantised_matmul_bytes(cfg: Config, spec: ModelSpec, s: Ctx) -> int:
    """The largest quantised layer's forward in flight (`--quant`), beyond what the layers save: its
    dequantised weight, its input cast to the compute dtype and its output in it; and its fp32 input
    when nothing saves it (a frozen 4-bit layer's; int8 layers save theirs)."""
    if cfg.quant is Quant.NONE:
        return 0
    cc = quant.compute_dtype(cfg).compute_bytes
    own = 0 if s.keeps_linear_inputs else s.cb
    return max(quant.dequantised_bytes(cfg, t, backward=False)
               + s.tokens * (t.fan_in * (cc + own) + t.fan_out * cc)
               for t in spec.tensors if quant.is_quantised(t))


def int8_inputs_beside_checkpoints(cfg: Config, spec: ModelSpec, s: Ctx) -> int:
    """Every int8 layer's input, which gradient checkpointing does not drop (`--quant int8`).

    bitsandbytes' int8 matmuls keep their input as an attribute of the autograd context (`ctx.A`,
    `ctx.tensors`), not through `save_for_backward`, so checkpointing's saved-tensor hooks never see
    it: the linear inputs of all layers stay alive from forward to backward as without checkpointing.
    """
    if cfg.quant is not Quant.INT8:
        return 0
    first = 0 if cfg.scheme is Scheme.PROMPT else s.tokens * spec.hidden_size * s.cb  # layer 0's attention input
    return s.tokens * s.cb * quant.layer_input_width(spec) - first


def quant_unsaved_inputs(cfg: Config, spec: ModelSpec, s: Ctx) -> int:
    """Bytes of int8 layers' inputs that the arch formulas count (`Ctx.keeps_linear_inputs`) but the
    first layer does not save: its attention input comes from frozen embeddings, so MatMul8bitLt keeps
    no copy of it (T * h in fp32); LoRA without dropout saves that same tensor for its adapters."""
    if cfg.quant is not Quant.INT8 or cfg.scheme is Scheme.PROMPT:
        return 0
    if cfg.scheme is Scheme.LORA and cfg.lora_dropout == 0:
        return 0
    return s.tokens * spec.hidden_size * s.cb


def fg_logits(cfg: Config, spec: ModelSpec, s: Shapes) -> tuple[int, int]:
    """(primal, tangent) bytes of the logits and loss in a dual forward.

    primal: logits (cb), upcast, log_softmax output and its exp (the log_softmax JVP needs the
    probabilities); tangent: logits' tangent (cb), its upcast, and the log_softmax output's tangent.
    """
    tv = s.tokens * spec.vocab_size
    up, loss = s.arch.loss(s)
    return tv * (s.cb + up + 2 * loss), tv * (s.cb + up + loss)


# ---- phases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a method's phase builder reads: the request, the model, its sizes, the bytes every phase
    holds (`base`: weights and optimizer state), what trains, and the GPU family (workspaces)."""

    cfg: Config
    spec: ModelSpec
    s: Ctx
    base: dict[Category, int]
    train: Trainable
    fam: object  # memplan.hardware.Family


def phases(cfg: Config, spec: ModelSpec, gpu_family) -> dict[Phase, dict[Category, int]]:
    """Bytes per category at the peak of each phase of one steady-state step (per GPU: `memplan.sharding`)."""
    return sharding.phases(inputs(cfg, spec, gpu_family), methods.get(cfg.method).phases)


def inputs(cfg: Config, spec: ModelSpec, gpu_family) -> Inputs:
    """What a method's phases read, for the whole model on one device."""
    s = shapes(cfg, spec)
    weights = model_weight_bytes(cfg, spec, s)
    train = trainable(cfg, spec)
    train_bytes = train.bytes
    if cfg.scheme is not Scheme.FT:
        weights += train_bytes  # adapters live beside the frozen model
    state = state_copies(cfg) * train_bytes
    by_optim = savers.optimizer_state_bytes(cfg, spec, state)
    if by_optim is not None:  # fo-adam under --optim fused / 8bit / paged-8bit / adafactor
        state = by_optim
    base = {C.WEIGHTS: weights, C.OPTIMIZER_STATE: state}
    return Inputs(cfg, spec, s, base, train, gpu_family)


_BY_NAME = {c.value: c for c in Category}


def with_bytes(base: dict, **extra: int) -> dict[Category, int]:
    """`base` plus bytes in the categories named by keyword."""
    out = dict(base)
    for k, v in extra.items():
        cat = _BY_NAME[k]
        out[cat] = out.get(cat, 0) + v
    return out


def kv_cache_bytes(cfg: Config, spec: ModelSpec, s: Ctx) -> int:
    """A KV cache keeps every layer's keys and values to the end of a forward: when asked for, as
    transformers 4.28 did by default, or as peft's prefix tuning does (prefix + sequence)."""
    if cfg.use_cache or s.arch.kv_cache_by_default or cfg.scheme is Scheme.PREFIX:
        return spec.num_layers * cfg.batch * s.seq_k * 2 * spec.kv_dim * kv_cache_element_bytes(cfg, s)
    return 0


def kv_cache_element_bytes(cfg: Config, s: Ctx) -> int:
    """Bytes per cached key / value element.

    Prefix tuning under autocast: peft hands the fp32 prefix (adapters stay fp32) to the model as
    its past keys and values, and the cache appends each layer's 16-bit keys with `torch.cat`, which
    autocast promotes to the widest input: the whole cache, prefix and sequence, is fp32.
    """
    return 4 if s.amp and cfg.scheme is Scheme.PREFIX else s.cb


def layer_peak(cfg: Config, spec: ModelSpec, s: Ctx) -> int:
    """Bytes at the peak of one layer's no-grad forward (the largest layer), plus any KV cache."""
    live = max(s.arch.live(kind, s) for kind in set(s.arch.layers(spec)))
    # the scores live only while attention runs: beside its q, k, v and the layer's input (kept for the
    # residual add), not beside the MLP's temporaries
    n = scores(cfg, spec, s)
    at_scores = s.tokens * attention_live(s, residual=True) + n * scores_transient_per_element(cfg, s)
    inside = max(s.tokens * live, at_scores) if n else s.tokens * live
    return inside + kv_cache_bytes(cfg, spec, s) + dequantised_weight_bytes(cfg, spec, backward=False)


def inference_peak(cfg: Config, spec: ModelSpec, s: Ctx) -> tuple[int, int]:
    """(activations, logits) bytes at the peak of a no-grad forward pass: inside the largest layer,
    or at the loss with the logits (the KV cache alive at both). At the loss the final norm's output,
    which the lm_head read, is still a local of the model's forward: tokens x hidden, residual bytes."""
    cache = kv_cache_bytes(cfg, spec, s)
    kept, transient = s.arch.logits_forward(s)
    final = s.tokens * spec.hidden_size * s.r if s.arch.objective == "causal" else 0
    top = methods.peak_of([{C.ACTIVATIONS: layer_peak(cfg, spec, s)},
                           {C.ACTIVATIONS: cache + final, C.LOGITS: kept + transient}])
    return top[C.ACTIVATIONS], top.get(C.LOGITS, 0)


def adjacent_pair_bytes(cfg: Config, spec: ModelSpec) -> int:
    """Largest sum of two consecutive trainable tensors: a loop's new z is made before the old one dies."""
    if cfg.scheme is not Scheme.FT:
        return 2 * trainable(cfg, spec).largest_bytes
    return _adjacent_pair(spec, cfg.dtype.weight_bytes)


@per_spec
def _adjacent_pair(spec: ModelSpec, wb: int) -> int:
    sizes = [round_block(t.numel * wb) for t in spec.tensors]
    return max(a + b for a, b in zip(sizes, sizes[1:])) if len(sizes) > 1 else sizes[0]


_TENSOR_CATEGORIES = tuple(c for c in Category if c not in (C.CONTEXT, C.ALLOCATOR))


def peak(cfg: Config, spec: ModelSpec, gpu_family) -> tuple[Phase, dict[Category, int], dict[Phase, int]]:
    """(peak phase, categories at the peak, allocated bytes of every phase)."""
    per_phase = phases(cfg, spec, gpu_family)
    totals = {p: methods.total(c) for p, c in per_phase.items()}
    at_top = methods.peak_of(per_phase.values())
    top = next(p for p, c in per_phase.items() if c is at_top)
    comps = {c: at_top.get(c, 0) for c in _TENSOR_CATEGORIES}
    return top, comps, totals
