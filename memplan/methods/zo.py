"""Zeroth-order methods: perturbed forwards, a projected gradient, and an update along z.

q = 1: no gradients between steps. PERTURB: seed, then per tensor z ~ N(0, 1) in the weight dtype;
MeZO's reference (`Perturbation.MEZO`) `p.data = p.data + s * z * eps` holds at most three
|p|-sized tensors at once (z, s*z, (s*z)*eps; then z, (s*z)*eps, the new copy); the in-place
version `p.data.add_(z, alpha=s * eps)` holds z only, plus the previous tensor's z until the new one
replaces it. FORWARD (x2, x5 for cons) under `torch.no_grad()`: one forward's live activations, no
saved ones; logits freed with the output. OPTIMIZER_STEP: z regenerated from the seed, per tensor:

- every method (zo-sgd with `Perturbation.MEZO` too): ZO-Bench's update, `p.grad = g * z / q;
  optimizer.step(); p.grad = None` (z, g*z and the quotient: three |p| at once; at most one
  parameter's gradient alive). zo-sgd: plain SGD; zo-sgd-mmt: SGD momentum (1x |x| state);
  zo-sgd-sign: sign(g); zo-sgd-cons: SGD, two candidate updates each followed by a forward, then
  at most one more; zo-adam: Adam (exp_avg + exp_avg_sq, 2x |x|). MeZO's own repository updates
  out of place instead (`p.data = p.data - lr * (g * z + wd * p.data)`, four |p| at once); ZO-Bench's
  measured curve matches three, so memplan models ZO-Bench's.
- zo-sgd in place: `p.add_(z, alpha=-lr * g)` (z only).

q > 1: `p.grad` accumulates g_i * z_i / q over the queries for every trainable p (1x |x|, ZO-Bench's
`zo_step_v1`), then one `optimizer.step()` over all of them.

The real step is composed from the helpers below (`perturb`, `projected_grad`, `forward`,
`accumulate`, `optimizer_update`, `sgd_update`); each method picks its own.
"""

from __future__ import annotations

from memplan import _compat
from memplan import analytic as a
from memplan.methods import Family, MethodSpec, register
from memplan.options import Config, Method, Perturbation, Scheme
from memplan.overhead import workspace_bytes
from memplan.result import Category, Phase
from memplan.spec import per_spec

ZO_MOMENTUM = 0.9  # ZO-Bench's zo_sgd_momen sweeps


# ---- analytic -------------------------------------------------------------------------------


def update_bytes(p: a.Inputs, *, in_place_sgd: bool = False) -> tuple[int, int]:
    """(z, gradient) bytes alive at the peak of a ZO update.

    ZO-Bench's update, per tensor: regenerate z, `p.grad = g * z / q` (z, g*z and the quotient: 3
    copies of the largest tensor), `optimizer.step()` (in place for SGD and momentum; Adam's
    sqrt(exp_avg_sq) temporary comes after g*z is freed, so still 3), `p.grad = None`.
    zo-sgd in place: `p.add_(z, alpha=-lr * g)`, z alone (and the previous tensor's z while drawing).
    q > 1: the accumulator holds the gradient; the final step is one foreach SGD / Adam over all.
    """
    largest = p.train.largest_bytes
    if p.cfg.zo_queries > 1:
        return largest, 0
    if in_place_sgd and p.cfg.perturbation is Perturbation.INPLACE:
        return a.adjacent_pair_bytes(p.cfg, p.spec), 0
    return largest, 2 * largest


def phases(p: a.Inputs, *, in_place_sgd: bool = False) -> dict[Phase, dict[Category, int]]:
    cfg, spec, s, base = p.cfg, p.spec, p.s, p.base
    largest = p.train.largest_bytes
    # MeZO: param.data = param.data + scale * z * eps holds z, scale*z and (scale*z)*eps, then z,
    # the product and the new tensor: 3 of the largest tensor. In place: z, and the previous
    # tensor's z until the new one replaces it.
    if cfg.perturbation is Perturbation.MEZO:
        perturb = 3 * largest
    else:
        perturb = a.adjacent_pair_bytes(cfg, spec)
    act, logits = a.inference_peak(cfg, spec, s)
    ws = workspace_bytes(p.fam, backward=False)
    z, grad = update_bytes(p, in_place_sgd=in_place_sgd)
    # autocast caches 16-bit copies of trainable leaf weights even under no_grad, for the whole forward.
    cache = a.cast_cache_bytes(spec, s.cb) if s.amp and cfg.scheme is Scheme.FT else 0
    w = a.with_bytes
    return {
        Phase.LOAD: dict(base),
        Phase.PERTURB: w(base, perturbation=perturb),
        Phase.FORWARD: w(base, weights=cache, activations=act, logits=logits, workspace=ws),
        Phase.OPTIMIZER_STEP: w(base, perturbation=z, gradients=grad, workspace=ws),
    }


def state_copies(optimizer_copies: int):
    """Optimizer state, plus the gradient accumulator over q > 1 queries."""
    return lambda cfg: optimizer_copies + (1 if cfg.zo_queries > 1 else 0)


# ---- the real step: composable pieces --------------------------------------------------------


def directions(step, seed: int):
    """(p, z) for every trainable p, z regenerated from `seed`, under no_grad in the perturbation region."""
    import torch

    from memplan.steps import z_like

    torch.manual_seed(seed)
    with torch.no_grad(), step.hooks.region(Category.PERTURBATION):
        for _, p in step.params:
            yield p, z_like(p)


def perturb(step, seed: int, scale: float) -> None:
    """Move every trainable weight by scale * eps * z(seed), as MeZO's zo_perturb_parameters."""
    step.hooks.phase(Phase.PERTURB)
    mezo = step.config.perturbation is Perturbation.MEZO
    for p, z in directions(step, seed):
        if mezo and _compat.is_dtensor(p):
            # FSDP all-gathers from the shard's own storage: the new shard is written back into it
            # (the same bytes at every moment as MeZO's assignment, which frees the old copy instead).
            p.data.copy_(p.data + scale * z * step.eps)
        elif mezo:
            p.data = p.data + scale * z * step.eps
            step.hooks.bind(Category.WEIGHTS, [p])
        else:
            p.data.add_(z, alpha=scale * step.eps)


def forward(step, batch):
    """One no-grad forward; returns the loss."""
    import torch

    step.hooks.phase(Phase.FORWARD)
    with torch.no_grad(), step.autocast():
        return step.loss(batch).detach()


def two_sided(step, batch, seed: int, move=None):
    """(f(w + eps u), f(w - eps u)), u the direction `move(step, seed, scale)` takes (MeZO's z by
    default; a method's own low-rank or Hessian-scaled one); leaves the weights restored."""
    move = move or perturb
    move(step, seed, 1.0)
    loss1 = forward(step, batch)
    move(step, seed, -2.0)
    loss2 = forward(step, batch)
    move(step, seed, 1.0)
    return loss1, loss2


def projected_grad(step, batch, seed: int, move=None):
    """Two-sided estimate (f(w + eps u) - f(w - eps u)) / (2 eps); leaves the weights restored."""
    loss1, loss2 = two_sided(step, batch, seed, move)
    return loss1, (loss1 - loss2) / (2 * step.eps)


def accumulate(step, seed: int, coeff: float) -> None:
    """q > 1: p.grad += coeff * z for every trainable p (ZO-Bench's zo_step_v1 accumulator)."""
    step.hooks.phase(Phase.OPTIMIZER_STEP)
    for p, z in directions(step, seed):
        if p.grad is None:
            p.grad = coeff * z
            step.hooks.tag(Category.OPTIMIZER_STATE, [p.grad])
        else:
            p.grad.add_(z, alpha=coeff)


def optimizer_update(step, seed: int, g: float, sign: float = 1.0) -> None:
    """ZO-Bench's update: per parameter, p.grad = sign * g * z, optimizer.step(), p.grad = None."""
    import torch

    from memplan.steps import z_like

    h = step.hooks
    h.phase(Phase.OPTIMIZER_STEP)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in step.params:
            with h.region(Category.PERTURBATION):
                z = z_like(p)
                gz = g * z / step.config.zo_queries  # ZO-Bench: projected_grad * z / args.q
                p.grad = sign * gz if sign != 1.0 else gz
            h.tag(Category.GRADIENTS, [p.grad])
            with h.region(Category.OPTIMIZER_STATE):
                step.optimizer.step()
            step.tag_optimizer_state([p])
            p.grad = None
            del z, gz


def sgd_update(step, seed: int, g: float) -> None:
    """zo-sgd: ZO-Bench's update (`p.grad = g * z / q; optimizer.step()`), or in place `p += -lr g z`."""
    if step.config.perturbation is Perturbation.MEZO:
        optimizer_update(step, seed, g)
        return
    step.hooks.phase(Phase.OPTIMIZER_STEP)
    for p, z in directions(step, seed):
        p.data.add_(z, alpha=-step.lr * g)


def accumulated_update(step) -> None:
    """q > 1: one optimizer step over the accumulated gradients, which then die."""
    with step.hooks.region(Category.OPTIMIZER_STATE):
        step.optimizer.step()
    step.tag_optimizer_state([p for _, p in step.params])
    step.optimizer.zero_grad(set_to_none=True)


def _sign(g: float) -> float:
    return float((g > 0) - (g < 0))


def queries(step, batch, *, transform=lambda g: g, update=optimizer_update):
    """q projected gradients (each `transform`ed), accumulated when q > 1, then `update` along z (q = 1)."""
    from memplan.steps import StepInfo, scalar

    q = step.config.zo_queries
    seeds = [step.rng.randrange(10**9) for _ in range(q)]
    grads = []
    for seed in seeds:
        loss, g = projected_grad(step, batch, seed)
        gv = transform(scalar(g))
        grads.append(gv)
        if q > 1:
            accumulate(step, seed, gv / q)
    step.hooks.phase(Phase.OPTIMIZER_STEP)
    if q > 1:
        accumulated_update(step)
    else:
        update(step, seeds[0], grads[0])
    return StepInfo(loss, seeds=seeds, projected_grads=grads)


def run_cons(step, batch):
    """Conservative ZO-SGD (ZO-Bench's zo_conserv_step): keep the best of w, w - lr g z, w + lr g z."""
    from memplan.steps import StepInfo, is_fake, scalar

    loss0 = forward(step, batch)
    seed = step.rng.randrange(10**9)
    loss1, g = projected_grad(step, batch, seed)
    gv = scalar(g)
    optimizer_update(step, seed, gv)
    loss_minus = forward(step, batch)  # at w - lr g z
    optimizer_update(step, seed, gv, sign=-2.0)
    loss_plus = forward(step, batch)  # at w + lr g z
    l0, lm, lp = scalar(loss0), scalar(loss_minus), scalar(loss_plus)
    if is_fake(loss0):  # no values to compare: take the costlier branch, a third update
        optimizer_update(step, seed, gv, sign=2.0)
    elif lm > l0:
        if l0 < lp:
            optimizer_update(step, seed, gv)  # back to w
    elif lm < lp:
        optimizer_update(step, seed, gv, sign=2.0)  # to w - lr g z
    return StepInfo(loss0, seeds=[seed], projected_grads=[gv], losses=(l0, lm, lp))


# ---- optimizers -------------------------------------------------------------------------------


def _sgd(params, cfg: Config, lr: float):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=0.0, foreach=cfg.optim.value == "foreach")


def _sgd_momentum(params, cfg: Config, lr: float):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum or ZO_MOMENTUM, foreach=cfg.optim.value == "foreach")


def _adam(params, cfg: Config, lr: float):
    from memplan.methods.fo import adam

    return adam(params, cfg, lr)


def _spec(method: Method, **kw) -> MethodSpec:
    kw.setdefault("phases", phases)
    kw.setdefault("run", queries)
    kw.setdefault("optimizer", _sgd)
    kw.setdefault("state_copies", state_copies(0))
    kw.setdefault("forwards", 2)
    return register(MethodSpec(name=method.value, doc=method.__doc__, family=Family.ZO, **kw))


_spec(Method.ZO_SGD, phases=lambda p: phases(p, in_place_sgd=True),
      run=lambda step, batch: queries(step, batch, update=sgd_update))
_spec(Method.ZO_SGD_MMT, optimizer=_sgd_momentum, state_copies=state_copies(1))
_spec(Method.ZO_SGD_CONS, run=run_cons, forwards=5, one_query=True)
_spec(Method.ZO_SGD_SIGN, run=lambda step, batch: queries(step, batch, transform=_sign))
_spec(Method.ZO_ADAM, optimizer=_adam, state_copies=state_copies(2))


# ---- shapes of what trains, for the low-rank methods (lozo, subzero) ---------------------------


def shapes_key(cfg: Config, spec) -> tuple:
    """What `trainable_shapes` reads from `cfg`, as a hashable key (the scheme and its sizes)."""
    if cfg.scheme is Scheme.FT:
        return (Scheme.FT, cfg.dtype.weight_bytes)
    if cfg.scheme is Scheme.LORA:
        return (Scheme.LORA, cfg.lora_rank, a.lora_targets(cfg, spec))
    return (cfg.scheme, cfg.prefix_tokens if cfg.scheme is Scheme.PREFIX else cfg.prompt_tokens)


@per_spec
def trainable_shapes(spec, scheme: Scheme, *args) -> tuple[tuple[str, tuple[int, ...], int], ...]:
    """(name, shape, bytes per element) of every trainable tensor, in the model's parameter order.

    ft: the model's own tensors; lora: lora_A (r x in) then lora_B (out x r) of every targeted
    matrix; prefix: peft's prefix embedding (tokens x L * 2 * kv); prompt: (tokens x token width).
    The byte counts are `analytic.trainable_tensors`'s; this adds the shapes a low-rank method reads.
    """
    if scheme is Scheme.FT:
        (wb,) = args
        return tuple((t.name, t.shape, wb) for t in spec.tensors)
    if scheme is Scheme.LORA:
        rank, targets = args
        a.trainable_tensors(spec, scheme, *args)  # its clear error when the targets match nothing
        out = []
        for t in spec.tensors:
            if t.module in targets and t.layer is not None and len(t.shape) == 2:
                out += [(t.name + ".lora_A", (rank, t.fan_in), a.ADAPTER_BYTES),
                        (t.name + ".lora_B", (t.fan_out, rank), a.ADAPTER_BYTES)]
        return tuple(out)
    (tokens,) = args
    if scheme is Scheme.PREFIX:
        return (("prefix_encoder.embedding.weight", (tokens, spec.num_layers * 2 * spec.kv_dim), a.ADAPTER_BYTES),)
    return (("prompt_encoder.embedding.weight", (tokens, spec.word_embed_proj_dim), a.ADAPTER_BYTES),)


# ---- generic helpers for methods that keep per-tensor temporaries ----------------------------


def trainable_sizes(p: a.Inputs) -> tuple[int, ...]:
    """Bytes of every trainable tensor (each rounded to 512 B), in the order a step's loop visits them."""
    cfg, spec = p.cfg, p.spec
    if cfg.scheme is Scheme.FT:
        return _trainable_sizes(spec, Scheme.FT, cfg.dtype.weight_bytes)
    if cfg.scheme is Scheme.LORA:
        return _trainable_sizes(spec, Scheme.LORA, cfg.lora_rank, a.lora_targets(cfg, spec))
    tokens = cfg.prefix_tokens if cfg.scheme is Scheme.PREFIX else cfg.prompt_tokens
    return _trainable_sizes(spec, cfg.scheme, tokens)


@per_spec
def _trainable_sizes(spec, scheme: Scheme, *args) -> tuple[int, ...]:
    from memplan.overhead import round_block

    return tuple(round_block(n * b) for n, b in a.trainable_tensors(spec, scheme, *args))


def loop_peak(sizes: tuple[int, ...], prev: int, cur: int) -> int:
    """Largest prev * |previous tensor| + cur * |this tensor| over a loop's tensors.

    A per-tensor loop whose locals outlive their iteration holds `prev` copies of the previous tensor
    while it makes `cur` of the current one (the first tensor has no previous one).
    """
    return max(prev * b + cur * c for b, c in zip((0, *sizes), sizes))
