"""Memory savers of the optimizer and the backward pass: what `--optim`, `--activation-offload`,
`--optimizer-in-backward` and `--grad-accum` change, as small formulas beside the rules of which
method takes which (`refusal`). Imports no torch. The first-order phases under offloading and
optimizer-in-backward are in `memplan/methods/fo_savers.py`, the real steps in `memplan/methods/fo.py`
and `memplan/steps.py` (`Step.offloading`).

Sources (read in the installed packages the steps run):
- torch.optim.Adam: `_multi_tensor_adam` takes `_foreach_sqrt(exp_avg_sqs)`, one temporary per
  tensor, all alive together; `_single_tensor_adam` makes `exp_avg_sq.sqrt() / bias_correction`
  (two temporaries of one tensor); `_fused_adam_` makes none, but keeps each step counter on the
  device (a 0-d fp32 tensor; the others keep it on the host).
- bitsandbytes `Optimizer2State.init_state`: tensors of fewer than `min_8bit_size` = 4096
  elements keep two fp32 states; larger ones two uint8 states and one fp32 absmax per block of
  256 elements each, and share two 256-entry fp32 quantisation maps. Paged: `get_state_buffer`
  puts the uint8 states of tensors of 1e5+ elements in CUDA unified memory (cudaMallocManaged,
  outside torch's allocator); the driver pages them to the GPU for the step while memory is spare
  and evicts them under pressure, so they are host memory that never makes the GPU run out.
- transformers' `Adafactor` with the HF Trainer's arguments (scale_parameter=False,
  relative_step=False): fp32 row and column second moments for a tensor of 2+ dims (shape[:-1]
  and shape[:-2] + shape[-1:]), a whole fp32 second moment for a vector, no first moment, and a
  0-d fp32 `RMS` per tensor; the step runs tensor by tensor in fp32.
"""

from __future__ import annotations

import math

from memplan.options import Config, Dtype, Method, Optim, Scheme
from memplan.overhead import round_block
from memplan.spec import ModelSpec, per_spec

ADAPTER_BYTES = 4  # peft keeps adapters in fp32
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 state
BNB_BLOCK = 256  # bitsandbytes' optimizer blocksize: one fp32 absmax per 256 elements
PAGED_MIN = 100_000  # bitsandbytes pages the state of tensors of this many elements or more
QMAPS = 2 * round_block(256 * 4)  # the signed and unsigned 256-entry fp32 maps, shared by all tensors
SCALAR = round_block(4)  # a 0-d fp32 tensor on the device: one 512 B block

_ADAM_LIKE = (Method.FO_ADAM,)
_ANY_OPTIM = (Optim.FOREACH, Optim.LOOP, Optim.FUSED)


def refusal(cfg: Config) -> str | None:
    """Why these savers cannot run with this method / option mix (one line), or None."""
    fam = cfg.method.family
    opt = cfg.optim
    if opt not in _ANY_OPTIM and cfg.method not in _ADAM_LIKE:
        if cfg.method is Method.FO_SGD:
            return (f"--optim {opt.value} replaces Adam; fo-sgd takes foreach, fused or loop "
                    f"(use --method fo-adam with --optim {opt.value})")
        return (f"--optim {opt.value} is modelled for fo-adam only; {cfg.method.value} takes foreach"
                f"{'' if cfg.method.value == 'zo-adam' else ' or loop'}")
    if opt is Optim.FUSED and fam != "fo":
        return f"--optim fused is modelled for first-order methods; {cfg.method.value} takes foreach or loop"
    if opt is Optim.LOOP and fam != "fo" and cfg.method.value == "zo-adam":
        return "--optim loop is not modelled for zo-adam (its per-tensor update is modelled with foreach Adam); use foreach"
    if fam != "fo":
        for flag, on in (("--activation-offload", cfg.activation_offload),
                         ("--optimizer-in-backward", cfg.optimizer_in_backward)):
            if on:
                return f"{flag} needs a backward pass: first-order methods only (fo-sgd, fo-adam), not {cfg.method.value}"
    if cfg.optimizer_in_backward and cfg.grad_accum > 1:
        return ("--optimizer-in-backward steps each parameter as its gradient is made, so gradients cannot "
                "accumulate: use --grad-accum 1 (torchtune refuses the pair too)")
    if cfg.activation_offload and cfg.dtype.is_amp:
        return (f"--activation-offload is modelled on pure {', '.join(d.value for d in (Dtype.FP32, Dtype.FP16, Dtype.BF16))} "
                f"(torchtune's recipes); under {cfg.dtype.value} autocast's saved weight casts are not")
    if cfg.activation_offload and cfg.grad_checkpointing:
        return "--activation-offload with --grad-checkpointing is not modelled yet: pick one"
    return None


# ---- what trains, with shapes ---------------------------------------------------------------


def trainable_shapes(cfg: Config, spec: ModelSpec) -> tuple[tuple[tuple[int, ...], int], ...]:
    """(shape, bytes per element) of every trainable tensor, in the order the optimizer holds them."""
    if cfg.scheme is Scheme.FT:
        return _ft_shapes(spec, cfg.dtype.weight_bytes)
    if cfg.scheme is Scheme.LORA:
        from memplan.analytic import lora_targets

        return _lora_shapes(spec, cfg.lora_rank, lora_targets(cfg, spec))
    if cfg.scheme is Scheme.PREFIX:
        return (((cfg.prefix_tokens, spec.num_layers * 2 * spec.kv_dim), ADAPTER_BYTES),)
    return (((cfg.prompt_tokens, spec.word_embed_proj_dim), ADAPTER_BYTES),)


@per_spec
def _ft_shapes(spec: ModelSpec, wb: int):
    return tuple((tuple(t.shape), wb) for t in spec.tensors)


@per_spec
def _lora_shapes(spec: ModelSpec, rank: int, targets: tuple[str, ...]):
    out = []
    for t in spec.tensors:
        if t.module in targets and t.layer is not None and len(t.shape) == 2:
            out += [((rank, t.fan_in), ADAPTER_BYTES), ((t.fan_out, rank), ADAPTER_BYTES)]
    return tuple(out)


# ---- optimizer state --------------------------------------------------------------------------


def adam8bit_state_bytes(numel: int) -> int:
    """Device bytes bitsandbytes' 8-bit Adam keeps for one tensor (the shared maps apart).

    n < 4096: two fp32 states, 2 * round512(4n); else two uint8 states and two fp32 absmax vectors
    of ceil(n / 256): 2 * round512(n) + 2 * round512(4 * ceil(n / 256)).
    """
    if numel < MIN_8BIT_SIZE:
        return 2 * round_block(4 * numel)
    return 2 * round_block(numel) + 2 * round_block(4 * math.ceil(numel / BNB_BLOCK))


def paged_state_host_bytes(numel: int) -> int:
    """Unified-memory bytes of one tensor's paged 8-bit state: two uint8 states, round512(n) each."""
    return 2 * round_block(numel) if numel >= PAGED_MIN else 0


def adafactor_state_bytes(shape: tuple[int, ...]) -> int:
    """transformers' Adafactor state of one tensor: fp32 row + column second moments (2+ dims), or a
    whole fp32 second moment (a vector), plus its 0-d fp32 RMS."""
    if len(shape) >= 2:
        rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
        return round_block(4 * rows) + round_block(4 * cols) + SCALAR
    return round_block(4 * math.prod(shape)) + SCALAR


def optimizer_state_bytes(cfg: Config, spec: ModelSpec, adam_copies_bytes: int) -> int | None:
    """Device bytes of fo-adam's state under `--optim`, or None where torch's Adam layout holds
    (`adam_copies_bytes`: exp_avg + exp_avg_sq in the parameters' dtype)."""
    if cfg.method not in _ADAM_LIKE:
        return None
    opt = cfg.optim
    if opt is Optim.FUSED:  # each step counter on the device
        return adam_copies_bytes + SCALAR * len(trainable_shapes(cfg, spec))
    if opt in (Optim.EIGHT_BIT, Optim.PAGED_8BIT):
        # Each optimizer makes its own maps: one per parameter with --optimizer-in-backward.
        total = QMAPS * (len(trainable_shapes(cfg, spec)) if cfg.optimizer_in_backward else 1)
        for shape, _ in trainable_shapes(cfg, spec):
            n = math.prod(shape)
            total += adam8bit_state_bytes(n)
            if opt is Optim.PAGED_8BIT and n >= PAGED_MIN:
                total -= 2 * round_block(n)  # the uint8 states live in unified memory
        return total
    if opt is Optim.ADAFACTOR:
        return sum(adafactor_state_bytes(shape) for shape, _ in trainable_shapes(cfg, spec))
    return None


def adam_step_temporaries(cfg: Config, spec: ModelSpec, trainable_bytes: int) -> int:
    """Bytes fo-adam's `optimizer.step()` allocates beyond the state (steady state, state made).

    foreach: sqrt(exp_avg_sq) of every tensor at once (1x trainable); fused and bitsandbytes:
    none (in-place kernels); loop and Adafactor run tensor by tensor, see `loop_temporaries`.
    """
    opt = cfg.optim
    if opt is Optim.FOREACH:
        return trainable_bytes
    if opt is Optim.LOOP:
        return loop_temporaries(_sizes(cfg, spec, 1), 2)
    if opt is Optim.ADAFACTOR:
        return loop_temporaries(_sizes(cfg, spec, 4), adafactor_copies(cfg))
    return 0


def loop_temporaries(sizes: tuple[int, ...], k: int) -> int:
    """Peak temporaries of a step that loops over the tensors making k temporaries of each:
    max_i (size[i-1] + k * size[i]), since the previous tensor's last temporary stays bound to its
    Python name until the next one replaces it.

    torch's `_single_tensor_adam`: `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt)`, k = 2.
    transformers' Adafactor (`adafactor_copies`): the fp32 gradient and parameter copies, `grad**2`
    and `+ eps` at once (`update` of the previous tensor still bound).
    """
    out, prev = 0, 0
    for n in sizes:
        out, prev = max(out, prev + k * n), n
    return out


def one_tensor_temporaries(cfg: Config, spec: ModelSpec) -> int:
    """Temporaries of one tensor's own optimizer (--optimizer-in-backward): nothing lingers from a
    previous tensor; foreach over one tensor makes one sqrt of it."""
    opt = cfg.optim
    if cfg.method is not Method.FO_ADAM or opt in (Optim.FUSED, Optim.EIGHT_BIT, Optim.PAGED_8BIT):
        return 0
    if opt is Optim.ADAFACTOR:
        return adafactor_copies(cfg) * max(_sizes(cfg, spec, 4))
    return (1 if opt is Optim.FOREACH else 2) * max(_sizes(cfg, spec, 1))


def adafactor_copies(cfg: Config) -> int:
    """fp32 tensors of one parameter's size that transformers' Adafactor holds at its peak: for 16-bit
    parameters the gradient and parameter copies (`.float()`) and two of `update`; fp32: two."""
    b = ADAPTER_BYTES if cfg.scheme is not Scheme.FT else cfg.dtype.weight_bytes
    return 4 if b < 4 else 2


def _sizes(cfg: Config, spec: ModelSpec, elem_bytes: int | None) -> tuple[int, ...]:
    """round512 bytes of every trainable tensor in optimizer order, at `elem_bytes` per element (1: the
    tensor's own dtype)."""
    return tuple(round_block(math.prod(shape) * (b if elem_bytes == 1 else elem_bytes))
                 for shape, b in trainable_shapes(cfg, spec))


# ---- host memory ------------------------------------------------------------------------------


def paged_host_bytes(cfg: Config, spec: ModelSpec) -> int:
    """Unified-memory (host) bytes of the paged 8-bit state."""
    if cfg.optim is not Optim.PAGED_8BIT or cfg.method not in _ADAM_LIKE:
        return 0
    return sum(paged_state_host_bytes(math.prod(shape)) for shape, _ in trainable_shapes(cfg, spec))


def notes(cfg: Config, spec: ModelSpec | None) -> list[str]:
    """What an estimate should say about the savers: the GPU's share of a paged optimizer state."""
    if spec is None or cfg.optim is not Optim.PAGED_8BIT or cfg.method not in _ADAM_LIKE:
        return []
    paged = [math.prod(shape) for shape, _ in trainable_shapes(cfg, spec) if math.prod(shape) >= PAGED_MIN]
    if not paged:
        return []
    one = paged_state_host_bytes(max(paged))
    return [f"paged-8bit: {paged_host_bytes(cfg, spec) / 2**30:.2f} GiB of optimizer state lives in CUDA unified "
            f"memory (host_bytes); each tensor's state is paged to the GPU for its own step (at most "
            f"{one / 2**20:.1f} MiB at a time) and stays only while the GPU has room, so it is not in the peak"]


def effective_batch(cfg: Config) -> int:
    """Sequences per optimizer step: batch x grad_accum x num_gpus (data-parallel ranks)."""
    return cfg.batch * cfg.grad_accum * cfg.num_gpus
