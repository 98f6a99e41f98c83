"""First-order phases under `--activation-offload` and `--optimizer-in-backward`, and the
bitsandbytes optimizer of `--optim 8bit|paged-8bit` (imported inside, when a step runs it).

Activation offloading (the step's `Step.offloading`): every tensor the decoder saves for backward,
weights apart, is copied to host memory when autograd saves it, and copied back to the GPU when
the backward node that needs it runs; the copy dies with the node. The lm_head and the loss run
after the decoder and keep their tensors on the GPU (torchtune wraps its output layer in a no-op
context for the same reason). So the GPU holds, in forward, one layer's working set and then the
logits; in backward, the logits' gradient and then, per node, the tensors it unpacked.
How it relates to the two implementations users name: torch's `save_on_cpu` copies every saved
tensor, weights included (a host copy of each weight per use), and brings each back as its node
runs, as this step does for activations; torchtune's `OffloadActivations` also leaves parameters
alone, keeps tensors under 1 KiB on the GPU, and on CUDA overlaps the copies on a second stream,
fetching the next tensors while a node runs, so it can hold a little more in backward than this
step (up to the tensors being fetched).

Optimizer in backward (`fo.PerParameter`): a parameter's step runs in its post-accumulate-grad
hook, and its gradient is freed right after: one gradient (and that tensor's step temporaries) at a
time. A tied embedding is the exception: its lm_head gradient waits for the embedding's.
"""

from __future__ import annotations

from memplan import analytic as a
from memplan import savers
from memplan.methods import peak_of
from memplan.result import Category, Phase


def offload_phases(p: a.Inputs, *, per_kind: dict, grads: int, embed: int, ws_f: int, ws: int,
                   step_temporaries: int) -> dict[Phase, dict[Category, int]]:
    cfg, spec, s, base = p.cfg, p.spec, p.s, p.base
    w = a.with_bytes
    kept_logits, transient_logits = s.arch.logits_forward(s)
    in_flight = offload_layer_in_flight(p)
    forward = peak_of([w(base, activations=in_flight, workspace=ws_f),
                       w(base, logits=kept_logits + transient_logits, workspace=ws_f)])
    back_start = w(base, logits=s.arch.logits_backward(s), workspace=ws)
    node = max(per_kind.values())
    if cfg.optimizer_in_backward:  # one gradient and its step at a time (a tied lm_head's waits)
        stepping = w(base, activations=node, gradients=embed + p.train.largest_bytes, optimizer_state=one_tensor_step(p),
                     workspace=ws)
        return {Phase.LOAD: dict(base), Phase.FORWARD: forward,
                Phase.BACKWARD: peak_of([back_start, stepping, w(base, gradients=2 * embed, workspace=ws)]),
                Phase.OPTIMIZER_STEP: dict(base)}
    # A layer's backward, late: nearly every gradient made, the node's unpacked tensors (at most the
    # layer's saved bytes) back on the GPU.
    back_layer = w(base, activations=node, gradients=grads + embed, workspace=ws)
    return {
        Phase.LOAD: w(base, gradients=grads),
        Phase.FORWARD: forward,
        Phase.BACKWARD: peak_of([back_start, back_layer]),
        Phase.OPTIMIZER_STEP: w(base, gradients=grads, optimizer_state=step_temporaries, workspace=ws),
    }


def offload_layer_in_flight(p: a.Inputs) -> int:
    """GPU bytes of one layer's forward while its saved tensors go to the host: its no-grad working set."""
    return a.layer_peak(p.cfg, p.spec, p.s)


def offload_host_bytes(p: a.Inputs, all_layers: int) -> int:
    """Host bytes of offloaded activations: every layer's saved tensors at the end of forward."""
    return all_layers


def in_backward_phases(p: a.Inputs, *, saved: int, cast_cache: int, embed: int, ws_f: int, ws: int,
                       per_kind: dict, checkpoints: int) -> dict[Phase, dict[Category, int]]:
    cfg, s, base, train = p.cfg, p.s, p.base, p.train
    w = a.with_bytes
    kept_logits, transient_logits = s.arch.logits_forward(s)
    one = one_tensor_step(p)
    forward = w(base, weights=cast_cache, activations=saved, logits=kept_logits + transient_logits, workspace=ws_f)
    back_start = w(base, weights=cast_cache, activations=saved, logits=s.arch.logits_backward(s), workspace=ws)
    # A parameter stepping while (nearly) every activation is still saved: its gradient and temporaries.
    stepping = w(base, weights=cast_cache, activations=saved, gradients=embed + train.largest_bytes,
                 optimizer_state=one, workspace=ws)
    candidates = [back_start, stepping]
    if embed:  # the end: the embedding's dense gradient summed into the lm_head's, then stepped
        candidates.append(w(base, gradients=2 * embed, workspace=ws))
    if cfg.grad_checkpointing:
        candidates.append(w(base, weights=cast_cache, activations=checkpoints + max(per_kind.values()),
                            gradients=embed + train.largest_bytes, optimizer_state=one, workspace=ws))
    return {
        Phase.LOAD: dict(base),
        Phase.FORWARD: forward,
        Phase.BACKWARD: peak_of(candidates),
        Phase.OPTIMIZER_STEP: dict(base),
    }


def one_tensor_step(p: a.Inputs) -> int:
    """Temporaries of one parameter's own optimizer step (the largest tensor's)."""
    return savers.one_tensor_temporaries(p.cfg, p.spec)


def bnb_adam8bit(params, lr: float, *, paged: bool):
    """bitsandbytes' Adam8bit / PagedAdam8bit over `params`, also on fake tensors.

    Its constructor builds two quantisation maps from Python lists (values a fake tensor has not):
    it runs outside fake mode, and on fake tensors the maps are made again, empty, inside the
    first step (where CUDA puts them on the device), so the tracker counts them.
    """
    import logging

    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from memplan.steps import is_fake

    # On a CPU, importing bitsandbytes logs that a 4-bit CPU kernel package is missing: nothing the
    # optimizers use.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, cpu_ops.level = cpu_ops.level, logging.ERROR
    try:
        import bitsandbytes as bnb
    finally:
        cpu_ops.setLevel(level)

    cls = bnb.optim.PagedAdam8bit if paged else bnb.optim.Adam8bit
    with unset_fake_temporarily():
        opt = cls(params, lr=lr)
    if params and is_fake(params[0]):
        # The trace stands for a CUDA step: no "paged optimizers are not supported on CPU" warning.
        opt._cpu_paged_warned = True
        opt.name2qmap.clear()

        def fill_qmap() -> None:
            for key in ("dynamic", "udynamic"):
                opt.name2qmap[key] = torch.empty(256, dtype=torch.float32, device=params[0].device)

        opt.fill_qmap = fill_qmap
    return opt
