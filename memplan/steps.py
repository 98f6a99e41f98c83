"""The real training step of every method, one device-agnostic function each.

The tracer runs these steps on fake tensors and the calibration runner runs them on CUDA, so both
measure the same code. A step reports where it is through `Hooks` (`phase` at the start of each
phase; `tag`/`bind`/`region`/`host` say what its tensors are for, so a tracker can sort bytes into
categories). Nothing here knows whether its tensors are fake.

What each step keeps alive, and when (|x| = trainable parameters, W = all weights, in weight dtype):

- every method, between steps: W (+ buffers). Under amp, autocast's cast cache also holds a 16-bit
  copy of every *trainable* weight while a forward (and, FO, its backward) runs; frozen weights are
  cast per use and the copies that backward needs are saved with the activations.
- fo-sgd / fo-adam: `zero_grad(set_to_none=True)` at the start (so LOAD still holds the previous
  step's gradients), forward under autocast (activations saved for backward, logits freed when the
  output is dropped, the loss's fp32 log-softmax saved), backward (activations freed as gradients
  appear; |x| of gradients at its end), `optimizer.step()` (SGD: momentum buffer if momentum > 0;
  Adam: exp_avg + exp_avg_sq, created in the first step; foreach temporaries of about one |x|).
  Gradients stay alive until the next step's zero_grad. Gradient checkpointing saves layer inputs
  only and recomputes each layer in backward.
- forward-grad: FORWARD holds tangents v = randn_like(p) for every trainable p (|x|) and runs one
  dual forward (`torch.autograd.forward_ad`) over `functional_call`: primal and tangent activations live only as long as the
  forward needs them (nothing is saved for a backward). OPTIMIZER_STEP: `p.sub_(lr * (v * jvp))`
  (two |p| temporaries per tensor), then v is freed. On sdpa models the forward runs SDPA's math
  backend, since the fused kernels have no forward-AD rule (see `Step.warnings`).
- zo-* (q = 1): no gradients between steps. PERTURB: seed, then per tensor z ~ N(0, 1) in the
  weight dtype; MeZO's reference (`Perturbation.MEZO`) `p.data = p.data + s * z * eps` holds at most three
  |p|-sized tensors at once (z, s*z, (s*z)*eps; then z, (s*z)*eps, the new copy), the
  in-place version `p.data.add_(z, alpha=s * eps)` holds z only, plus the previous tensor's z until
  the new one replaces it. FORWARD (x2, x5 for cons) under `torch.no_grad()`: one forward's live
  activations, no saved ones; logits freed with the output. OPTIMIZER_STEP: z regenerated from the
  seed, per tensor:
  - every method (zo-sgd with `Perturbation.MEZO` too): ZO-Bench's update, `p.grad = g * z / q;
    optimizer.step(); p.grad = None` (z, g*z and the quotient: three |p| at once; at most one
    parameter's gradient alive). zo-sgd: plain SGD; zo-sgd-mmt: SGD momentum (1x |x| state);
    zo-sgd-sign: sign(g); zo-sgd-cons: SGD, two candidate updates each followed by a forward, then
    at most one more; zo-adam: Adam (exp_avg + exp_avg_sq, 2x |x|). MeZO's own repository updates
    out of place instead (`p.data = p.data - lr * (g * z + wd * p.data)`, four |p| at once); ZO-Bench's
    measured curve matches three, so memplan models ZO-Bench's.
  - zo-sgd in place: `p.add_(z, alpha=-lr * g)` (z only).
- zo-* with q > 1: `p.grad` accumulates g_i * z_i / q over the queries for every trainable p (1x |x|,
  ZO-Bench's `zo_step_v1`), then one `optimizer.step()` over all of them (zo-sgd: plain SGD).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable

from memplan.errors import MemplanError
from memplan.result import Category, Phase
from memplan.options import Attention, Config, Method, Perturbation, Scheme

LR = 1e-3
ZO_EPS = 1e-3  # MeZO / ZO-Bench default
ZO_MOMENTUM = 0.9  # ZO-Bench's zo_sgd_momen sweeps


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


class PhaseHooks(Hooks):
    """Hooks that only forward phase boundaries to a callback (what the calibration runner needs)."""

    def __init__(self, on_phase: Callable[[Phase], None]):
        self._on_phase = on_phase

    def phase(self, phase: Phase) -> None:
        self._on_phase(phase)


# ---- the model and its batch -----------------------------------------------------------------


def model_config_dict(model: str) -> tuple[str, dict]:
    """(name, transformers config fields) of a catalog model, alias or config.json path.

    Architectures outside memplan's analytic catalog still trace, as long as transformers builds them.
    """
    from memplan.spec import resolve

    try:
        spec = resolve(model)
        return spec.name, dict(spec.config)
    except MemplanError:
        from memplan.configs import check_config, config_path, read_config

        path = config_path(model)
        if path is None or path.suffix != ".json":
            raise
        cfg = read_config(path)
        check_config(cfg, str(path))
        if not isinstance(cfg, dict) or not cfg.get("model_type"):
            raise MemplanError(f"{model}: config has no 'model_type'") from None
        return str(model), cfg


def hf_config(config: Config):
    """The transformers config object, or a MemplanError naming what transformers refused."""
    from transformers import AutoConfig

    _, fields = model_config_dict(config.model)
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    model_type = fields.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError...
        raise MemplanError(f"{config.model}: transformers cannot build a {model_type!r} config: "
                           f"{_one_line(e)}") from None
    return cfg


def is_masked_lm(cfg) -> bool:
    """Encoders (roberta, bert) train as masked LMs; everything else as a causal LM."""
    return cfg.model_type in ("roberta", "bert", "xlm-roberta", "deberta", "deberta-v2", "electra")


def lora_targets(config: Config, cfg) -> list[str]:
    """Config's LoRA targets; empty means the architecture's default (peft's own mapping)."""
    if config.lora_targets:
        return list(config.lora_targets)
    from memplan.spec import LORA_TARGETS

    if cfg.model_type in LORA_TARGETS:
        return list(LORA_TARGETS[cfg.model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    if cfg.model_type in peft_map:
        return list(peft_map[cfg.model_type])
    raise MemplanError(f"no default LoRA targets for model_type {cfg.model_type!r}; name them in lora_targets")


def build_model(config: Config, device="cpu"):
    """The model with random weights on `device` ('meta' builds no storage), PEFT-wrapped, in train mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = hf_config(config)
    auto = AutoModelForMaskedLM if is_masked_lm(cfg) else AutoModelForCausalLM
    dtype = getattr(torch, config.dtype.torch_name)
    try:
        with torch.device(device):
            model = auto.from_config(cfg, dtype=dtype, attn_implementation=config.attention.value)
    except MemplanError:
        raise
    except Exception as e:
        raise MemplanError(f"{config.model}: transformers cannot build the model: {_one_line(e)}") from None
    if config.grad_checkpointing and config.method.is_fo:
        # Non-reentrant: works with PEFT (no input needing grad) and saves only layer inputs.
        kwargs = {"use_reentrant": False}
        if torch.device(device).type not in ("cpu", "meta") and not torch.cuda.is_available():
            kwargs["preserve_rng_state"] = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.scheme is not Scheme.FT:
        model = _peft(config, cfg, model)
    model.train()
    return model


def _peft(config: Config, cfg, model):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    task = TaskType.CAUSAL_LM if not is_masked_lm(cfg) else TaskType.FEATURE_EXTRACTION
    if config.scheme is Scheme.LORA:
        pc = LoraConfig(task_type=task, r=config.lora_rank, lora_alpha=config.lora_alpha,
                        target_modules=lora_targets(config, cfg), lora_dropout=0.0)
    elif config.scheme is Scheme.PREFIX:
        pc = PrefixTuningConfig(task_type=task, num_virtual_tokens=config.prefix_tokens)
    else:
        pc = PromptTuningConfig(task_type=task, num_virtual_tokens=config.prompt_tokens)
    try:
        return get_peft_model(model, pc)
    except Exception as e:
        raise MemplanError(f"{config.model}: peft cannot apply {config.scheme.value}: {_one_line(e)}") from None


def make_batch(config: Config, model, device="cpu", *, seed: int = 0) -> dict:
    """Random token ids (batch x seq) in the vocabulary; labels = input_ids."""
    import torch

    vocab = _base_config(model).vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (config.batch, config.seq), generator=gen)
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids}


def _base_config(model):
    return getattr(model, "config", None) or model.base_model.config


def trainable(model) -> list[tuple[str, object]]:
    """(name, parameter) of every trainable parameter, tied ones once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---- the step -------------------------------------------------------------------------------


class Step:
    """One full training step of `config.method`; call it with a batch, it returns the loss tensor."""

    def __init__(self, config: Config, model, *, hooks: Hooks | None = None,
                 on_phase: Callable[[Phase], None] | None = None, lr: float = LR, eps: float = ZO_EPS,
                 seed: int = 0):
        import torch

        self.config, self.model = config, model
        self.hooks = hooks or (PhaseHooks(on_phase) if on_phase else Hooks())
        self.lr, self.eps = lr, eps
        self.params = trainable(model)
        self.rng = random.Random(seed)
        self.warnings: list[str] = []
        self.last: dict = {}  # per-step facts for tests: seeds, projected gradients
        m, foreach = config.method, config.foreach
        ps = [p for _, p in self.params]
        if config.zo_queries > 1 and m in (Method.FORWARD_GRAD, Method.ZO_SGD_CONS):
            raise MemplanError(f"{m.value} takes one query per step (zo_queries=1), as ZO-Bench's does")
        if config.grad_checkpointing and not m.is_fo:
            self.warnings.append("gradient checkpointing only changes first-order methods; ignored")
        self.optimizer = None
        if m in (Method.FO_SGD,):
            self.optimizer = torch.optim.SGD(ps, lr=lr, momentum=config.momentum, foreach=foreach)
        elif m in (Method.FO_ADAM, Method.ZO_ADAM):
            self.optimizer = torch.optim.Adam(ps, lr=lr, foreach=foreach)
        elif m is Method.ZO_SGD_MMT:
            self.optimizer = torch.optim.SGD(ps, lr=lr, momentum=config.momentum or ZO_MOMENTUM, foreach=foreach)
        elif m in (Method.ZO_SGD, Method.ZO_SGD_SIGN, Method.ZO_SGD_CONS):
            self.optimizer = torch.optim.SGD(ps, lr=lr, momentum=0.0, foreach=foreach)
        self.masked_lm = is_masked_lm(_base_config(model))
        self.device_type = next(model.parameters()).device.type
        if m is Method.FORWARD_GRAD and config.attention is Attention.SDPA:
            self.warnings.append("forward-grad: fused SDPA kernels have no forward-AD rule; "
                                 "the dual forward runs SDPA's math backend (seq^2 scores)")

    # ---- shared pieces ----

    def __call__(self, batch: dict):
        m = self.config.method
        self.hooks.phase(Phase.LOAD)
        if m.is_fo:
            return self._fo(batch)
        if m is Method.FORWARD_GRAD:
            return self._forward_grad(batch)
        if m is Method.ZO_SGD_CONS:
            return self._zo_cons(batch)
        return self._zo(batch)

    def _autocast(self):
        import torch

        if not self.config.dtype.is_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.config.dtype.compute_torch_name))

    def _kwargs(self, batch: dict) -> dict:
        kw = dict(batch)
        if not self.masked_lm:
            kw["use_cache"] = self.config.use_cache
        return kw

    def _tag_optimizer_state(self, params) -> None:
        import torch

        state, host = [], []
        for p in params:
            for k, v in self.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    (host if k == "step" else state).append(v)
        self.hooks.tag(Category.OPTIMIZER_STATE, state)
        self.hooks.host(host)

    # ---- first order ----

    def _fo(self, batch):
        h = self.hooks
        self.optimizer.zero_grad(set_to_none=True)
        h.phase(Phase.FORWARD)
        with self._autocast():
            loss = self.model(**self._kwargs(batch)).loss  # the output (and its logits) dies here
        h.phase(Phase.BACKWARD)
        loss.backward()
        ps = [p for _, p in self.params]
        h.tag(Category.GRADIENTS, [p.grad for p in ps if p.grad is not None])
        h.phase(Phase.OPTIMIZER_STEP)
        with h.region(Category.OPTIMIZER_STATE):
            self.optimizer.step()
        self._tag_optimizer_state(ps)
        return loss.detach()

    # ---- forward gradient ----

    def _forward_grad(self, batch):
        """One dual forward (forward-mode AD) along random tangents, then p -= lr * jvp * v (ZO-Bench).

        Dual tensors (`torch.autograd.forward_ad`) rather than `torch.func.jvp`: the same forward-mode
        AD, but the tensors stay plain tensors, so transformers' checks that skip data-dependent
        branches on fake tensors still see fake tensors.
        """
        import torch
        import torch.autograd.forward_ad as fwad
        from torch.func import functional_call

        h = self.hooks
        kwargs = self._kwargs(batch)
        h.phase(Phase.FORWARD)
        seed = self.rng.randrange(10**9)
        torch.manual_seed(seed)
        with h.region(Category.TANGENTS):
            vs = [torch.randn_like(p) for _, p in self.params]
        with fwad.dual_level(), self._autocast(), self._math_sdpa():
            duals = {n: fwad.make_dual(p.detach(), v) for (n, p), v in zip(self.params, vs)}
            out = fwad.unpack_dual(functional_call(self.model, duals, (), kwargs).loss)
            del duals
            loss, dloss = out.primal.detach(), out.tangent.detach()
            del out
        self.last = {"seed": seed, "jvp": dloss}
        h.phase(Phase.OPTIMIZER_STEP)
        with torch.no_grad():
            for v, (_, p) in zip(vs, self.params):
                p.sub_(self.lr * (v * dloss))
        del vs
        return loss

    def _math_sdpa(self):
        if self.config.attention is not Attention.SDPA:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    # ---- zeroth order ----

    def _zo_forward(self, batch):
        import torch

        self.hooks.phase(Phase.FORWARD)
        with torch.no_grad(), self._autocast():
            return self.model(**self._kwargs(batch)).loss.detach()

    def _directions(self, seed: int):
        """(p, z) for every trainable p, z regenerated from `seed`, under no_grad in the perturbation region."""
        import torch

        torch.manual_seed(seed)
        with torch.no_grad(), self.hooks.region(Category.PERTURBATION):
            for _, p in self.params:
                yield p, _z(p)

    def _perturb(self, seed: int, scale: float) -> None:
        """Move every trainable weight by scale * eps * z(seed), as MeZO's zo_perturb_parameters."""
        self.hooks.phase(Phase.PERTURB)
        mezo = self.config.perturbation is Perturbation.MEZO
        for p, z in self._directions(seed):
            if mezo:
                p.data = p.data + scale * z * self.eps
                self.hooks.bind(Category.WEIGHTS, [p])
            else:
                p.data.add_(z, alpha=scale * self.eps)

    def _projected_grad(self, batch, seed: int):
        """Two-sided estimate (f(w + eps z) - f(w - eps z)) / (2 eps); leaves the weights restored."""
        self._perturb(seed, 1.0)
        loss1 = self._zo_forward(batch)
        self._perturb(seed, -2.0)
        loss2 = self._zo_forward(batch)
        self._perturb(seed, 1.0)
        return loss1, (loss1 - loss2) / (2 * self.eps)

    def _zo(self, batch):
        q = self.config.zo_queries
        seeds = [self.rng.randrange(10**9) for _ in range(q)]
        grads = []
        for seed in seeds:
            loss, g = self._projected_grad(batch, seed)
            gv = scalar(g)
            if self.config.method is Method.ZO_SGD_SIGN:
                gv = float((gv > 0) - (gv < 0))
            grads.append(gv)
            if q > 1:
                self._accumulate(seed, gv / q)
        self.last = {"seeds": seeds, "projected_grads": grads, "loss": loss}
        self.hooks.phase(Phase.OPTIMIZER_STEP)
        if q > 1:
            with self.hooks.region(Category.OPTIMIZER_STATE):
                self.optimizer.step()
            self._tag_optimizer_state([p for _, p in self.params])
            self.optimizer.zero_grad(set_to_none=True)
        elif self.config.method is Method.ZO_SGD:
            self._sgd_update(seeds[0], grads[0])
        else:
            self._optimizer_update(seeds[0], grads[0])
        return loss

    def _accumulate(self, seed: int, coeff: float) -> None:
        """q > 1: p.grad += coeff * z for every trainable p (ZO-Bench's zo_step_v1 accumulator)."""
        self.hooks.phase(Phase.OPTIMIZER_STEP)
        for p, z in self._directions(seed):
            if p.grad is None:
                p.grad = coeff * z
                self.hooks.tag(Category.OPTIMIZER_STATE, [p.grad])
            else:
                p.grad.add_(z, alpha=coeff)

    def _sgd_update(self, seed: int, g: float) -> None:
        """zo-sgd: ZO-Bench's update (`p.grad = g * z / q; optimizer.step()`), or in place `p += -lr g z`."""
        if self.config.perturbation is Perturbation.MEZO:
            self._optimizer_update(seed, g)
            return
        self.hooks.phase(Phase.OPTIMIZER_STEP)
        for p, z in self._directions(seed):
            p.data.add_(z, alpha=-self.lr * g)

    def _optimizer_update(self, seed: int, g: float, sign: float = 1.0) -> None:
        """ZO-Bench's update: per parameter, p.grad = sign * g * z, optimizer.step(), p.grad = None."""
        import torch

        h = self.hooks
        h.phase(Phase.OPTIMIZER_STEP)
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, p in self.params:
                with h.region(Category.PERTURBATION):
                    z = _z(p)
                    gz = g * z / self.config.zo_queries  # ZO-Bench: projected_grad * z / args.q
                    p.grad = sign * gz if sign != 1.0 else gz
                h.tag(Category.GRADIENTS, [p.grad])
                with h.region(Category.OPTIMIZER_STATE):
                    self.optimizer.step()
                self._tag_optimizer_state([p])
                p.grad = None
                del z, gz

    def _zo_cons(self, batch):
        """Conservative ZO-SGD (ZO-Bench's zo_conserv_step): keep the best of w, w - lr g z, w + lr g z."""
        loss0 = self._zo_forward(batch)
        seed = self.rng.randrange(10**9)
        loss1, g = self._projected_grad(batch, seed)
        gv = scalar(g)
        self._optimizer_update(seed, gv)
        loss_minus = self._zo_forward(batch)  # at w - lr g z
        self._optimizer_update(seed, gv, sign=-2.0)
        loss_plus = self._zo_forward(batch)  # at w + lr g z
        l0, lm, lp = scalar(loss0), scalar(loss_minus), scalar(loss_plus)
        self.last = {"seeds": [seed], "projected_grads": [gv], "losses": (l0, lm, lp)}
        if is_fake(loss0):  # no values to compare: take the costlier branch, a third update
            self._optimizer_update(seed, gv, sign=2.0)
        elif lm > l0:
            if l0 < lp:
                self._optimizer_update(seed, gv)  # back to w
        elif lm < lp:
            self._optimizer_update(seed, gv, sign=2.0)  # to w - lr g z
        return loss0


def make_step(config: Config, model, *, hooks: Hooks | None = None,
              on_phase: Callable[[Phase], None] | None = None, lr: float = LR, eps: float = ZO_EPS,
              seed: int = 0) -> Step:
    """The step of `config.method` over `model`'s trainable parameters; see the module docstring."""
    return Step(config, model, hooks=hooks, on_phase=on_phase, lr=lr, eps=eps, seed=seed)


def _z(p):
    """A direction z ~ N(0, 1) shaped like p, in its dtype and on its device (drawn from torch's seed)."""
    import torch

    return torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)


def scalar(t) -> float:
    """The value of a 0-d tensor (a host sync on CUDA, as MeZO's `.item()`).

    Fake tensors have no value: the tracer gets 1.0, which changes no shape and so no byte.
    """
    if is_fake(t):
        return 1.0
    return float(t.item())


def is_fake(t) -> bool:
    """True for a FakeTensor (the tracer's): it has a shape and a device but no values."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
