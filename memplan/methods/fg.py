"""Forward gradient: one dual (forward-mode AD) pass along random tangents, then p -= lr * jvp * v.

FORWARD holds tangents v = randn_like(p) for every trainable p (|x|) and runs one dual forward
(`torch.autograd.forward_ad`) over `functional_call`: primal and tangent activations live only as
long as the forward needs them (nothing is saved for a backward). OPTIMIZER_STEP:
`p.sub_(lr * (v * jvp))` (two |p| temporaries per tensor), then v is freed. On sdpa models the
forward runs SDPA's math backend, since the fused kernels have no forward-AD rule.
"""

from __future__ import annotations

import contextlib
import re

from memplan import analytic as a
from memplan.errors import MemplanError
from memplan.methods import Family, MethodSpec, peak_of, register
from memplan.options import Attention, Config, Method, Scheme
from memplan.overhead import workspace_bytes
from memplan.result import Category, Phase


def phases(p: a.Inputs) -> dict[Phase, dict[Category, int]]:
    cfg, spec, s, base, train = p.cfg, p.spec, p.s, p.base, p.train
    # Nothing is saved for a backward: the forward's peak is one layer's dual temporaries (a primal
    # and a tangent for each), at the attention softmax or in the MLP, or the logits and loss with
    # their tangents at the end. The tangents of the trainable weights live throughout.
    ws = workspace_bytes(p.fam, backward=False)
    w = a.with_bytes
    cache = a.kv_cache_bytes(cfg, spec, s)  # a KV cache (when asked for) and its tangent
    attn_primal, attn_tangent = attention_moment(cfg, spec, s)
    mlp = s.tokens * mlp_moment_per_token(spec, s)
    hidden = s.tokens * spec.hidden_size * s.r  # the final norm's output, the lm_head's input
    primal, tangent = a.fg_logits(cfg, spec, s)
    forward = peak_of([
        w(base, tangents=train.bytes + attn_tangent + cache, activations=attn_primal + cache, workspace=ws),
        w(base, tangents=train.bytes + mlp + cache, activations=mlp + cache, workspace=ws),
        w(base, tangents=train.bytes + tangent + hidden + cache, activations=hidden + cache, logits=primal,
          workspace=ws),
    ])
    return {
        Phase.LOAD: dict(base),
        Phase.FORWARD: forward,
        # p.sub_(lr * (v * jvp)): two temporaries of the largest tensor.
        Phase.OPTIMIZER_STEP: w(base, tangents=train.bytes, perturbation=2 * train.largest_bytes),
    }


def attention_moment(cfg: Config, spec, s) -> tuple[int, int]:
    """(primal, tangent) bytes alive at the dual forward's attention softmax, the layer's largest moment.

    Per attention-score element (E = batch x heads x seq_q x seq_k), as the trace of transformers 5
    finds them alive at the softmax of a layer past the first (the largest set):
    - eager: primal q k^T, its scaled copy, the masked scores (cb each) and the fp32 softmax output
      (16-bit: 2 + 2 + 2 + 4 = 10 B; fp32: the softmax input is fp32 already, 4 x 3 = 12 B); tangent:
      the same three, the fp32 softmax input and output tangents and their cast back (16 B; fp32
      20 B); with attention dropout the primal keeps a bool mask (1 B). The causal mask, batch x 1 x
      seq^2 in the weights' dtype, lives beside them.
    - sdpa: the fused kernels have no forward-AD rule, so the dual forward runs SDPA's math backend,
      which computes in fp32 whatever the inputs (it upcasts 16-bit q, k, v): primal q k^T and the
      masked scores (8 B); tangent four fp32 tensors (16 B); plus its own seq^2 fp32 causal mask and
      its boolean source (2 x 4 B per query-key pair, no batch).
    Per token, both the primal and the tangent (`_attention_per_token`).
    """
    e = a.scores_elements(cfg, spec, s)
    per_token = s.tokens * _attention_per_token(cfg, spec, s)
    if cfg.attention is Attention.SDPA:
        if _window_mask(cfg, spec, s):
            # transformers' sliding-window mask (batch x 1 x seq^2: bool, where, cast) replaces the
            # math backend's own
            mask = cfg.batch * s.seq_q * s.seq_k * (2 * s.wb + 1)
        else:
            mask = 2 * 4 * s.seq_q * s.seq_k
        return per_token + 8 * e + mask, per_token + 16 * e
    drop = 1 if spec.attention_dropout > 0 else 0
    mask = cfg.batch * s.seq_q * s.seq_k * s.wb
    if s.cb == 4:
        return per_token + (12 + drop) * e + mask, per_token + 20 * e
    return per_token + (10 + drop) * e + mask, per_token + 16 * e


def _attention_per_token(cfg: Config, spec, s) -> int:
    """Bytes per token of the primal (and again of the tangent) at the attention softmax.

    The model's embedding output (its forward keeps `inputs_embeds`), the residual stream and the
    normed input (3 h r), then per family:
    - RMSNorm families (llama, mistral, qwen2): v (kv cb) and the rotated q and k (fp32 under
      autocast, where the fp32 rotary tables promote them); with GQA, eager attention repeats k and
      v to every head (2 q cb instead of k's share);
    - LayerNorm families (opt, gpt2): the position embedding's output and the q, k, v projections
      (h r + 3 h cb).
    On sdpa's math backend: fp32 copies of 16-bit q, k, v (with GQA, k and v repeated to every head
    too), fp32 q scaled by 1/sqrt(d), and under
    autocast the 16-bit casts of the fp32 rotated q and k that SDPA's autocast rule makes.
    """
    h, q, kv, cb, r = spec.hidden_size, spec.q_dim, spec.kv_dim, s.cb, s.r
    rms = spec.norm == "rmsnorm"
    sdpa = cfg.attention is Attention.SDPA
    if rms:
        rope = 4 if s.amp else cb
        n = 3 * h * r + kv * cb + (q + kv) * rope
        if not sdpa and kv != q:
            n += 2 * q * cb
    else:
        n = 4 * h * r + 3 * h * cb
    if sdpa:
        kv_seen = kv if rms else h
        if _window_mask(cfg, spec, s):
            kv_seen = q  # with a mask, transformers repeats k and v to every head before SDPA
            n += 2 * q * cb
        n += 4 * (q + 2 * kv_seen) if (cb != 4) else 0
        n += 4 * q
        if kv_seen != q:
            n += 2 * 4 * q  # GQA: the math backend repeats k and v to every head
        if s.amp and rms:
            n += cb * (q + kv)
    return n


def _window_mask(cfg: Config, spec, s) -> bool:
    """transformers passes SDPA a materialised mask once the keys reach a sliding window (mistral's
    `sliding_window`, qwen2's with `use_sliding_window`); below it, `is_causal` and no mask."""
    c = spec.config
    window = c.get("sliding_window") if (c.get("model_type") == "mistral" or c.get("use_sliding_window")) else None
    return bool(window) and s.seq_k >= window


def mlp_moment_per_token(spec, s) -> int:
    """Bytes per token of the primal (and again of the tangent) in the MLP: the embedding output and
    the residual stream (2 h r), and gate, up and their product (gated) or fc1 and its activation."""
    return 2 * spec.hidden_size * s.r + (3 if spec.gated_mlp else 2) * spec.intermediate_size * s.cb


def run(step, batch):
    """One dual forward along random tangents, then p -= lr * jvp * v (ZO-Bench).

    Dual tensors (`torch.autograd.forward_ad`) rather than `torch.func.jvp`: the same forward-mode
    AD, but the tensors stay plain tensors, so transformers' checks that skip data-dependent
    branches on fake tensors still see fake tensors.
    """
    import torch
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call

    from memplan.steps import StepInfo

    h = step.hooks
    kwargs = step.kwargs(batch)
    h.phase(Phase.FORWARD)
    seed = step.rng.randrange(10**9)
    torch.manual_seed(seed)
    with h.region(Category.TANGENTS):
        vs = [torch.randn_like(p) for _, p in step.params]
    with fwad.dual_level(), step.autocast(), _math_sdpa(step.config):
        duals = {n: fwad.make_dual(p.detach(), v) for (n, p), v in zip(step.params, vs)}
        try:
            out = fwad.unpack_dual(functional_call(step.model, duals, (), kwargs).loss)
        except (NotImplementedError, RuntimeError) as e:
            why = _no_forward_ad(e)
            if why is None:
                raise
            raise MemplanError(f"forward-grad cannot run {step.config.model}: {why}") from None
        del duals
        loss, dloss = out.primal.detach(), out.tangent.detach()
        del out
    h.phase(Phase.OPTIMIZER_STEP)
    with torch.no_grad():
        for v, (_, p) in zip(vs, step.params):
            p.sub_(step.lr * (v * dloss))
    del vs
    return StepInfo(loss, seeds=[seed], jvp=dloss)


def _no_forward_ad(e: Exception) -> str | None:
    """What lacks a forward-AD rule, from torch's error (torch 2.13), or None for any other error.

    The real step fails the same way on a GPU: this is torch's limit, not the tracer's. MoE models of
    transformers 5 call `aten._grouped_mm` for their stacked experts, which has no forward-AD formula;
    BLOOM's GELU is an `autograd.Function` without a `jvp`.
    """
    text = str(e)
    op = re.search(r"forward AD with (\S+) that does not support it", text)
    if op:
        extra = " (transformers' grouped MoE experts)" if op.group(1) == "_grouped_mm" else ""
        return (f"torch has no forward-AD rule for aten.{op.group(1)}{extra}, so the dual forward fails on "
                "any device, so no trace can measure it")
    if "implement the jvp function" in text:
        return ("the model runs a custom autograd.Function without a jvp, so the dual forward fails on any "
                "device, so no trace can measure it")
    return None


def _math_sdpa(config: Config):
    if config.attention is not Attention.SDPA:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _warnings(cfg: Config) -> list[str]:
    if cfg.attention is Attention.SDPA:
        return ["forward-grad: fused SDPA kernels have no forward-AD rule; "
                "the dual forward runs SDPA's math backend (seq^2 scores)"]
    return []


def _untraceable(cfg: Config) -> str | None:
    if cfg.scheme is Scheme.FT:
        return None
    return (f"cannot trace forward-grad with --scheme {cfg.scheme.value}: fake tensors lose the device of a "
            "tangent in peft's layers (a torch forward-AD limitation); trace --scheme ft, or measure this one "
            "on a GPU")


register(MethodSpec(
    name=Method.FORWARD_GRAD.value, doc=Method.FORWARD_GRAD.__doc__, family=Family.FG, forwards=1,
    state_copies=lambda cfg: 0, phases=phases, run=run, one_query=True, warnings=_warnings,
    untraceable=_untraceable,
))
