"""LOZO and LOZO-M (Chen et al. 2024): a low-rank perturbation U V^T per weight matrix.

Follows optsuite/LOZO: `large_models/LOZOtrainer.py` (lowrank_zo_perturb_parameters,
lowrank_zo_step, lowrank_zo_update) and, for the momentum variant, `medium_models/src/LOZOtrainer.py`.
Every trainable tensor with two dimensions (the embeddings too) is perturbed by u v^T: u (m x r)
drawn from the step's seed and regenerated in the update, v (n x r) drawn every `lozo_interval`
steps and kept between steps. Tensors of one dimension (biases, norms) get a plain Gaussian z, as
MeZO's, and keep nothing. r = `zo_rank`; bytes in the weight dtype (fp32 for peft's adapters).

Kept between steps (r = rank, per matrix m x n; b bytes per element):
- lozo: V, n r b per matrix.
- lozo-m: V, the previous interval's V (`v_old`, kept from one redraw until the last step of the
  next interval, so two V on all steps but one of every interval when the interval is > 1), and
  the momentum N (m r b) per matrix; every non-matrix tensor keeps a full-size momentum (numel b).
  LOZO holds no `v_old` during the first interval; memplan's step holds a stand-in from its first
  step so the step the tracer measures holds what every later interval holds.

Transients, `Perturbation.MEZO` (the code's out-of-place updates):
- PERTURB `p.data = p.data + s * (u @ v.T) * eps`: u and two m x n temporaries (u v^T, then
  s * it, then * eps, then the new weight; each frees the one before). A non-matrix: z, s z, s z eps:
  three of it, as MeZO's.
- OPTIMIZER_STEP `p.data = p.data - lr * (g * (u @ v.T) + wd * p.data)` (lozo-m: `N @ v.T` in place of
  `g * (u @ v.T)`): u and three m x n (g u v^T, wd p, their sum), the weight-decay term made even at
  wd = 0 (LOZO's default), except on names holding "bias" / "layer_norm" / "layernorm", where two.
  A non-matrix: z and three more with the decay term (lozo), three in all without it or for lozo-m.
  LOZO-M's momentum update is written out of place in the paper's code (m r temporaries, before the
  m x n ones); memplan's step updates it in place. At a redraw the paper's code rotates the momentum
  as `(b N) @ v_old.T @ v`, an m x n temporary; memplan's step takes `N @ (v_old.T @ v)` (r x r).
  Neither changes the step's peak.
`Perturbation.INPLACE`: `p.addmm_(u, v.T, alpha=...)`: u alone (a non-matrix: z alone), in the
perturbation and in the update.
Where the paper's code lets a name outlive its loop iteration (the previous tensor's u or z stays
alive until the next is drawn), memplan's step frees it: one u or z of a tensor, at most.
The paper's code draws v in its first perturbation call, so at a redraw step its update draws u from
a different place in the seed's stream than the perturbation did; memplan's step draws v from its own
seed, so u is the same in both. The code takes one query per step (q = 1).
"""

from __future__ import annotations

import dataclasses

from memplan import analytic as a
from memplan.methods import Family, MethodSpec, register, zo
from memplan.options import Method, Perturbation
from memplan.overhead import round_block as rb
from memplan.result import Category, Phase
from memplan.spec import per_spec

BETA1 = 0.9  # LOZO-M's momentum coefficient (its `beta1`)
WEIGHT_DECAY = 0.0  # LOZO's default; the term is computed all the same
_NO_DECAY = ("bias", "layer_norm", "layernorm")


def decays(name: str) -> bool:
    """LOZO's update adds `weight_decay * p` to every tensor but biases and layer norms (by name)."""
    return not any(k in name for k in _NO_DECAY)


# ---- analytic -------------------------------------------------------------------------------


@per_spec
def _bytes(spec, key: tuple, rank: int, momentum: bool, two_v: bool, mezo: bool) -> tuple[int, int, int]:
    """(kept, perturbation peak, update peak) bytes over the trainable tensors named by `key`."""
    kept = perturb = update = 0
    for name, shape, b in zo.trainable_shapes(spec, *key):
        numel = 1
        for d in shape:
            numel *= d
        if len(shape) >= 2:
            m, n = shape[0], numel // shape[0]
            u, mn = rb(m * rank * b), rb(numel * b)
            kept += rb(n * rank * b) * (2 if momentum and two_v else 1) + (rb(m * rank * b) if momentum else 0)
            if mezo:
                perturb = max(perturb, u + 2 * mn)  # u, u v^T, s * (u v^T); then * eps; then the new weight
                update = max(update, u + (3 if decays(name) else 2) * mn)
            else:
                perturb, update = max(perturb, u), max(update, u)
        else:
            z = rb(numel * b)
            kept += z if momentum else 0
            if mezo:
                perturb = max(perturb, 3 * z)
                update = max(update, (4 if decays(name) and not momentum else 3) * z)
            else:
                perturb, update = max(perturb, z), max(update, z)
    return kept, perturb, update


def _phases(p: a.Inputs, *, momentum: bool) -> dict[Phase, dict[Category, int]]:
    cfg = p.cfg
    kept, perturb, update = _bytes(p.spec, zo.shapes_key(cfg, p.spec), cfg.zo_rank, momentum,
                                   cfg.lozo_interval > 1, cfg.perturbation is Perturbation.MEZO)
    base = a.with_bytes(p.base, optimizer_state=kept)
    out = zo.phases(dataclasses.replace(p, base=base))
    w = a.with_bytes
    out[Phase.PERTURB] = w(base, perturbation=perturb)
    out[Phase.OPTIMIZER_STEP] = w(base, perturbation=update, workspace=out[Phase.OPTIMIZER_STEP].get(
        Category.WORKSPACE, 0))
    return out


# ---- the real step ----------------------------------------------------------------------------


def _draw(rows: int, rank: int, like):
    import torch

    return torch.randn(rows, rank, device=like.device, dtype=like.dtype)


def _refresh(step, *, momentum: bool) -> None:
    """Draw v (n x r) for every matrix at the first step and every `lozo_interval` steps; keep it."""
    import torch

    cfg, st = step.config, step.state
    t = st.get("t", 0)
    first = "v" not in st
    if not first and t % cfg.lozo_interval:
        return
    torch.manual_seed(step.rng.randrange(10**9))
    vs, olds = st.setdefault("v", {}), st.setdefault("v_old", {})
    with torch.no_grad(), step.hooks.region(Category.OPTIMIZER_STATE):
        for name, p in step.params:
            if p.dim() < 2:
                continue
            vs[name] = _draw(p.numel() // p.size(0), cfg.zo_rank, p.data)
            step.hooks.tag(Category.OPTIMIZER_STATE, [vs[name]])
            if first and momentum and cfg.lozo_interval > 1:  # stands in for the interval before the first
                olds[name] = _draw(p.numel() // p.size(0), cfg.zo_rank, p.data)
                step.hooks.tag(Category.OPTIMIZER_STATE, [olds[name]])


def _directions(step, seed: int):
    """(name, p, u or None, v or z) per trainable tensor: u (m x r) or z regenerated from `seed`."""
    import torch

    from memplan.steps import z_like

    torch.manual_seed(seed)
    vs = step.state["v"]
    with torch.no_grad(), step.hooks.region(Category.PERTURBATION):
        for name, p in step.params:
            if p.dim() >= 2:
                yield name, p, _draw(p.data.size(0), step.config.zo_rank, p.data), vs[name]
            else:
                yield name, p, None, z_like(p)


def perturb(step, seed: int, scale: float) -> None:
    """w += scale * eps * u v^T per matrix (z per other tensor), as LOZO's lowrank_zo_perturb_parameters."""
    step.hooks.phase(Phase.PERTURB)
    mezo = step.config.perturbation is Perturbation.MEZO
    eps = step.eps
    for _, p, u, vz in _directions(step, seed):
        if u is None:
            if mezo:
                p.data = p.data + scale * vz * eps
            else:
                p.data.add_(vz, alpha=scale * eps)
        elif mezo:
            p.data = p.data + scale * (u @ vz.t()).view(p.shape) * eps
        else:
            p.data.view(p.size(0), -1).addmm_(u, vz.t(), alpha=scale * eps)
        if mezo:
            step.hooks.bind(Category.WEIGHTS, [p])
        del u, vz


def _full_direction(p, step_dir, v, coeff: float, *, momentum: bool):
    """The update's direction at p's full size: coeff * u v^T for a matrix (u = step_dir), coeff * z
    otherwise; the momentum itself (coeff 1) when it is kept at full size, without a copy."""
    if v is None:
        return step_dir if momentum else coeff * step_dir
    full = (step_dir @ v.t()).view(p.shape)
    return full if momentum else coeff * full


def _update(step, seed: int, g: float, *, momentum: bool) -> None:
    """LOZO's lowrank_zo_update (lozo-m: its momentum update), per tensor."""
    import torch

    cfg, st, h = step.config, step.state, step.hooks
    h.phase(Phase.OPTIMIZER_STEP)
    mezo = cfg.perturbation is Perturbation.MEZO
    lr, t, interval = step.lr, st["t"], cfg.lozo_interval
    ms, olds = st.setdefault("m", {}), st["v_old"]
    for name, p, u, vz in _directions(step, seed):
        d = vz if u is None else u  # what the momentum tracks: z, or u (m x r)
        if momentum:
            with h.region(Category.OPTIMIZER_STATE):
                if name not in ms or (u is not None and t % interval == 0 and (t == 0 or interval == 1)):
                    ms[name] = g * d  # LOZO-M starts (or, at interval 1, restarts) the momentum at g u
                elif u is not None and t % interval == 0:
                    # a new v: carry the momentum over, N v_old^T v / n (r x r first, not m x n)
                    ms[name] = (ms[name] @ (olds[name].t() @ vz)).mul_(BETA1 / vz.size(0))
                    ms[name].add_(d, alpha=(1 - BETA1) * g)
                else:
                    ms[name].mul_(BETA1).add_(d, alpha=(1 - BETA1) * g)
            h.tag(Category.OPTIMIZER_STATE, [ms[name]])
            if u is not None and interval > 1 and t % interval == interval - 1:
                olds[name] = vz  # LOZO keeps this v for the rotation at the next redraw
            step_dir, coeff = ms[name], 1.0
        else:
            step_dir, coeff = d, g
        with torch.no_grad(), h.region(Category.PERTURBATION):
            if not mezo:
                if u is None:
                    p.data.add_(step_dir, alpha=-lr * coeff)
                else:
                    p.data.view(p.size(0), -1).addmm_(step_dir, vz.t(), alpha=-lr * coeff)
            else:
                # Out of place and unnamed, as the paper's code: each temporary dies in the expression.
                v = None if u is None else vz
                if decays(name):
                    p.data = p.data - lr * (_full_direction(p, step_dir, v, coeff, momentum=momentum)
                                            + WEIGHT_DECAY * p.data)
                else:
                    p.data = p.data - lr * _full_direction(p, step_dir, v, coeff, momentum=momentum)
                h.bind(Category.WEIGHTS, [p])
                del v
        del u, vz, d, step_dir


def run(step, batch, *, momentum: bool = False):
    from memplan.steps import StepInfo, scalar

    _refresh(step, momentum=momentum)
    step.state.setdefault("t", 0)
    seed = step.rng.randrange(10**9)
    loss1, g = zo.projected_grad(step, batch, seed, perturb)
    g = scalar(g)
    _update(step, seed, g, momentum=momentum)
    step.state["t"] += 1
    return StepInfo(loss1, seeds=[seed], projected_grads=[g])


def _spec(method: Method, momentum: bool) -> MethodSpec:
    return register(MethodSpec(
        name=method.value, doc=method.__doc__, family=Family.ZO, forwards=2, state_copies=lambda cfg: 0,
        phases=lambda p: _phases(p, momentum=momentum),
        run=lambda step, batch: run(step, batch, momentum=momentum), optimizer=None, one_query=True,
    ))


_spec(Method.LOZO, momentum=False)
_spec(Method.LOZO_M, momentum=True)
