"""The analytic estimator: closed-form bytes per category and per phase; imports no torch.

Each phase's peak is built from small formulas below. They follow what the step code keeps alive
on a GPU (see `memplan/steps.py`): which tensors autograd saves per layer in transformers' modules,
which temporaries a ZO perturbation or an optimizer step makes. The peak is the max over phases.

Notation in comments: T = batch * seq tokens, h hidden, f intermediate, a heads, kv = key/value
width, V vocab, L layers, E = batch * heads * seq_q * seq_k attention scores, wb / cb bytes per
element of weights / compute, r bytes of the residual stream (fp32 under autocast).
"""

from __future__ import annotations

from dataclasses import dataclass

from collections import Counter

from memplan.arch import Ctx
from memplan.errors import MemplanError
from memplan.result import Category, Phase
from memplan.options import Attention, Config, Method, Perturbation, Scheme
from memplan.overhead import round_block, workspace_bytes
from memplan.spec import ModelSpec

C = Category
ADAPTER_BYTES = 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype=True)
Shapes = Ctx  # the sizes of one configuration, as formulas read them


def shapes(cfg: Config, spec: ModelSpec) -> Ctx:
    seq_in = cfg.seq + (cfg.prompt_tokens if cfg.scheme is Scheme.PROMPT else 0)
    seq_k = seq_in + (cfg.prefix_tokens if cfg.scheme is Scheme.PREFIX else 0)
    amp = cfg.dtype.is_amp
    return Ctx(
        cfg=cfg, spec=spec, arch=spec.arch.at(cfg.hf_version), tokens=cfg.batch * seq_in, seq_q=seq_in,
        seq_k=seq_k, wb=cfg.dtype.weight_bytes, cb=cfg.dtype.compute_bytes,
        r=4 if amp else cfg.dtype.compute_bytes, amp=amp,
    )


# ---- parameters -----------------------------------------------------------------------------


def weight_bytes(spec: ModelSpec, wb: int) -> int:
    """Every parameter tensor (rounded to 512 B) plus buffers: sum round512(numel * wb)."""
    key = ("weights", wb)
    if key not in spec.memo:
        params = sum(round_block(t.numel * wb) for t in spec.tensors)
        spec.memo[key] = params + sum(round_block(t.numel * 4) for t in spec.buffers)  # rotary: fp32
    return spec.memo[key]


def cast_cache_bytes(spec: ModelSpec, cb: int) -> int:
    """16-bit copies autocast makes of the weights that feed matmuls (linear layers and the lm_head).

    Embedding lookups and norms run on the fp32 weights; a tied token embedding is cast for the lm_head.
    """
    key = ("cast", cb)
    if key not in spec.memo:
        total = 0
        arch = spec.arch
        for t in spec.tensors:
            if t.group == "norms" or t.module in arch.uncast or "norm" in t.module.lower():
                continue
            if t.group == "embeddings" and t.module == arch.token_embedding and not spec.tie_word_embeddings:
                continue  # untied: the lm_head has its own weight
            total += round_block(t.numel * cb)
        spec.memo[key] = total
    return spec.memo[key]


@dataclass(frozen=True, slots=True)
class Trainable:
    """What trains: parameter count, bytes (each tensor rounded to 512 B), largest tensor, tensors."""

    params: int
    bytes: int
    largest_bytes: int
    count: int


def trainable(cfg: Config, spec: ModelSpec) -> Trainable:
    key = ("trainable", cfg.scheme, cfg.dtype.weight_bytes, cfg.lora_rank, tuple(cfg.lora_targets),
           cfg.prefix_tokens, cfg.prompt_tokens)
    if key not in spec.memo:
        ts = trainable_tensors(cfg, spec)
        spec.memo[key] = Trainable(params=sum(n for n, _ in ts), bytes=params_bytes(ts),
                                   largest_bytes=largest_bytes(ts), count=len(ts))
    return spec.memo[key]


def lora_targets(cfg: Config, spec: ModelSpec) -> tuple[str, ...]:
    return tuple(cfg.lora_targets) or spec.default_lora_targets


def trainable_tensors(cfg: Config, spec: ModelSpec) -> list[tuple[int, int]]:
    """(numel, bytes per element) of every trainable tensor."""
    if cfg.scheme is Scheme.FT:
        return [(t.numel, cfg.dtype.weight_bytes) for t in spec.tensors]
    if cfg.scheme is Scheme.LORA:
        # lora_A: r x in, lora_B: out x r, for every targeted weight matrix.
        targets = set(lora_targets(cfg, spec))
        out = []
        for t in spec.tensors:
            if t.module in targets and t.layer is not None and len(t.shape) == 2:
                out += [(cfg.lora_rank * t.fan_in, ADAPTER_BYTES), (t.fan_out * cfg.lora_rank, ADAPTER_BYTES)]
        if not out:
            linear = sorted({t.module for t in spec.tensors if t.layer is not None and len(t.shape) == 2})
            raise MemplanError(f"LoRA targets {', '.join(sorted(targets))} match no module of {spec.name}; "
                               f"its layers' linear modules: {', '.join(linear)}")
        return out
    if cfg.scheme is Scheme.PREFIX:
        # peft prefix encoder: Embedding(tokens, L * 2 * kv_dim), no reparameterisation.
        return [(cfg.prefix_tokens * spec.num_layers * 2 * spec.kv_dim, ADAPTER_BYTES)]
    return [(cfg.prompt_tokens * spec.word_embed_proj_dim, ADAPTER_BYTES)]  # prompt: Embedding(tokens, h)


def params_bytes(tensors: list[tuple[int, int]]) -> int:
    """sum round512(numel * bytes) over tensors."""
    return sum(round_block(n * b) for n, b in tensors)


def largest_bytes(tensors: list[tuple[int, int]]) -> int:
    return max(round_block(n * b) for n, b in tensors)


def state_copies(cfg: Config) -> int:
    """Trainable-sized buffers an optimizer keeps between steps (momentum 1, Adam 2, ZO q>1 +1)."""
    m = cfg.method
    copies = {Method.FO_ADAM: 2, Method.ZO_ADAM: 2, Method.ZO_SGD_MMT: 1}.get(m, 0)
    if m is Method.FO_SGD and cfg.momentum > 0:
        copies = 1
    if m.is_zo and cfg.zo_queries > 1:
        copies += 1  # gradient accumulator over q queries
    return copies


# ---- activations ----------------------------------------------------------------------------


def scores(cfg: Config, spec: ModelSpec, s: Shapes) -> int:
    """E = batch * heads * seq_q * seq_k attention-score elements per layer (eager only)."""
    return cfg.batch * spec.num_heads * s.seq_q * s.seq_k if cfg.attention is Attention.EAGER else 0


def scores_transient_per_element(cfg: Config, s: Shapes) -> int:
    """Peak bytes per score element while one layer's attention runs (no grad)."""
    # masked scores (cb, fp32 under autocast) + softmax fp32 output + cast back to cb.
    masked = 4 if s.amp else s.cb
    return masked + 4 + (s.cb if s.cb != 4 else 0)


def lora_saved_per_token(cfg: Config, spec: ModelSpec, s: Ctx, *, targets: int) -> int:
    """Bytes per token one layer's LoRA paths save: lora_A's input and lora_B's r-wide input.

    peft keeps adapters in fp32 and casts x to fp32 (`_cast_input_dtype`): one new copy per target
    for 16-bit models; fp32 models pass x itself (shared by the targets); under autocast each
    lora_A saves its own 16-bit cast.
    """
    h = spec.hidden_size
    if s.amp:
        x_saved = targets * h * s.cb
    elif s.wb == 4:
        x_saved = h * 4  # the projection input itself, shared by the targets
    else:
        x_saved = targets * h * ADAPTER_BYTES
    middle = targets * cfg.lora_rank * (s.cb if s.amp else ADAPTER_BYTES)
    return x_saved + middle


def fg_logits(cfg: Config, spec: ModelSpec, s: Shapes) -> tuple[int, int]:
    """(primal, tangent) bytes of the logits and loss in a dual forward.

    primal: logits (cb), upcast, log_softmax output and its exp (the log_softmax JVP needs the
    probabilities); tangent: logits' tangent (cb), its upcast, and the log_softmax output's tangent.
    """
    tv = s.tokens * spec.vocab_size
    up, loss = s.arch.loss(s)
    return tv * (s.cb + up + 2 * loss), tv * (s.cb + up + loss)


# ---- phases ---------------------------------------------------------------------------------


def phases(cfg: Config, spec: ModelSpec, gpu_family) -> dict[Phase, dict[Category, int]]:
    """Bytes per category at the peak of each phase of one steady-state step."""
    s = shapes(cfg, spec)
    weights = weight_bytes(spec, s.wb)
    train = trainable(cfg, spec)
    train_bytes = train.bytes
    if cfg.scheme is not Scheme.FT:
        weights += train_bytes  # adapters live beside the frozen model
    state = state_copies(cfg) * train_bytes
    base = {C.WEIGHTS: weights, C.OPTIMIZER_STATE: state}
    m = cfg.method
    if m.is_fo:
        return _fo_phases(cfg, spec, s, base, train, gpu_family)
    if m is Method.FORWARD_GRAD:
        return _fg_phases(cfg, spec, s, base, train, gpu_family)
    return _zo_phases(cfg, spec, s, base, train, gpu_family)


_BY_NAME = {c.value: c for c in Category}


def _with(base: dict, **extra: int) -> dict[Category, int]:
    """`base` plus bytes in the categories named by keyword."""
    out = dict(base)
    for k, v in extra.items():
        cat = _BY_NAME[k]
        out[cat] = out.get(cat, 0) + v
    return out


def _inference_peak(cfg: Config, spec: ModelSpec, s: Shapes) -> tuple[int, int]:
    """(activations, logits) bytes at the peak of a no-grad forward pass."""
    e = scores(cfg, spec, s)
    cache = 0
    if cfg.use_cache or s.arch.kv_cache_by_default or cfg.scheme is Scheme.PREFIX:
        # A KV cache keeps every layer's keys and values to the end of the forward: asked for, as
        # transformers 4.28 did by default, or as peft's prefix tuning does (prefix + sequence).
        cache = spec.num_layers * cfg.batch * s.seq_k * 2 * spec.kv_dim * s.cb
    # The largest layer's transient (a no-grad forward runs one layer at a time).
    live = max(s.arch.live(kind, s) for kind in set(s.arch.layers(spec)))
    layer = s.tokens * live + e * scores_transient_per_element(cfg, s)
    kept, transient = s.arch.logits_forward(s)
    if layer >= kept + transient:
        return layer + cache, 0
    return cache, kept + transient


def adjacent_pair_bytes(cfg: Config, spec: ModelSpec) -> int:
    """Largest sum of two consecutive trainable tensors: a loop's new z is made before the old one dies."""
    if cfg.scheme is not Scheme.FT:
        return 2 * trainable(cfg, spec).largest_bytes
    key = ("pair", cfg.dtype.weight_bytes)
    if key not in spec.memo:
        sizes = [round_block(t.numel * cfg.dtype.weight_bytes) for t in spec.tensors]
        spec.memo[key] = max(a + b for a, b in zip(sizes, sizes[1:])) if len(sizes) > 1 else sizes[0]
    return spec.memo[key]


def zo_update_bytes(cfg: Config, spec: ModelSpec, largest: int) -> tuple[int, int]:
    """(z, gradient) bytes alive at the peak of a ZO update.

    ZO-Bench's update, per tensor: regenerate z, `p.grad = g * z / q` (z, g*z and the quotient: 3
    copies of the largest tensor), `optimizer.step()` (in place for SGD and momentum; Adam's
    sqrt(exp_avg_sq) temporary comes after g*z is freed, so still 3), `p.grad = None`.
    zo-sgd in place: `p.add_(z, alpha=-lr * g)`, z alone (and the previous tensor's z while drawing).
    q > 1: the accumulator holds the gradient; the final step is one foreach SGD / Adam over all.
    """
    if cfg.zo_queries > 1:
        return largest, 0
    if cfg.method is Method.ZO_SGD and cfg.perturbation is Perturbation.INPLACE:
        return adjacent_pair_bytes(cfg, spec), 0
    return largest, 2 * largest


def _zo_phases(cfg, spec, s, base, train: Trainable, fam):
    largest = train.largest_bytes
    # MeZO: param.data = param.data + scale * z * eps holds z, scale*z and (scale*z)*eps, then z,
    # the product and the new tensor: 3 of the largest tensor. In place: z, and the previous
    # tensor's z until the new one replaces it.
    if cfg.perturbation is Perturbation.MEZO:
        perturb = 3 * largest
    else:
        perturb = adjacent_pair_bytes(cfg, spec)
    act, logits = _inference_peak(cfg, spec, s)
    ws = workspace_bytes(fam, backward=False)
    z, grad = zo_update_bytes(cfg, spec, largest)
    # autocast caches 16-bit copies of trainable leaf weights even under no_grad, for the whole forward.
    cache = cast_cache_bytes(spec, s.cb) if s.amp and cfg.scheme is Scheme.FT else 0
    return {
        Phase.LOAD: dict(base),
        Phase.PERTURB: _with(base, perturbation=perturb),
        Phase.FORWARD: _with(base, weights=cache, activations=act, logits=logits, workspace=ws),
        Phase.OPTIMIZER_STEP: _with(base, perturbation=z, gradients=grad, workspace=ws),
    }


def _fg_phases(cfg, spec, s, base, train: Trainable, fam):
    # Tangents: randn_like for every trainable tensor, held for the whole step. The dual forward
    # carries a tangent beside every live activation: twice the inference transient.
    act, _ = _inference_peak(cfg, spec, s)
    primal, tangent = fg_logits(cfg, spec, s)
    ws = workspace_bytes(fam, backward=False)
    if act >= primal + tangent:
        fwd = _with(base, tangents=train.bytes + act, activations=act, workspace=ws)
    else:
        fwd = _with(base, tangents=train.bytes + tangent, logits=primal, workspace=ws)
    return {
        Phase.LOAD: dict(base),
        Phase.FORWARD: fwd,
        # p.sub_(lr * (v * jvp)): two temporaries of the largest tensor.
        Phase.OPTIMIZER_STEP: _with(base, tangents=train.bytes, perturbation=2 * train.largest_bytes),
    }


def _fo_phases(cfg, spec, s, base, train: Trainable, fam):
    trains_weights = cfg.scheme is Scheme.FT
    e = scores(cfg, spec, s)
    L = spec.num_layers
    lora = 0
    if cfg.scheme is Scheme.LORA:
        lora = lora_saved_per_token(cfg, spec, s, targets=train.count // 2 // L)

    def kept(kind) -> int:
        per_token, per_score = s.arch.saved(kind, s)
        return s.tokens * (per_token + lora) + e * per_score

    # Every layer's saved tensors live until its backward: the sum over the layers, by kind.
    counts = Counter(s.arch.layers(spec))
    per_kind = {kind: kept(kind) for kind in counts}
    all_layers = sum(n * per_kind[kind] for kind, n in counts.items())
    # Gradient checkpointing keeps each layer's input (the residual stream) and recomputes one layer
    # at a time in backward.
    checkpoints = L * s.tokens * spec.hidden_size * s.r if cfg.grad_checkpointing else 0
    saved = checkpoints if cfg.grad_checkpointing else all_layers
    per_layer = max(per_kind.values())  # the largest layer, recomputed under checkpointing
    # Under autocast, 16-bit copies of the matmul weights live from their first use to backward: the
    # cast cache for trainable weights, saved casts for frozen ones.
    cast_cache = cast_cache_bytes(spec, s.cb) if s.amp else 0
    kept_logits, transient_logits = s.arch.logits_forward(s)
    grads = train.bytes
    ws_f = workspace_bytes(fam, backward=False)
    ws = workspace_bytes(fam, backward=True)
    # A tied embedding gets two gradients (lm_head's, the embedding's dense one) summed in place at
    # the end of backward: one extra vocab x hidden tensor then.
    tied = trains_weights and spec.tie_word_embeddings
    embed = round_block(spec.vocab_size * spec.word_embed_proj_dim * s.wb) if tied else 0
    forward = _with(base, weights=cast_cache, activations=saved, logits=kept_logits + transient_logits,
                    workspace=ws_f)
    back_start = _with(base, weights=cast_cache, activations=saved, logits=s.arch.logits_backward(s),
                       workspace=ws)
    back_end = _with(base, gradients=grads + embed, workspace=ws)
    candidates = [back_start, back_end]
    if cfg.grad_checkpointing:  # the last layer recomputed, with nearly every gradient made
        candidates.append(_with(base, weights=cast_cache, activations=checkpoints + per_layer, gradients=grads,
                                workspace=ws))
    backward = max(candidates, key=lambda d: sum(d.values()))
    step_tmp = 0
    if cfg.method is Method.FO_ADAM:
        # foreach Adam: sqrt(exp_avg_sq) for all params at once (~1x params); for-loop: one tensor.
        step_tmp = train.bytes if cfg.foreach else train.largest_bytes
    return {
        Phase.LOAD: _with(base, gradients=grads),  # zero_grad(set_to_none) runs at the next step's start
        Phase.FORWARD: forward,
        Phase.BACKWARD: backward,
        Phase.OPTIMIZER_STEP: _with(base, gradients=grads, optimizer_state=step_tmp, workspace=ws),
    }


_TENSOR_CATEGORIES = tuple(c for c in Category if c not in (C.CONTEXT, C.ALLOCATOR))


def peak(cfg: Config, spec: ModelSpec, gpu_family) -> tuple[Phase, dict[Category, int], dict[Phase, int]]:
    """(peak phase, categories at the peak, allocated bytes of every phase)."""
    per_phase = phases(cfg, spec, gpu_family)
    totals = {p: sum(c.values()) for p, c in per_phase.items()}
    top = max(totals, key=totals.__getitem__)
    at_top = per_phase[top]
    comps = {c: at_top.get(c, 0) for c in _TENSOR_CATEGORIES}
    return top, comps, totals
