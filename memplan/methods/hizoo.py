"""HiZOO (Zhao et al. 2024): ZO-SGD preconditioned by a diagonal Hessian estimate kept between steps.

Follows the authors' `zo_Hessian_step_update` and `efficient_Hessian_perturb_parameters`
(Yanjun-Zhao/HiZOO, trainer.py). What it keeps: the diagonal Hessian H, one tensor per trainable
parameter in that parameter's dtype (`torch.ones` like the weight, made before the first step):
1x |x|. One step, with z ~ N(0, 1) regenerated from one seed each time:

- FORWARD at w (the unperturbed loss), then PERTURB w + eps z / sqrt(H), FORWARD, w - eps z / sqrt(H),
  FORWARD, back to w. The reference perturbs out of place, `p.data = p.data + s / torch.sqrt(H) * z
  * eps`: z, sqrt(H), its reciprocal and the quotient are alive at once (4 |p|; `float / tensor` is
  `reciprocal() * float` in torch), then at most 3. In place (`addcdiv_`): z and sqrt(H), 2 |p|.
- OPTIMIZER_STEP, per tensor: H <- (1 - a) H + a |l1 + l2 - 2 l0| H z^2 / (2 eps^2), then
  p <- p - lr (g z / sqrt(H) + wd p), every product out of place. Its locals z, H z z, the
  estimate and the preconditioned gradient outlive the iteration, so making the next tensor's
  gradient holds one of the previous tensor and six of this one (a + 6b).
- FORWARD at the new w (the loss the reference returns), while the last tensor's four locals are
  still alive: four forwards per step where the paper counts three.
"""

from __future__ import annotations

from memplan import analytic as a
from memplan.methods import Family, MethodSpec, register, zo
from memplan.options import Method, Perturbation, Scheme
from memplan.overhead import workspace_bytes
from memplan.result import Category, Phase

HESSIAN_SMOOTH = 1e-8  # the reference scripts' `constant1e-8` smoothing schedule
WEIGHT_DECAY = 0.0  # HiZOO.sh's default; the product is made all the same


# ---- analytic -------------------------------------------------------------------------------


def phases(p: a.Inputs) -> dict[Phase, dict[Category, int]]:
    cfg, spec, s, base = p.cfg, p.spec, p.s, p.base
    sizes = zo.trainable_sizes(p)
    largest = max(sizes)
    # Each draw of z comes while the previous tensor's z is still bound (a + b); then the
    # expression's temporaries: z, sqrt(H), 1 / sqrt(H), s / sqrt(H) out of place; z, sqrt(H) in place.
    temps = 4 if cfg.perturbation is Perturbation.MEZO else 2
    perturb = max(zo.loop_peak(sizes, 1, 1), temps * largest)
    act, logits = a.inference_peak(cfg, spec, s)
    ws = workspace_bytes(p.fam, backward=False)
    cache = a.cast_cache_bytes(spec, s.cb) if s.amp and cfg.scheme is Scheme.FT else 0
    w = a.with_bytes
    # The last forward runs beside the update's four leftovers of the last tensor (z, H z z, the
    # estimate, the gradient); the first three forwards have none, so the last one holds the phase's peak.
    forward = w(base, weights=cache, activations=act, logits=logits, workspace=ws, perturbation=4 * sizes[-1])
    return {
        Phase.LOAD: dict(base),
        Phase.PERTURB: w(base, perturbation=perturb),
        Phase.FORWARD: forward,
        # g * z / sqrt(H) made with the previous tensor's gradient still bound: a + 6b (z, H z z,
        # estimate, g z, sqrt(H), quotient); the weight update then holds at most 6b.
        Phase.OPTIMIZER_STEP: w(base, perturbation=zo.loop_peak(sizes, 1, 6), workspace=ws),
    }


# ---- the real step ----------------------------------------------------------------------------


def hessians(step) -> list:
    """The diagonal Hessian estimate, one tensor per trainable parameter (ones at first, as the reference)."""
    h = step.state.get("hessian")
    if h is None:
        import torch

        h = step.state["hessian"] = [torch.ones(p.shape, dtype=p.dtype, device=p.device) for _, p in step.params]
        step.hooks.tag(Category.OPTIMIZER_STATE, h)
    return h


def perturb(step, seed: int, scale: float) -> None:
    """w <- w + scale * eps * z / sqrt(H), as the reference's efficient_Hessian_perturb_parameters."""
    import torch

    step.hooks.phase(Phase.PERTURB)
    mezo = step.config.perturbation is Perturbation.MEZO
    for (p, z), h in zip(zo.directions(step, seed), hessians(step)):
        if mezo:
            p.data = p.data + scale / torch.sqrt(h) * z * step.eps
            step.hooks.bind(Category.WEIGHTS, [p])
        else:
            p.data.addcdiv_(z, torch.sqrt(h), value=scale * step.eps)


def update(step, seed: int, losses, batch):
    """The reference's Hessian and weight update, then its forward at the new weights (returned).

    The loop's locals stay bound after it, as in the reference, through that last forward.
    """
    import torch

    from memplan.steps import z_like

    h, eps, smooth = step.hooks, step.eps, HESSIAN_SMOOTH
    loss0, loss1, loss2 = losses
    hs = hessians(step)
    h.phase(Phase.OPTIMIZER_STEP)
    torch.manual_seed(seed)
    with torch.no_grad():
        for i, (_, p) in enumerate(step.params):
            with h.region(Category.PERTURBATION):
                z = z_like(p)
                hessian_temp = hs[i] * z * z
                estimate = torch.abs(loss1 + loss2 - 2 * loss0) * hessian_temp * smooth / (2 * eps * eps)
                hs[i] = (1 - smooth) * hs[i] + estimate
                h.tag(Category.OPTIMIZER_STATE, [hs[i]])
                grad = (loss1 - loss2) / (2 * eps) * z / torch.sqrt(hs[i])
                p.data = p.data - step.lr * (grad + WEIGHT_DECAY * p.data)
            h.bind(Category.WEIGHTS, [p])
        return zo.forward(step, batch)


def run(step, batch):
    from memplan.steps import StepInfo, scalar

    hessians(step)
    seed = step.rng.randrange(10**9)
    loss0 = zo.forward(step, batch)
    loss1, loss2 = zo.two_sided(step, batch, seed, perturb)
    g = scalar((loss1 - loss2) / (2 * step.eps))
    loss = update(step, seed, (loss0, loss1, loss2), batch)
    return StepInfo(loss, seeds=[seed], projected_grads=[g], losses=(scalar(loss0), scalar(loss1), scalar(loss2)))


register(MethodSpec(
    name=Method.HIZOO.value, doc=Method.HIZOO.__doc__, family=Family.ZO, forwards=4,
    state_copies=lambda cfg: 1, phases=phases, run=run, one_query=True,
))
