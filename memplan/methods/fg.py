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
    # The dual forward carries a tangent beside every live activation: twice one layer's no-grad
    # transient (plus any KV cache); or, at the end, the logits and loss with their tangents.
    act = a.layer_peak(cfg, spec, s)
    primal, tangent = a.fg_logits(cfg, spec, s)
    ws = workspace_bytes(p.fam, backward=False)
    w = a.with_bytes
    forward = peak_of([
        w(base, tangents=train.bytes + act, activations=act, workspace=ws),
        w(base, tangents=train.bytes + tangent, logits=primal, workspace=ws),
    ])
    return {
        Phase.LOAD: dict(base),
        Phase.FORWARD: forward,
        # p.sub_(lr * (v * jvp)): two temporaries of the largest tensor.
        Phase.OPTIMIZER_STEP: w(base, tangents=train.bytes, perturbation=2 * train.largest_bytes),
    }


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
