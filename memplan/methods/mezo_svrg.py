"""MeZO-SVRG (Gautam et al. 2024): ZO-SGD with SVRG's control variate, all from forward passes.

Follows the authors' `training_step_MeZO_SVRG`, `central_difference_grad_est(_me)` and
`efficient_perturb_parameters` (amazon-science/mezo_svrg, models/llm_module.py). Every
`--svrg-interval` steps an anchor pass: the full-batch estimate g_hat = g z over
`--svrg-anchor-batches` batches (each side's loss their mean, two forwards a batch), kept as one
tensor per trainable parameter; the anchor w_bar = w (the reference means to keep it with
`self.parameters = parameters.copy()`, which copies the list of parameters, not their tensors, so
its anchor is the live weights; memplan keeps a real copy, as the paper's algorithm needs); then
w <- w - lr g_hat. Other steps: a central-difference estimate at w applied at once (w <- w - lr g1 z1),
one at w_bar applied to w (w <- w + lr g2 z2), then w <- w - lr g_hat. Every step ends with the
reference's loss forward. Kept between steps: w_bar and g_hat, 2x |x|.

Transients, with z drawn while the previous tensor's z is still bound (the loop variable):
- PERTURB: as MeZO (`Perturbation.MEZO`: three of the largest tensor; in place: z and the previous z);
- anchor pass: the new estimate is built (`estimator[name] = proj_grad * z`) while the old one is alive,
  and replaces it at the end: up to 1x |x| more, plus z (and the previous z, or g z);
- minibatch updates `p.data = p.data + c * g * z`: z, g z, the new copy (3b; a + b at a draw);
  `p.data = p.data - lr * g_hat`: 2b.
The analytic peak is the larger of the two kinds of step; the trace measures a whole cycle of
`--svrg-interval` steps after its warm-up (an anchor pass), so it sees both.
"""

from __future__ import annotations

from memplan import analytic as a
from memplan.methods import Family, MethodSpec, peak_of, register, zo
from memplan.options import Method
from memplan.result import Category, Phase


# ---- analytic -------------------------------------------------------------------------------


def building_peak(sizes: tuple[int, ...]) -> int:
    """Peak while a new estimate is built tensor by tensor: the ones made so far, plus z beside the
    previous z (a draw) or beside its product g z."""
    made, top = 0, 0
    for prev, cur in zip((0, *sizes), sizes):
        top = max(top, made + max(prev + cur, 2 * cur))
        made += cur
    return top


def anchor_moment(p: a.Inputs) -> dict[Category, int]:
    """An anchor refresh: the new full-batch estimate beside the old one, then w - lr g_hat (2b)."""
    sizes = zo.trainable_sizes(p)
    return a.with_bytes(p.base, perturbation=max(building_peak(sizes), 2 * max(sizes)))


def minibatch_moment(p: a.Inputs) -> dict[Category, int]:
    """A minibatch step's updates: w + c g z (z, g z, the new copy; a + b at a draw), w - lr g_hat (2b)."""
    sizes = zo.trainable_sizes(p)
    return a.with_bytes(p.base, perturbation=max(zo.loop_peak(sizes, 1, 1), 3 * max(sizes)))


def phases(p: a.Inputs) -> dict[Phase, dict[Category, int]]:
    out = zo.phases(p)
    ws = out[Phase.OPTIMIZER_STEP].get(Category.WORKSPACE, 0)
    moments = [anchor_moment(p)] if p.cfg.svrg_interval == 1 else [anchor_moment(p), minibatch_moment(p)]
    out[Phase.OPTIMIZER_STEP] = a.with_bytes(peak_of(moments), workspace=ws)
    return out


# ---- the real step ----------------------------------------------------------------------------


def estimate(step, batch, seed: int, batches: int = 1):
    """Central difference (mean loss at w + eps z - mean loss at w - eps z) / 2 eps; w restored."""
    zo.perturb(step, seed, 1.0)
    loss1 = sum(zo.forward(step, batch).float() for _ in range(batches)) / batches
    zo.perturb(step, seed, -2.0)
    loss2 = sum(zo.forward(step, batch).float() for _ in range(batches)) / batches
    zo.perturb(step, seed, 1.0)
    return (loss1 - loss2) / (2 * step.eps)


def full_estimate(step, seed: int, g) -> list:
    """g * z for every trainable parameter, a new tensor each (the reference's estimator dict)."""
    step.hooks.phase(Phase.OPTIMIZER_STEP)
    return [g * z for _, z in zo.directions(step, seed)]


def move(step, seed: int, coeff) -> None:
    """w <- w + coeff * z, out of place per tensor, as the reference's central_difference_grad_est_me."""
    step.hooks.phase(Phase.OPTIMIZER_STEP)
    for p, z in zo.directions(step, seed):
        p.data = p.data + coeff * z
        step.hooks.bind(Category.WEIGHTS, [p])


def descend(step) -> None:
    """w <- w - lr * g_hat, out of place per tensor."""
    import torch

    step.hooks.phase(Phase.OPTIMIZER_STEP)
    with torch.no_grad(), step.hooks.region(Category.PERTURBATION):
        for (_, p), e in zip(step.params, step.state["estimate"]):
            p.data = p.data - step.lr * e
            step.hooks.bind(Category.WEIGHTS, [p])


def swap_weights(step, tensors: list) -> list:
    """Point every trainable parameter at `tensors`; return the tensors they held (no copy)."""
    held = [p.data for _, p in step.params]
    for (_, p), t in zip(step.params, tensors):
        p.data = t
    return held


def anchor_pass(step, batch) -> int:
    import torch

    cfg, st = step.config, step.state
    seed = step.rng.randrange(10**9)
    g = estimate(step, batch, seed, cfg.svrg_anchor_batches)
    new = full_estimate(step, seed, g)
    step.hooks.tag(Category.OPTIMIZER_STATE, new)
    st["estimate"] = new  # the old estimate dies only now
    with torch.no_grad():
        if "anchor" not in st:
            st["anchor"] = [p.detach().clone() for _, p in step.params]
            step.hooks.tag(Category.OPTIMIZER_STATE, st["anchor"])
        else:
            for w_bar, (_, p) in zip(st["anchor"], step.params):
                w_bar.copy_(p)
    descend(step)
    return seed


def minibatch_step(step, batch) -> list[int]:
    st = step.state
    seed1 = step.rng.randrange(10**9)
    g1 = estimate(step, batch, seed1)
    move(step, seed1, -step.lr * g1)
    # At the anchor: the parameters point at w_bar while w waits aside, so no tensor is copied.
    weights = swap_weights(step, st.pop("anchor"))
    seed2 = step.rng.randrange(10**9)
    g2 = estimate(step, batch, seed2)
    st["anchor"] = swap_weights(step, weights)  # the (restored) anchor tensors
    del weights
    step.hooks.bind(Category.OPTIMIZER_STATE, st["anchor"])
    move(step, seed2, step.lr * g2)
    descend(step)
    return [seed1, seed2]


def run(step, batch):
    from memplan.steps import StepInfo

    st = step.state
    count = st.get("steps", 0)
    st["steps"] = count + 1
    if count % step.config.svrg_interval == 0:
        seeds = [anchor_pass(step, batch)]
    else:
        seeds = minibatch_step(step, batch)
    loss = zo.forward(step, batch)  # the reference's log_training_loss
    return StepInfo(loss, seeds=seeds)


register(MethodSpec(
    name=Method.MEZO_SVRG.value, doc=Method.MEZO_SVRG.__doc__, family=Family.ZO, forwards=5,
    state_copies=lambda cfg: 2, phases=phases, run=run, one_query=True, cycle=lambda cfg: cfg.svrg_interval,
))
