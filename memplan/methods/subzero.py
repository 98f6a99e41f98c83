"""SubZero (Yu et al. 2024): ZO-SGD along a perturbation in a random subspace per layer.

Follows zimingyy/SubZero `large_models/trainer.py` (zo_subspace_step, zo_subspace_perturb_parameters,
zo_subspace_update, fast_svd_method_v2, reshape_matrix). Every trainable tensor with two dimensions
after `squeeze` (the embeddings too) keeps two projection matrices, U (m x r) and V (r x n), with
orthonormal columns / rows: QR factors of fp32 Gaussian draws, cast to the weight dtype, redrawn
every `subzero_interval` steps (its `update_interval`) and kept between them. The perturbation is
z = U z0 V * sqrt(m n / r^2) with z0 (r x r) ~ N(0, 1) from the step's seed. Under lora / prefix /
prompt tuning the code treats each trainable tensor as the most nearly square m x n with m n = numel
(`reshape_matrix`). Tensors of one dimension (biases, norms) get a plain Gaussian z and keep nothing.
r = `zo_rank`, clamped to min(m, n) (the code would fail on a smaller side); bytes in the weight
dtype (fp32 for peft's adapters). One query per step, plain SGD (the code's momentum is 0 by default).

Kept between steps: U and V per matrix, (m r + r n) b.
Transients, `Perturbation.MEZO` (the code's):
- PERTURB `z = U @ z0 @ V * c; p.data = p.data + s * z * eps`: z, s z, s z eps, then z, s z eps and
  the new weight: three m x n (while z is made: U z0 (m x r), U z0 V, and its scaled copy).
- OPTIMIZER_STEP `p.grad = g * z; optimizer.step(); p.grad = None`: z and the gradient (z0 and two
  m x n while z is made). A non-matrix tensor: as MeZO's, three of it to perturb, two to update.
The code keeps the previous tensor's z (a name that outlives its loop iteration) while it makes the
next; memplan's step frees it: the peak is at the largest tensor either way for OPT and Llama, whose
largest tensors (the embeddings) are not preceded by a larger one.
`Perturbation.INPLACE`: `p.view(m, n).addmm_(U @ z0, V, alpha=...)`: z0 and U z0 alone.
A redraw (the first step, then every `subzero_interval` steps) holds a Gaussian draw, its Q and R
(fp32, m x r) and the cast, per matrix, before the perturbation: below the perturbation's peak.
"""

from __future__ import annotations

import dataclasses
import math

from memplan import analytic as a
from memplan.methods import Family, MethodSpec, register, zo
from memplan.options import Method, Perturbation, Scheme
from memplan.overhead import round_block as rb
from memplan.result import Category, Phase
from memplan.spec import per_spec


def near_square(numel: int) -> tuple[int, int]:
    """(m, n), m <= n, m n = numel, n - m smallest: how SubZero sees a peft tensor (`reshape_matrix`)."""
    m = max(i for i in range(1, math.isqrt(numel) + 1) if numel % i == 0)
    return m, numel // m


def matrix_shape(shape: tuple[int, ...], scheme: Scheme) -> tuple[int, int] | None:
    """The m x n SubZero projects a tensor as, or None for one it perturbs with a plain z.

    SubZero projects what has two dimensions after `squeeze`: under ft the tensor's own (out, in);
    under peft schemes the most nearly square factorisation of its size.
    """
    dims = [d for d in shape if d != 1]
    if len(dims) != 2:
        return None
    if scheme is Scheme.FT:
        return (shape[0], shape[1]) if len(shape) == 2 else None
    return near_square(dims[0] * dims[1])


# ---- analytic -------------------------------------------------------------------------------


@per_spec
def _bytes(spec, key: tuple, rank: int, mezo: bool) -> tuple[int, int, int]:
    """(kept, perturbation peak, update peak) bytes over the trainable tensors named by `key`."""
    kept = perturb = update = 0
    for _, shape, b in zo.trainable_shapes(spec, *key):
        mn = matrix_shape(shape, key[0])
        if mn is None:
            z = 1
            for d in shape:
                z *= d
            z = rb(z * b)
            perturb, update = max(perturb, (3 if mezo else 1) * z), max(update, (2 if mezo else 1) * z)
            continue
        m, n = mn
        k = min(rank, m, n)
        z0, uz0, full = rb(k * k * b), rb(m * k * b), rb(m * n * b)
        kept += rb(m * k * b) + rb(k * n * b)
        if mezo:
            making = max(z0 + uz0 + full, z0 + 2 * full)  # U z0 and U z0 V; then U z0 V and * c
            perturb = max(perturb, making, 3 * full)
            update = max(update, making, 2 * full)
        else:
            perturb, update = max(perturb, z0 + uz0), max(update, z0 + uz0)
    return kept, perturb, update


def _phases(p: a.Inputs) -> dict[Phase, dict[Category, int]]:
    cfg = p.cfg
    kept, perturb, update = _bytes(p.spec, zo.shapes_key(cfg, p.spec), cfg.zo_rank,
                                   cfg.perturbation is Perturbation.MEZO)
    base = a.with_bytes(p.base, optimizer_state=kept)
    out = zo.phases(dataclasses.replace(p, base=base))
    ws = out[Phase.OPTIMIZER_STEP].get(Category.WORKSPACE, 0)
    out[Phase.PERTURB] = a.with_bytes(base, perturbation=perturb)
    out[Phase.OPTIMIZER_STEP] = a.with_bytes(base, perturbation=update, workspace=ws)
    return out


# ---- the real step ----------------------------------------------------------------------------


def _orthonormal(rows: int, k: int, like):
    """Q of the QR of a fp32 Gaussian rows x k draw, in `like`'s dtype (SubZero's fast_svd_method_v2)."""
    import torch

    q, _ = torch.linalg.qr(torch.randn(rows, k, device=like.device))
    return q.to(like.dtype)


def _refresh(step) -> None:
    """Draw U (m x r) and V (r x n) for every matrix at the first step and every `subzero_interval` steps."""
    import torch

    cfg, st = step.config, step.state
    first = "uv" not in st
    if not first and st["t"] % cfg.subzero_interval:
        return
    torch.manual_seed(step.rng.randrange(10**9))
    uv = st.setdefault("uv", {})
    with torch.no_grad(), step.hooks.region(Category.OPTIMIZER_STATE):
        for name, p in step.params:
            mn = matrix_shape(tuple(p.shape), cfg.scheme)
            if mn is None:
                continue
            m, n = mn
            k = min(cfg.zo_rank, m, n)
            u = _orthonormal(m, k, p.data)
            v = _orthonormal(n, k, p.data).t().contiguous()
            uv[name] = (u, v)
            step.hooks.tag(Category.OPTIMIZER_STATE, [u, v])
            del u, v


def _direction(step, name, p):
    """z for `p`, drawn from torch's current seed: U z0 V * sqrt(m n / r^2), or a plain Gaussian z."""
    import torch

    from memplan.steps import z_like

    if name not in step.state["uv"]:
        return z_like(p)
    u, v = step.state["uv"][name]
    z0 = torch.normal(mean=0, std=1, size=(u.size(1), v.size(0)), device=p.device, dtype=p.dtype)
    return (u @ z0 @ v * math.sqrt(u.size(0) * v.size(1) / z0.numel())).view(p.shape)


def _in_place(step, name, p, alpha: float) -> None:
    """p += alpha * z without an m x n temporary: addmm_ of U z0 (m x r) and V."""
    import torch

    from memplan.steps import z_like

    if name not in step.state["uv"]:
        p.data.add_(z_like(p), alpha=alpha)
        return
    u, v = step.state["uv"][name]
    z0 = torch.normal(mean=0, std=1, size=(u.size(1), v.size(0)), device=p.device, dtype=p.dtype)
    c = math.sqrt(u.size(0) * v.size(1) / z0.numel())
    p.data.view(u.size(0), v.size(1)).addmm_(u @ z0, v, alpha=alpha * c)


def perturb(step, seed: int, scale: float) -> None:
    """w += scale * eps * z per tensor, as SubZero's zo_subspace_perturb_parameters."""
    import torch

    h = step.hooks
    h.phase(Phase.PERTURB)
    torch.manual_seed(seed)
    mezo = step.config.perturbation is Perturbation.MEZO
    with torch.no_grad(), h.region(Category.PERTURBATION):
        for name, p in step.params:
            if not mezo:
                _in_place(step, name, p, scale * step.eps)
                continue
            z = _direction(step, name, p)
            p.data = p.data + scale * z * step.eps
            h.bind(Category.WEIGHTS, [p])
            del z


def update(step, seed: int, g: float) -> None:
    """SubZero's zo_subspace_update: per tensor, p.grad = g * z, optimizer.step(), p.grad = None."""
    import torch

    h = step.hooks
    h.phase(Phase.OPTIMIZER_STEP)
    torch.manual_seed(seed)
    mezo = step.config.perturbation is Perturbation.MEZO
    with torch.no_grad():
        for name, p in step.params:
            if not mezo:
                with h.region(Category.PERTURBATION):
                    _in_place(step, name, p, -step.lr * g)
                continue
            with h.region(Category.PERTURBATION):
                z = _direction(step, name, p)
                p.grad = g * z
            h.tag(Category.GRADIENTS, [p.grad])
            with h.region(Category.OPTIMIZER_STATE):
                step.optimizer.step()
            p.grad = None
            del z


def run(step, batch):
    from memplan.steps import StepInfo, scalar

    step.state.setdefault("t", 0)
    h = step.hooks
    h.phase(Phase.PERTURB)
    _refresh(step)
    seed = step.rng.randrange(10**9)
    loss1, g = zo.projected_grad(step, batch, seed, perturb)
    g = scalar(g)
    update(step, seed, g)
    step.state["t"] += 1
    return StepInfo(loss1, seeds=[seed], projected_grads=[g])


register(MethodSpec(
    name=Method.SUBZERO.value, doc=Method.SUBZERO.__doc__, family=Family.ZO, forwards=2,
    state_copies=lambda cfg: 0, phases=_phases, run=run, optimizer=zo._sgd, one_query=True,
))
