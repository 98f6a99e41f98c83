"""Sparse MeZO (Liu et al. 2024): MeZO that perturbs and updates only the small-magnitude entries.

Per trainable tensor p, the mask is m = |p| <= h_p, where the threshold h_p is the (1 - sparsity)
quantile of |p| (`Config.zo_sparsity`, the fraction left untouched). What lives when:

- kept between steps: the thresholds, one per trainable tensor, computed from the weights on the
  first step (one fp32 tensor of `count` entries, a few hundred bytes);
- FORWARD (x2): the paper's memory-efficient implementation. The weights are never moved: when a
  module runs, each of its trainable tensors is rebuilt as w = p + s * eps * (m * z), used, and
  dropped when the module returns; z and the mask die before the module runs. Building w holds z,
  |p| (for the comparison) and the bool mask, then z and w: two |p| plus one byte per entry;
- OPTIMIZER_STEP: per tensor z (regenerated from the seed) masked by the same rule on the same
  (unmoved) weights, then MeZO's out-of-place update p = p - (lr g) z (three |p| at once) or, with
  `--perturbation inplace`, p.add_(z, alpha=-lr g) (two |p| and the mask while masking).

Since the weights do not move while the two forwards run, the mask of both forwards and of the
update is one mask: the step is an exact two-sided estimate along m * z, and the weights come back
bit for bit (the paper's version that moves the weights would need the mask kept, or would let
entries near the threshold drift).

The authors' code (NUS-HPC-AI-Lab/SparseMeZO) could not be read here; this follows the paper's
memory-efficient implementation (each layer's mask computed during the forward from the current
weights and freed before the next layer; a per-layer threshold). That the threshold is computed once
and kept, rather than re-taken every step, is memplan's reading: see docs/methods/sparse-mezo.md.
"""

from __future__ import annotations

import math

from memplan import analytic as a
from memplan.methods import Family, MethodSpec, peak_of, register
from memplan.options import Config, Method, Perturbation, Scheme
from memplan.overhead import round_block, workspace_bytes
from memplan.result import Category, Phase

STATE_KEY = "sparse_mezo_thresholds"
THRESHOLD_BYTES = 4  # the thresholds are kept in fp32, whatever the weights' dtype


# ---- analytic -------------------------------------------------------------------------------


def threshold_bytes(count: int) -> int:
    """One fp32 threshold per trainable tensor, in one tensor: round512(4 * count)."""
    return round_block(THRESHOLD_BYTES * count)


def mask_transient_bytes(p: a.Inputs) -> int:
    """z, |p| and the bool mask m = |p| <= h of the largest tensor: 2 |p| + numel (1 B per entry)."""
    largest = p.train.largest_bytes
    numel = largest // _element_bytes(p)
    return 2 * largest + round_block(numel)


def _element_bytes(p: a.Inputs) -> int:
    return p.s.wb if p.cfg.scheme is Scheme.FT else a.ADAPTER_BYTES


def module_copy_bytes(p: a.Inputs) -> tuple[int, int]:
    """(inside a layer, at the head) bytes of the rebuilt weight alive while its module runs.

    ft: the largest tensor of a layer, and the output head's (the embedding when tied); lora: the
    largest adapter (lora_A / lora_B run inside the layers); prefix / prompt: their encoder runs
    before the first layer, so nothing of theirs is alive later.
    """
    cfg, spec, s = p.cfg, p.spec, p.s
    if cfg.scheme is Scheme.FT:
        sizes = [round_block(t.numel * s.wb) for t in spec.tensors if t.layer is not None]
        head = [round_block(t.numel * s.wb) for t in spec.tensors if t.group == "lm_head"]
        if not head and spec.tie_word_embeddings:
            head = [round_block(spec.vocab_size * spec.word_embed_proj_dim * s.wb)]
        return max(sizes, default=0), max(head, default=0)
    return (p.train.largest_bytes if cfg.scheme is Scheme.LORA else 0), 0


def phases(p: a.Inputs) -> dict[Phase, dict[Category, int]]:
    cfg, spec, s = p.cfg, p.spec, p.s
    largest = p.train.largest_bytes
    base = a.with_bytes(p.base, optimizer_state=threshold_bytes(p.train.count))
    cache = a.kv_cache_bytes(cfg, spec, s)
    kept, transient = s.arch.logits_forward(s)
    ws = workspace_bytes(p.fam, backward=False)
    amp_cache = a.cast_cache_bytes(spec, s.cb) if s.amp and cfg.scheme is Scheme.FT else 0
    build = mask_transient_bytes(p)
    in_layer, at_head = module_copy_bytes(p)
    w = a.with_bytes
    f = a.with_bytes(base, weights=amp_cache, workspace=ws)
    # The forward's peak: inside the largest layer with one module's rebuilt weight alive; in the
    # output head (its rebuilt weight and the logits it makes); at the loss, after the head's copy
    # died; or while the largest tensor's copy is built (z, |p|, the mask).
    forward = peak_of([
        w(f, activations=a.layer_peak(cfg, spec, s), perturbation=in_layer),
        w(f, activations=cache, logits=s.tokens * spec.vocab_size * s.cb, perturbation=at_head),
        w(f, activations=cache, logits=kept + transient),
        w(f, perturbation=build),
    ])
    if cfg.perturbation is Perturbation.MEZO:
        update = max(build, 3 * largest)  # z, (lr g) z and the new tensor, after the mask died
    else:
        update = build
    return {
        Phase.LOAD: dict(base),
        Phase.FORWARD: forward,
        Phase.OPTIMIZER_STEP: w(base, perturbation=update, workspace=ws),
    }


# ---- the real step --------------------------------------------------------------------------


def thresholds(step):
    """Per trainable tensor, the (1 - sparsity) quantile of |p|: computed on the first step, then kept."""
    import torch

    kept = step.state.get(STATE_KEY)
    if kept is not None:
        return kept
    keep = 1.0 - step.config.zo_sparsity
    hs = []
    with torch.no_grad(), step.hooks.region(Category.PERTURBATION):
        for _, p in step.params:
            n = p.numel()
            k = min(n, max(1, math.ceil(keep * n)))
            hs.append(p.detach().abs().flatten().float().kthvalue(k).values)
        with step.hooks.region(Category.OPTIMIZER_STATE):
            kept = torch.stack(hs)
        del hs
    step.hooks.tag(Category.OPTIMIZER_STATE, [kept])
    step.state[STATE_KEY] = kept
    return kept


def masked_z(p, h, seed: int):
    """m * z for tensor p: z ~ N(0, 1) drawn from `seed`, zero where |p| > h."""
    import torch

    from memplan.steps import z_like

    torch.manual_seed(seed)
    z = z_like(p)
    z.mul_(p.data.abs() <= h)  # |p| dies after the comparison, the mask after the product
    return z


def _owners(step):
    """For every module, the trainable tensors it owns directly: (attribute, param, index)."""
    index = {id(p): i for i, (_, p) in enumerate(step.params)}
    out = []
    for module in step.model.modules():
        own = [(n, q, index[id(q)]) for n, q in module.named_parameters(recurse=False) if id(q) in index]
        if own:
            out.append((module, own))
    return out


def forward(step, batch, seed: int, scale: float):
    """One no-grad forward at w + scale * eps * (m * z), each tensor rebuilt only while its module runs."""
    import torch

    h = step.hooks
    h.phase(Phase.FORWARD)
    hs = thresholds(step)
    seen: set[int] = set()
    swapped: dict[object, list] = {}

    def pre(module, args):
        with torch.no_grad(), h.region(Category.PERTURBATION):
            for _, q, i in owned[module]:
                z = masked_z(q, hs[i], seed + i)
                rebuilt = torch.add(q.data, z, alpha=scale * step.eps)
                del z
                swapped.setdefault(module, []).append((q, q.data))
                q.data = rebuilt
                seen.add(i)

    def post(module, args, output):
        for q, original in swapped.pop(module, []):
            q.data = original

    owned = dict(_owners(step))
    handles = []
    for module in owned:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad(), step.autocast():
            loss = step.loss(batch).detach()
    finally:
        for handle in handles:
            handle.remove()
        for pairs in swapped.values():
            for q, original in pairs:
                q.data = original
    if len(seen) != len(step.params):
        from memplan.errors import MemplanError

        missed = [n for i, (n, _) in enumerate(step.params) if i not in seen]
        raise MemplanError(f"sparse-mezo: no module call reaches {', '.join(missed[:3])}; cannot perturb it")
    return loss


def update(step, seed: int, g: float) -> None:
    """p -= lr * g * (m * z), per tensor, m and z as in the forwards (the weights have not moved)."""
    import torch

    h = step.hooks
    h.phase(Phase.OPTIMIZER_STEP)
    hs = thresholds(step)
    mezo = step.config.perturbation is Perturbation.MEZO
    with torch.no_grad(), h.region(Category.PERTURBATION):
        for i, (_, p) in enumerate(step.params):
            z = masked_z(p, hs[i], seed + i)
            if mezo:  # MeZO's reference update, out of place
                p.data = p.data - (step.lr * g) * z
                h.bind(Category.WEIGHTS, [p])
            else:
                p.data.add_(z, alpha=-step.lr * g)
            del z


def run(step, batch):
    """Two forwards at w +- eps (m z), the projected gradient, then the masked update."""
    from memplan.steps import StepInfo, scalar

    seed = step.rng.randrange(10**9)
    loss1 = forward(step, batch, seed, 1.0)
    loss2 = forward(step, batch, seed, -1.0)
    g = scalar((loss1 - loss2) / (2 * step.eps))
    update(step, seed, g)
    return StepInfo(loss1, seeds=[seed], projected_grads=[g])


register(MethodSpec(
    name=Method.SPARSE_MEZO.value, doc=Method.SPARSE_MEZO.__doc__, family=Family.ZO, forwards=2,
    state_copies=lambda cfg: 0, phases=phases, run=run, one_query=True,
))
