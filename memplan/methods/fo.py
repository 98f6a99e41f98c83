"""First-order methods: a forward that saves activations, backward, then an optimizer step.

`zero_grad(set_to_none=True)` runs at the start (so LOAD still holds the previous step's
gradients); the forward runs under autocast (activations saved for backward, logits freed when the
output is dropped, the loss's fp32 log-softmax saved); backward frees activations as gradients
appear (|x| of gradients at its end); `optimizer.step()` (SGD: a momentum buffer if momentum > 0;
Adam: exp_avg + exp_avg_sq, created in the first step; foreach temporaries of about one |x|).
Gradients stay alive until the next step's zero_grad. Gradient checkpointing saves layer inputs
only and recomputes each layer in backward.
"""

from __future__ import annotations

from collections import Counter

from memplan import analytic as a
from memplan.methods import Family, MethodSpec, peak_of, register
from memplan.options import Config, Method, Scheme
from memplan.overhead import round_block, workspace_bytes
from memplan.result import Category, Phase


def phases(p: a.Inputs, *, step_temporaries=lambda p: 0) -> dict[Phase, dict[Category, int]]:
    cfg, spec, s, base, train = p.cfg, p.spec, p.s, p.base, p.train
    trains_weights = cfg.scheme is Scheme.FT
    e = a.scores(cfg, spec, s)
    L = spec.num_layers
    lora, unsaved = 0, a.quant_unsaved_inputs(cfg, spec, s)
    if cfg.scheme is Scheme.LORA:
        lora = a.lora_saved_per_token(cfg, spec, s, targets=train.count // 2 // L)
        unsaved += a.lora_unsaved_masks(cfg, spec, s, targets=train.count // 2 // L)

    def kept(kind) -> int:
        per_token, per_score = s.arch.saved(kind, s)
        return s.tokens * (per_token + lora) + e * per_score

    # Every layer's saved tensors live until its backward: the sum over the layers, by kind.
    counts = Counter(s.arch.layers(spec))
    per_kind = {kind: kept(kind) for kind in counts}
    all_layers = sum(n * per_kind[kind] for kind, n in counts.items()) - unsaved
    # Gradient checkpointing keeps each layer's input (the residual stream) and recomputes one layer
    # at a time in backward.
    checkpoints = L * s.tokens * spec.hidden_size * s.r if cfg.grad_checkpointing else 0
    if cfg.grad_checkpointing:
        checkpoints += a.int8_inputs_beside_checkpoints(cfg, spec, s)
    saved = checkpoints if cfg.grad_checkpointing else all_layers
    # Under autocast, 16-bit copies of the matmul weights live from their first use to backward: the
    # cast cache for trainable weights, saved casts for frozen ones.
    cast_cache = a.cast_cache_bytes(spec, s.cb) if s.amp else 0
    kept_logits, transient_logits = s.arch.logits_forward(s)
    grads = train.bytes
    ws_f = workspace_bytes(p.fam, backward=False)
    ws = workspace_bytes(p.fam, backward=True)
    # A tied embedding gets two gradients (lm_head's, the embedding's dense one) summed in place at
    # the end of backward: one extra vocab x hidden tensor then.
    tied = trains_weights and spec.tie_word_embeddings
    embed = round_block(spec.vocab_size * spec.word_embed_proj_dim * s.wb) if tied else 0
    w = a.with_bytes
    forward = w(base, weights=cast_cache, activations=saved, logits=kept_logits + transient_logits, workspace=ws_f)
    in_flight = a.quantised_matmul_bytes(cfg, spec, s)
    if in_flight:  # --quant: the last layer's largest matmul, its weight dequantised
        forward = peak_of([forward, w(base, weights=cast_cache, activations=saved + in_flight, workspace=ws_f)])
    back_start = w(base, weights=cast_cache, activations=saved, logits=s.arch.logits_backward(s), workspace=ws)
    back_end = w(base, gradients=grads + embed, workspace=ws)
    # --quant: a layer's weight dequantised for grad_input while its backward runs (the last layer's
    # first, with every activation still saved and the hidden states' gradient).
    dequant = a.dequantised_weight_bytes(cfg, spec, backward=True)
    candidates = [back_start, back_end]
    if dequant:
        candidates.append(w(base, weights=cast_cache, activations=saved + dequant + s.tokens * spec.hidden_size * s.r,
                            workspace=ws))
    if cfg.grad_checkpointing:  # the largest layer recomputed last, with nearly every gradient made
        candidates.append(w(base, weights=cast_cache, activations=checkpoints + max(per_kind.values()),
                            gradients=grads, workspace=ws))
    return {
        Phase.LOAD: w(base, gradients=grads),  # zero_grad(set_to_none) runs at the next step's start
        Phase.FORWARD: forward,
        Phase.BACKWARD: peak_of(candidates),
        Phase.OPTIMIZER_STEP: w(base, gradients=grads, optimizer_state=step_temporaries(p), workspace=ws),
    }


def _adam_temporaries(p: a.Inputs) -> int:
    # foreach Adam: sqrt(exp_avg_sq) for all params at once (~1x params); for-loop: one tensor.
    return p.train.bytes if p.cfg.foreach else p.train.largest_bytes


def run(step, batch):
    """zero_grad, forward (autocast), backward, optimizer.step()."""
    from memplan.steps import StepInfo

    h = step.hooks
    step.optimizer.zero_grad(set_to_none=True)
    h.phase(Phase.FORWARD)
    with step.autocast():
        loss = step.loss(batch)  # the output (and its logits) dies here
    h.phase(Phase.BACKWARD)
    loss.backward()
    ps = [p for _, p in step.params]
    h.tag(Category.GRADIENTS, [p.grad for p in ps if p.grad is not None])
    h.phase(Phase.OPTIMIZER_STEP)
    with h.region(Category.OPTIMIZER_STATE):
        step.optimizer.step()
    step.tag_optimizer_state(ps)
    return StepInfo(loss.detach())


def _sgd(params, cfg: Config, lr: float):
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, foreach=cfg.foreach)


def adam(params, cfg: Config, lr: float):
    import torch

    return torch.optim.Adam(params, lr=lr, foreach=cfg.foreach)


register(MethodSpec(
    name=Method.FO_SGD.value, doc=Method.FO_SGD.__doc__, family=Family.FO, forwards=1,
    state_copies=lambda cfg: 1 if cfg.momentum > 0 else 0, phases=phases, run=run, optimizer=_sgd,
))
register(MethodSpec(
    name=Method.FO_ADAM.value, doc=Method.FO_ADAM.__doc__, family=Family.FO, forwards=1,
    state_copies=lambda cfg: 2, phases=lambda p: phases(p, step_temporaries=_adam_temporaries), run=run,
    optimizer=adam,
))
