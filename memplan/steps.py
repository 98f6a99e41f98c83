"""The real training step of every method, one device-agnostic function each.

The tracer runs these steps on fake tensors and the calibration runner runs them on CUDA, so both
measure the same code. A step reports where it is through `Hooks` (`phase` at the start of each
phase; `tag`/`bind`/`region`/`host` say what its tensors are for, so a tracker can sort bytes into
categories). Nothing here knows whether its tensors are fake.

What each step keeps alive, and when (|x| = trainable parameters, W = all weights, in weight dtype):
every method keeps W (+ buffers) between steps. Under amp, autocast's cast cache also holds a
16-bit copy of every *trainable* weight while a forward (and, FO, its backward) runs; frozen weights
are cast per use and the copies that backward needs are saved with the activations. What each method
adds is written beside its step and its analytic phases, in `memplan/methods/` (fo, zo, fg).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from memplan.build import (  # noqa: F401  (the model factory, re-exported for older imports)
    _base_config, build_model, hf_config, is_masked_lm, lora_targets, make_batch, model_config_dict,
    trainable,
)
from memplan import _compat, distributed
from memplan.arch._common import chunked_loss_refusal
from memplan.errors import MemplanError
from memplan.result import Category, Phase
from memplan.options import Config, Loss

LR = 1e-3
ZO_EPS = 1e-3  # MeZO / ZO-Bench default


class Hooks:
    """What a step tells whoever watches it (tracer, calibration runner). The defaults do nothing."""

    def phase(self, phase: Phase) -> None:
        """A phase starts (the previous one ends)."""

    def region(self, category: Category) -> contextlib.AbstractContextManager:
        """Storages allocated inside belong to `category` unless a sharper rule applies."""
        return contextlib.nullcontext()

    def tag(self, category: Category, tensors: Iterable) -> None:
        """These tensors' storages had this role for their whole life (gradients, optimizer state)."""

    def bind(self, category: Category, tensors: Iterable) -> None:
        """From now on these storages have this role (a perturbed copy that becomes the weight)."""

    def host(self, tensors: Iterable) -> None:
        """These tensors live in host memory when the step runs on CUDA (Adam's step counters)."""

    def offloaded(self, tensors: Iterable) -> None:
        """These tensors hold data moved to host memory (offloaded activations, paged optimizer state):
        host bytes the step needs, apart from the GPU's."""


class PhaseHooks(Hooks):
    """Hooks that only forward phase boundaries to a callback (what the calibration runner needs)."""

    def __init__(self, on_phase: Callable[[Phase], None]):
        self._on_phase = on_phase

    def phase(self, phase: Phase) -> None:
        self._on_phase(phase)


# ---- the step -------------------------------------------------------------------------------


@dataclass
class StepInfo:
    """What one step did: its loss, and the random draws and estimates a caller may check."""

    loss: object  # a 0-d tensor
    seeds: list[int] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)  # ZO, after any transform (sign)
    jvp: object = None  # forward-grad: the directional derivative along the tangents
    losses: tuple = ()  # zo-sgd-cons: the losses at w, w - lr g z, w + lr g z


class Step:
    """One full training step of `config.method`; call it with a batch, it returns the loss tensor.

    The method's own step is `memplan.methods.get(method).run`; this holds what every method
    shares: the hooks, the trainable parameters, the optimizer, the autocast and model arguments.
    """

    def __init__(self, config: Config, model, *, hooks: Hooks | None = None,
                 on_phase: Callable[[Phase], None] | None = None, lr: float = LR, eps: float = ZO_EPS,
                 seed: int = 0):
        from memplan import methods

        self.config, self.model = config, model
        self.method = methods.get(config.method)
        self.hooks = hooks or (PhaseHooks(on_phase) if on_phase else Hooks())
        self.lr, self.eps = lr, eps
        self.params = trainable(model)
        self.rng = random.Random(seed)
        # Tensors a method keeps from one step to the next beyond its torch optimizer's state (a
        # Hessian estimate, low-rank factors, SVRG anchors): created by the method's first step,
        # which tags them for the tracker.
        self.state: dict[str, object] = {}
        self.warnings: list[str] = []
        m = self.method
        from memplan.savers import refusal

        if refusal(config):
            raise MemplanError(refusal(config))
        if config.zo_queries > 1 and m.one_query:
            raise MemplanError(f"{m.name} takes one query per step (zo_queries=1), as ZO-Bench's does")
        if config.grad_checkpointing and m.family is not methods.Family.FO:
            self.warnings.append("gradient checkpointing only changes first-order methods; ignored")
        self.optimizer = m.optimizer([p for _, p in self.params], config, lr) if m.optimizer else None
        self.masked_lm = is_masked_lm(_base_config(model))
        if config.loss is Loss.CHUNKED:
            refuse = chunked_loss_refusal(config, masked=self.masked_lm)
            if refuse:
                raise MemplanError(refuse)
        self.device_type = next(model.parameters()).device.type
        self.warnings += m.warnings(config)

    def __call__(self, batch: dict):
        return self.run(batch).loss

    def run(self, batch: dict) -> StepInfo:
        """One step; what it drew and estimated comes back with the loss."""
        self.hooks.phase(Phase.LOAD)
        return self.method.run(self, batch)

    def autocast(self):
        import torch

        # FSDP2's MixedPrecisionPolicy already gathers 16-bit parameters: no autocast over them.
        if not self.config.dtype.is_amp or distributed.mixed_precision(self.config):
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.config.dtype.compute_torch_name))

    def kwargs(self, batch: dict) -> dict:
        kw = dict(batch)
        if not self.masked_lm:
            kw["use_cache"] = self.config.use_cache
        return kw

    def loss(self, batch: dict, model=None):
        """The loss of one forward of `model` (default: the step's) on `batch`, as `config.loss` asks."""
        model = self.model if model is None else model
        if self.config.loss is Loss.CHUNKED:
            return chunked_loss(model, self.kwargs(batch), self.config.loss_chunks)
        return model(**self.kwargs(batch)).loss

    def tag_optimizer_state(self, params) -> None:
        """Tag the optimizer's tensors of `params`: its state; torch's step counters, host tensors on
        CUDA unless the step is fused; bitsandbytes' paged state, in unified (host) memory."""
        import torch

        from memplan.savers import PAGED_MIN

        state, host, paged = [], [], []
        fused = bool(getattr(self.optimizer, "defaults", {}).get("fused"))
        is_paged = self.config.optim.value == "paged-8bit"
        for p in params:
            for k, v in self.optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    continue
                if k == "step" and not fused:
                    host.append(v)
                elif is_paged and k in ("state1", "state2") and v.dtype == torch.uint8 and p.numel() >= PAGED_MIN:
                    paged.append(v)
                else:
                    state.append(v)
        self.hooks.tag(Category.OPTIMIZER_STATE, state + paged)
        self.hooks.host(host)
        self.hooks.offloaded(paged)

    @contextlib.contextmanager
    def offloading(self):
        """With --activation-offload: what the decoder saves for backward waits in host memory.

        A `saved_tensors_hooks` pair as torch's `save_on_cpu` (pinned host copies on CUDA), but
        weights stay where they are and only the decoder's tensors go (the lm_head and the loss
        run after it and keep theirs, as torchtune's offloading does); a tensor saved by several
        nodes is copied once. Backward copies each back to the GPU for the node that needs it.
        """
        if not self.config.activation_offload:
            yield
            return
        import weakref

        import torch

        from memplan._compat import storage_key

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        weights = {storage_key(t.untyped_storage()) for t in [*self.model.parameters(), *self.model.buffers()]}
        on = [False]
        copies: dict[tuple, tuple] = {}  # (id(base), view) -> (a weak reference to the base, its host copy)
        pin = self.device_type == "cuda"
        hooks = self.hooks

        def pack(t):
            if not on[0] or storage_key(t.untyped_storage()) in weights:
                return t
            # One copy per tensor, however many nodes save it or a view of it alike (linear layers save
            # their own `view(-1, h)` of a shared input); keyed by the base tensor while it lives, since
            # an id may be reused once it dies.
            src = t._base if t._base is not None else t
            key = (id(src), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            known = copies.get(key)
            if known is not None and known[0]() is src:
                return known[1]
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            hooks.offloaded([host])
            copies[key] = (weakref.ref(src), (t.device, host))
            return copies[key][1]

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            out = torch.empty(host.shape, dtype=host.dtype, device=device)  # a new block, even on the CPU
            return out.copy_(host, non_blocking=pin)

        # From the token embedding to the lm_head: the decoder (some models call it past their base model).
        handles = [base.get_input_embeddings().register_forward_pre_hook(lambda *_: on.__setitem__(0, True)),
                   base.get_output_embeddings().register_forward_pre_hook(lambda *_: on.__setitem__(0, False))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            for h in handles:
                h.remove()


def chunked_loss(model, kwargs: dict, chunks: int):
    """Mean token cross-entropy with the lm_head, fp32 upcast and loss run per chunk of the sequence.

    The base model returns hidden states (no logits); each chunk's `lm_head(h).float()` and
    `cross_entropy(reduction='sum')` follow, summed and divided by the counted tokens: transformers'
    ForCausalLMLoss (labels shifted left, -100 appended and ignored), without the whole fp32 logits.
    Autograd still saves each chunk's log-softmax output for backward (nothing is recomputed).
    """
    import torch
    import torch.nn.functional as F

    kw = dict(kwargs)
    labels = kw.pop("labels")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = getattr(base, base.base_model_prefix)(**kw).last_hidden_state
    head = base.get_output_embeddings()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    total = None
    for h, y in zip(hidden.chunk(chunks, dim=1), shifted.chunk(chunks, dim=1)):
        logits = head(h).float()
        part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                               reduction="sum")
        del logits
        total = part if total is None else total + part
    return total / (shifted != -100).sum()


def z_like(p):
    """A direction z ~ N(0, 1) shaped like p, in its dtype and on its device (drawn from torch's seed).

    For a sharded parameter (a DTensor, under FSDP) z is drawn for this rank's shard only, as a
    sharded ZO step perturbs each rank's shard of the weights.
    """
    import torch

    local = _compat.local_tensor(p.data)
    z = torch.normal(mean=0, std=1, size=local.size(), device=local.device, dtype=local.dtype)
    return _compat.shaped_as(z, p)


def scalar(t) -> float:
    """The value of a 0-d tensor (a host sync on CUDA, as MeZO's `.item()`).

    Fake tensors have no value: the tracer gets 1.0, which changes no shape and so no byte.
    """
    if is_fake(t):
        return 1.0
    return float(t.item())


def is_fake(t) -> bool:
    """True for a FakeTensor (the tracer's): it has a shape and a device but no values."""
    return _compat.is_fake(t)
