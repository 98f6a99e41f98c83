"""Stand-in step code for the calibration worker until `memplan.steps` (branch `trace`) merges.

Device-agnostic and small: build a model from a Config on a device, make a batch, run one step of
each method, announcing phases through `on_phase(Phase)`. It follows the implementations the
analytic estimator models (MeZO's out-of-place perturbation, torch optimizers with `foreach`,
`torch.func.jvp` for forward gradient). When `memplan.steps` merges, the worker's adapter calls it
instead and this module goes away; nothing else depends on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from memplan.result import Phase
from memplan.options import Attention, Config, Method, Perturbation, Scheme

LR = 1e-7  # tiny: memory does not depend on the step size, and weights stay finite
ZO_EPS = 1e-3
OnPhase = Callable[[Phase], None]


def _peft(model, cfg: Config):
    import peft

    if cfg.scheme is Scheme.LORA:
        conf = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                               task_type="CAUSAL_LM")
    elif cfg.scheme is Scheme.PREFIX:
        conf = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_tokens)
    else:
        conf = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prompt_tokens)
    return peft.get_peft_model(model, conf)


def build_model(cfg: Config, model_config: dict, device: torch.device):
    """A randomly initialised model (memory does not depend on the values), with its PEFT scheme."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(model_config)
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf_cfg.use_cache = cfg.use_cache
    dtype = getattr(torch, cfg.dtype.torch_name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=cfg.attention.value)
    if cfg.scheme is not Scheme.FT:
        model = _peft(model, cfg).to(device)
    if cfg.grad_checkpointing and cfg.method.is_fo:
        model.gradient_checkpointing_enable()
    model.train(cfg.method.is_fo)  # MeZO evaluates its perturbed forwards in eval mode
    return model


def make_batch(cfg: Config, model_config: dict, device: torch.device, seed: int = 0) -> dict:
    """Random token ids; the labels are the inputs (causal LM loss over every position)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(model_config["vocab_size"]), (cfg.batch, cfg.seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


class Stepper:
    """One method's training step over a model, keeping its state between steps."""

    def __init__(self, cfg: Config, model, seed: int = 0):
        self.cfg = cfg
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.rng = random.Random(seed)
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer = None
        self.notes: set[str] = set()  # where the step departs from what the config names
        if cfg.method is Method.FO_SGD:
            self.optimizer = torch.optim.SGD(self.params, lr=LR, momentum=cfg.momentum, foreach=cfg.foreach)
        elif cfg.method is Method.FO_ADAM:
            self.optimizer = torch.optim.Adam(self.params, lr=LR, foreach=cfg.foreach)
        if cfg.zo_queries > 1:
            raise NotImplementedError("fallback steps measure zo_queries = 1 only")

    def _autocast(self):
        dev = self.params[0].device.type if self.params else "cpu"
        if self.cfg.dtype.is_amp:
            return torch.autocast(dev, dtype=getattr(torch, self.cfg.dtype.compute_torch_name))
        return torch.autocast(dev, enabled=False)

    def loss(self, batch: dict) -> torch.Tensor:
        with self._autocast():
            return self.model(**batch, use_cache=self.cfg.use_cache).loss

    def step(self, batch: dict, on_phase: OnPhase) -> float:
        m = self.cfg.method
        if m.is_fo:
            return self._fo(batch, on_phase)
        if m is Method.FORWARD_GRAD:
            return self._fg(batch, on_phase)
        return self._zo(batch, on_phase)

    # ---- first order -----------------------------------------------------------------------

    def _fo(self, batch, on_phase):
        on_phase(Phase.FORWARD)
        loss = self.loss(batch)
        on_phase(Phase.BACKWARD)
        loss.backward()
        on_phase(Phase.OPTIMIZER_STEP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---- forward gradient ------------------------------------------------------------------

    def _fg_attention(self):
        """No fused SDPA kernel (flash, memory-efficient, cuDNN) has a forward-AD formula: use the math one."""
        from contextlib import nullcontext

        if self.cfg.attention is not Attention.SDPA:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.notes.add("forward-grad under sdpa runs the math SDPA backend (fused kernels lack forward AD)")
        return sdpa_kernel(SDPBackend.MATH)

    def _fg(self, batch, on_phase):
        from torch.func import functional_call, jvp

        names = [n for n, _ in self.named]
        tangents = tuple(torch.randn_like(p) for p in self.params)

        def f(*ps):
            with self._autocast():
                return functional_call(self.model, dict(zip(names, ps)), args=(), kwargs=batch).loss

        on_phase(Phase.FORWARD)
        with torch.no_grad(), self._fg_attention():
            loss, dloss = jvp(f, tuple(p.detach() for p in self.params), tangents)
        on_phase(Phase.OPTIMIZER_STEP)
        with torch.no_grad():
            for p, v in zip(self.params, tangents):
                p.sub_(LR * dloss * v)
        return float(loss)

    # ---- zeroth order (MeZO and its variants) ----------------------------------------------

    def _z(self, p: torch.Tensor) -> torch.Tensor:
        return torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)

    def _move(self, seed: int, scale: float) -> None:
        """theta += scale * z, z regenerated from the seed (MeZO: out of place; or in place)."""
        torch.manual_seed(seed)
        for p in self.params:
            z = self._z(p)
            if self.cfg.perturbation is Perturbation.MEZO:
                p.data = p.data + scale * z
            else:
                p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def _zo(self, batch, on_phase):
        seed = self.rng.randrange(1 << 31)
        on_phase(Phase.PERTURB)
        self._move(seed, ZO_EPS)
        on_phase(Phase.FORWARD)
        l1 = float(self.loss(batch))
        on_phase(Phase.PERTURB)
        self._move(seed, -2 * ZO_EPS)
        on_phase(Phase.FORWARD)
        l2 = float(self.loss(batch))
        on_phase(Phase.PERTURB)
        self._move(seed, ZO_EPS)
        g = (l1 - l2) / (2 * ZO_EPS)
        if self.cfg.method is Method.ZO_SGD_CONS:
            return self._zo_cons(batch, on_phase, seed, g)
        on_phase(Phase.OPTIMIZER_STEP)
        torch.manual_seed(seed)
        for p in self.params:
            self._update(p, g * self._z(p))
        return (l1 + l2) / 2

    def _update(self, p: torch.Tensor, gz: torch.Tensor) -> None:
        m = self.cfg.method
        st = self.state.setdefault(id(p), {})
        if m is Method.ZO_SGD_SIGN:
            gz = torch.sign(gz)
        elif m is Method.ZO_SGD_MMT:
            buf = st.setdefault("momentum", torch.zeros_like(p))
            buf.mul_(0.9).add_(gz)
            gz = buf
        elif m is Method.ZO_ADAM:
            m1 = st.setdefault("exp_avg", torch.zeros_like(p))
            m2 = st.setdefault("exp_avg_sq", torch.zeros_like(p))
            m1.mul_(0.9).add_(gz, alpha=0.1)
            m2.mul_(0.999).addcmul_(gz, gz, value=0.001)
            gz = m1 / (m2.sqrt() + 1e-8)
        if self.cfg.perturbation is Perturbation.MEZO:
            p.data = p.data - LR * gz
        else:
            p.data.sub_(gz, alpha=LR)

    def _zo_cons(self, batch, on_phase, seed, g):
        """Conservative ZO-SGD: three more forwards at theta, theta - lr*g*z, theta + lr*g*z; keep the best."""
        step = LR * g
        on_phase(Phase.FORWARD)
        losses = {0.0: float(self.loss(batch))}
        on_phase(Phase.PERTURB)
        self._move(seed, -step)
        on_phase(Phase.FORWARD)
        losses[-step] = float(self.loss(batch))
        on_phase(Phase.PERTURB)
        self._move(seed, 2 * step)
        on_phase(Phase.FORWARD)
        losses[step] = float(self.loss(batch))
        best = min(losses, key=losses.__getitem__)
        on_phase(Phase.OPTIMIZER_STEP)
        self._move(seed, best - step)
        return losses[best]
