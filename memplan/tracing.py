"""The trace tier: run the real training step on fake tensors and count its live bytes exactly.

The model is built on the meta device (no storage, no init cost), its parameters and buffers are
replaced by fake tensors, and `memplan.steps` runs one warm-up step (optimizer state appears
lazily) and one measured step under `memplan.tracker.LiveBytes`. The peak of the measured step, by
category and phase, becomes an `Estimate` with the overheads of `memplan.overhead`.

Why fake *CPU* tensors: FakeTensorMode makes tensors with device 'cuda' on a CPU-only build, but the
first autograd node over one aborts the process (autograd's InputMetadata asks for a CUDA device
guard that a CPU build lacks). So the trace runs on fake CPU tensors and keeps what CUDA would do:
- the optimizers run with `foreach` as the Config says (torch's default on CUDA) and Adam's step
  counters, host tensors on CUDA, are not counted (`cuda_host`);
- sdpa: the CPU picks `_scaled_dot_product_flash_attention_for_cpu` (saves the output and an fp32
  logsumexp of batch x heads x seq), as CUDA's flash kernel does; CUDA's memory-efficient kernel
  (fp32, or a mask) pads the logsumexp to a multiple of 32 tokens: at most batch x heads x 31 x 4 B
  more per layer. With attention dropout the CPU's SDPA would fall back to its math path and
  materialise seq^2 scores that CUDA's fused kernels do not: on fake tensors SDPA with dropout runs
  the CPU flash kernel's fake instead (`_compat.sdpa_dropout_fused`); real CPU tensors cannot, and
  their `Estimate.warnings` say so;
- eager attention's fp32 softmax of fp16 scores reads them as they are, as CUDA's half-to-float
  kernel does (`_compat.softmax_half_to_float`); the CPU would first copy them to fp32;
- autocast runs with the CPU's op lists: like CUDA's for matmuls (16-bit) and the loss (fp32), but
  CUDA also runs layer_norm and a dtype-less softmax in fp32; those outputs are transient (the
  16-bit copy the next matmul saves is the same), so saved bytes agree;
- allocations inside kernels (cuBLAS workspace, flash-attention backward accumulators) are not op
  outputs and are seen by neither; the workspace comes from `memplan.overhead`.

With --num-gpus N and fsdp or ddp, the trace is rank 0 of N in torch's fake process group
(`memplan.distributed`): the model is wrapped as a trainer wraps it, collectives allocate their
buffers but move nothing, and the bytes are that rank's. ZeRO (DeepSpeed) and offload are refused.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

from memplan.errors import MemplanError
from memplan.result import Category, Estimate, Phase, Tier
from memplan.options import Attention, Config, Loss, Quant, Scheme, Sharding


@dataclass
class Traced:
    """One traced (or real) step: the tracker's peak plus facts about the model."""

    peak: object  # memplan.tracker.Peak; None for a symbolic trace (its peak depends on batch and seq)
    trainable_params: int
    total_params: int
    warnings: list[str]
    tracker: object = None  # the LiveBytes that counted it (its events replay the step)
    start: int = 0  # the measured step's first event
    sizes: tuple = ()  # (batch, seq) as the step saw them: ints, or SymInts for a symbolic trace
    shape_env: object = None


MAX_CYCLE_STEPS = 8  # a method whose steps repeat every n: the trace measures n steps, at most this many


def fake_model(config: Config, fake_mode, device: str = "cpu"):
    """The model built on meta, then every parameter and buffer swapped for a fake tensor on `device`.

    A quantised model (`--quant`) gets its fake weights before bitsandbytes quantises them (under
    `fake_mode`, whose kernels give the packed shapes), and its adapters are made fake as peft adds them.
    """
    from memplan.steps import build_model

    swap = functools.partial(_fake_tensors, fake_mode=fake_mode, device=device)
    if config.quant is Quant.NONE:
        return swap(build_model(config, "meta"))
    return swap(build_model(config, "meta", materialise=swap, mode=fake_mode))


def _fake_tensors(model, *, fake_mode, device: str):
    """Every parameter and buffer of `model` that is not fake yet replaced by a fake one (tied stay tied)."""
    import torch

    from memplan._compat import is_fake

    memo: dict[int, torch.Tensor] = {}
    with fake_mode:
        for module in model.modules():
            for slots in (module._parameters, module._buffers):
                for key, t in slots.items():
                    if t is None or is_fake(t):
                        continue
                    if id(t) not in memo:  # tied weights stay tied
                        new = torch.empty(t.shape, dtype=t.dtype, device=device)
                        if isinstance(t, torch.nn.Parameter):
                            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                        memo[id(t)] = new
                    slots[key] = memo[id(t)]
            for key, value in vars(module).items():  # peft keeps index tensors in plain dicts
                if isinstance(value, dict):
                    for k, v in list(value.items()):
                        if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) \
                                and not is_fake(v):
                            value[k] = torch.empty(v.shape, dtype=v.dtype, device=device)
    return model


def trace_step(config: Config, *, real: bool = False,
               on_phase: Callable[[str, Phase], None] | None = None, seed: int = 0,
               symbolic: bool = False, layers: bool = False) -> Traced:
    """Run a warm-up and a measured step under the tracker; return the measured step's peak.

    real=True runs the same step on real CPU tensors (random weights), for fake-against-real checks.
    Fake tensors keep what CUDA would do where the CPU differs (host-side step counters).
    symbolic=True makes batch and seq symbolic sizes (config.batch and config.seq are their hints):
    every byte count becomes a formula of the two, and the caller replays `Traced.tracker`'s events
    (`memplan.symbolic`); no peak is taken here, since comparing formulas would pin them.
    With several GPUs (fsdp, ddp) this process runs rank 0 in a fake process group.
    layers=True labels the events by decoder layer (`LiveBytes.label_layers`, for depth extrapolation).
    """
    import torch

    from memplan import _compat, distributed, methods
    from memplan.analytic import not_modelled
    from memplan.steps import Step, build_model, make_batch, trainable

    sharding = distributed.layout(config)
    refuse = not_modelled(config) or distributed.trace_refusal(config)
    if refuse:
        raise MemplanError(refuse)
    if symbolic and sharding is not Sharding.NONE:
        raise MemplanError("a symbolic trace runs one GPU's step; trace a layout with concrete sizes")
    spec = methods.get(config.method)
    why = spec.untraceable(config)
    if why and not real:
        raise MemplanError(why)
    cycle = spec.cycle(config)
    measured = min(cycle, MAX_CYCLE_STEPS)
    with contextlib.ExitStack() as ranks:
        mesh = None
        if sharding is not Sharding.NONE:  # this process is rank 0 of num_gpus; collectives move nothing
            ranks.enter_context(_compat.fake_process_group(config.num_gpus))
            mesh = _compat.device_mesh("cpu", config.num_gpus)
        if real:
            torch.manual_seed(seed)
            model, mode = build_model(config, "cpu"), contextlib.nullcontext()
        elif symbolic:
            mode = _compat.fake_tensor_mode()(shape_env=_compat.symbolic_shape_env())
            model = fake_model(config, mode)
        else:
            mode = _compat.fake_tensor_mode()()
            model = fake_model(config, mode)
        sizes = _compat.symbolic_sizes(mode, config.batch, config.seq) if symbolic else (config.batch, config.seq)
        base = getattr(model, "config", None) or model.base_model.config
        total = sum(t.numel() for t in model.parameters())
        if sharding is Sharding.FSDP:
            with mode:
                distributed.shard(model, mesh, config)
        tracker = _tracker(config, base, sizes, real=real, distributed=sharding is not Sharding.NONE)
        seen: dict[int, object] = {}
        for t in [*model.parameters(), *model.buffers(), *_quant_state(config, model)]:
            seen.setdefault(id(t), t)
        tracker.adopt(seen.values(), Category.WEIGHTS)
        if layers:
            tracker.label_layers(decoder_layers(model, base))
        params = trainable(model)
        n_train = sum(p.numel() for _, p in params)  # a DTensor's numel is the whole tensor's
        label = ["warm-up"]
        if on_phase is not None:
            record = tracker.phase

            def phase(ph: Phase) -> None:
                record(ph)
                on_phase(label[0], ph)

            tracker.phase = phase
        watch = distributed.watched(tracker) if sharding is not Sharding.NONE else contextlib.nullcontext()
        experts = contextlib.nullcontext() if real else _compat.grouped_mm_in_any_dtype()
        fg = spec.family is methods.Family.FG  # forward AD has no rule for the fused kernels: math path
        try:
            with mode, experts, _compat.sdpa_masks_as_for_real_tensors(), _compat.pad_without_pins(symbolic), \
                    _compat.softmax_half_to_float(not real), _compat.sdpa_dropout_fused(not real and not fg), watch:
                step = Step(config, model, hooks=tracker, seed=seed)
                with tracker:
                    if sharding is Sharding.DDP:  # its buckets are allocated here, by its reducer
                        with tracker.region(Category.COMMUNICATION):
                            step.model = distributed.replicate(model, fake=True)  # the fake process group
                    batch = make_batch(config, model, seed=seed, shape=sizes if symbolic else None)
                    step(batch)
                    start = tracker.mark()
                    label[0] = "measured"
                    for _ in range(measured):  # one whole cycle of the method's steps
                        step(batch)
        except MemplanError:
            raise
        except Exception as e:  # an op the tracer (fake tensors) cannot follow
            from memplan.errors import one_line

            raise MemplanError(f"cannot trace {config.model} {config.method.value}: "
                               f"{type(e).__name__}: {one_line(e)}") from None
    warnings = list(step.warnings)
    if measured < cycle:
        warnings.append(f"{config.method.value}: its steps repeat every {cycle}; the trace measured the first "
                        f"{measured} after the warm-up, so a peak in a later one is not seen")
    warnings += _attention_warnings(config, base) if real or spec.family is methods.Family.FG else []
    peak = None if symbolic else tracker.peak(start)
    return Traced(peak, n_train, total, warnings, tracker=tracker, start=start, sizes=sizes,
                  shape_env=mode.shape_env if symbolic else None)


def decoder_layers(model, base) -> list[tuple[int, list]]:
    """(index, parameters) of each decoder layer: the children of the outermost ModuleList with
    `num_hidden_layers` entries (`model.layers`, `transformer.h`, `encoder.layer`...)."""
    import torch

    n = getattr(base, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return [(i, list(layer.parameters())) for i, layer in enumerate(module)]
    raise MemplanError(f"{type(model).__name__}: no list of {n} decoder layers found")


def _quant_state(config: Config, model) -> list:
    """The quantisation state bitsandbytes keeps beside the weights (absmax, codes, row statistics)."""
    if config.quant is Quant.NONE:
        return []
    from memplan import quant

    return quant.state_tensors(model)


def _tracker(config: Config, base, sizes, *, real: bool, distributed: bool):
    """The live-bytes tracker for one step of `config` (which tensors are logits, what lives on the host).
    `sizes`: (batch, seq), symbolic in a symbolic trace."""
    from memplan.tracker import LiveBytes

    b, seq = sizes
    rows = seq + (config.prompt_tokens if config.scheme is Scheme.PROMPT else 0)
    numels = [b * rows * base.vocab_size, b * (rows - 1) * base.vocab_size]
    if config.loss is Loss.CHUNKED:  # torch.chunk: pieces of ceil(rows / n) rows, the last one shorter
        piece = -(-rows // config.loss_chunks)
        numels += [b * piece * base.vocab_size, b * (rows % piece or piece) * base.vocab_size]
    return LiveBytes(vocab_size=base.vocab_size, cuda_host=not real, logits_numels=tuple(numels),
                     distributed=distributed)


def _attention_warnings(config: Config, cfg) -> list[str]:
    if config.attention is not Attention.SDPA:
        return []
    p = max((getattr(cfg, k, 0) or 0) for k in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop"))
    if p > 0:
        return [f"attention dropout {p}: on the CPU, SDPA falls back to its math path (seq^2 scores); "
                "CUDA's fused kernels do not, so this trace over-counts attention"]
    return []


def trace(config: Config, *, gpu=None, on_phase: Callable[[str, Phase], None] | None = None,
          spec=None) -> Estimate:
    """The trace-tier Estimate of one configuration (a `hardware.Gpu` judges the fit).

    The traced tensor bytes go through the same pipeline as the analytic tier's (`pipeline.finish`):
    the cuBLAS workspace (inside kernels, so invisible to the tracer), reserved and device views, the
    calibration correction and the verdict. No max batch / seq search: each point would be a trace.
    """
    from memplan.pipeline import TraceTier, eager_without_sdpa, family_of, finish, model_of

    known = spec
    if known is None:
        try:
            known = model_of(config.model)
        except MemplanError:  # a config the tensor tables refuse still traces (transformers builds it)
            known = None
    config, note = eager_without_sdpa(config, known)
    tier = TraceTier(on_phase=on_phase)
    fam, _ = family_of(gpu)
    out = finish(tier.tensor_peak(config, spec, fam), config, spec, gpu, tier=Tier.TRACE, search=False)
    if note:
        out.warnings.insert(0, note)
    return out
