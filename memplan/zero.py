"""DeepSpeed ZeRO stages 1-3 as one rank holds them: DeepSpeed's own model-state terms, its buffers.

`zero_model_states` is DeepSpeed's accounting (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs` in deepspeed/runtime/zero/stage_1_and_2.py and stage3.py),
term by term, so the tests can hold it against the installed DeepSpeed. `rank` adds what a step
has beyond those terms: the reduce bucket (DeepSpeed's `contiguous_gradients` buffer, allocated at
`reduce_bucket_size` elements whatever the model), stage 3's gathered layer and prefetch bucket,
and the small parameters stage 3 keeps whole on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.options import Config, Offload, Scheme
from memplan.overhead import round_block
from memplan.result import Category, Phase
from memplan.sharding import Rank, ceil_div, per_node
from memplan.spec import ModelSpec, per_spec

if TYPE_CHECKING:
    from memplan.analytic import Inputs

C = Category

# DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py, DeepSpeed 0.19), by config key.
REDUCE_BUCKET_SIZE = 500_000_000  # "reduce_bucket_size", elements
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000  # "stage3_prefetch_bucket_size", elements
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000  # "stage3_max_live_parameters", elements
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000  # "stage3_param_persistence_threshold": smaller ones stay whole
MASTER_BYTES = 4  # DeepSpeed's fp32 master partition; its optimizer state is fp32 on that master
FP32_GRAD_BYTES = 4  # DeepSpeed's fp32 gradient partition the optimizer steps on


def largest_module_params(spec: ModelSpec) -> int:
    """Largest sum of one module's own parameters (DeepSpeed's `largest_layer_params`)."""
    return _largest_module(spec)


@per_spec
def _largest_module(spec: ModelSpec) -> int:
    sums: dict[tuple, int] = {}
    for t in spec.tensors:
        key = (t.layer, t.name.rsplit(".", 1)[0])
        sums[key] = sums.get(key, 0) + t.numel
    return max(sums.values())


# ---- DeepSpeed's model-state terms --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZeroStates:
    """Model-state bytes of one rank under ZeRO, by term, and the host bytes of one machine.

    `gathered` is stage 3's in-flight layer: its 16-bit parameters and gradients (DeepSpeed's
    `largest_layer_memory`)."""

    params: int
    gradients_16bit: int  # the reduced 16-bit gradients (whole in stage 1, partitioned in stage 2)
    gradients_fp32: int  # the fp32 gradient partition the optimizer steps on
    master: int
    optimizer_state: int
    gathered: int
    host_bytes: int

    @property
    def gradients(self) -> int:
        return self.gradients_16bit + self.gradients_fp32

    @property
    def gpu_bytes(self) -> int:
        return self.params + self.gradients + self.master + self.optimizer_state + self.gathered


def zero_model_states(stage: int, total_params: int, largest_layer_params: int, num_gpus: int, nodes: int = 1,
                      offload: Offload = Offload.NONE, *, param_bytes: int = 2, state_copies: int = 2,
                      trainable_params: int | None = None) -> ZeroStates:
    """ZeRO-`stage` model states per rank, as DeepSpeed's estimators count them (Adam: c = 2).

    Per trainable parameter, with a partition of ceil(P / N) elements (DeepSpeed pads partitions):
    stage 1: pb + gb (whole) + (4 fp32 grads + 4 master + 4c state) / N;
    stage 2: pb + (gb + 4 + 4 + 4c) / N       (16-bit: 2 + 18 / N, `estimate_zero2`);
    stage 3: (pb + 4 + 4 + 4c) / N + (pb + gb) * largest layer  (16-bit: 18 / N + 4 LL, `estimate_zero3`).
    Offload optimizer: the fp32 gradients, master and state go to the host (and stage 2's 16-bit
    gradient partition, which is copied out as it is reduced); offload params (stage 3): the 16-bit
    partition too. Host: what the machine's N / nodes ranks put there (DeepSpeed's `zero_init`
    figure before its 1.5 buffer factor).
    """
    p_t = total_params if trainable_params is None else trainable_params
    part = ceil_div(p_t, num_gpus)
    frozen = total_params - p_t
    pb = gb = param_bytes
    fp32 = (FP32_GRAD_BYTES + MASTER_BYTES + 4 * state_copies) * part
    if stage == 1:
        params, grads16 = pb * total_params, gb * p_t
    elif stage == 2:
        params, grads16 = pb * total_params, gb * part
    else:
        params, grads16 = pb * ceil_div(frozen, num_gpus) + pb * part, 0
    gathered = (pb + gb) * largest_layer_params if stage == 3 else 0
    host = 0
    if offload is not Offload.NONE:
        host += fp32
        if stage == 2:
            host += grads16
            grads16 = 0
        if offload is Offload.PARAMS:
            host += params
            params = 0
    host *= num_gpus // nodes
    grads32 = FP32_GRAD_BYTES * part if offload is Offload.NONE else 0
    master = MASTER_BYTES * part if offload is Offload.NONE else 0
    state = 4 * state_copies * part if offload is Offload.NONE else 0
    return ZeroStates(params=params, gradients_16bit=grads16, gradients_fp32=grads32, master=master,
                      optimizer_state=state, gathered=gathered, host_bytes=host)


def rank(p: Inputs, stage: int) -> Rank:
    """DeepSpeed ZeRO-`stage` over N ranks (see `zero_model_states` and the module doc)."""
    cfg, spec, n = p.cfg, p.spec, p.cfg.num_gpus
    pb = zero_param_bytes(cfg)
    buffers = sum(round_block(t.numel * 4) for t in spec.buffers)
    total = spec.param_count + (p.train.params if cfg.scheme is not Scheme.FT else 0)
    trainable = p.train.params
    copies = p.base[C.OPTIMIZER_STATE] // p.train.bytes if p.train.bytes else 0
    if not cfg.method.is_fo:
        return _zero_zo(p, stage, copies)
    ll = largest_module_params(spec)
    ms = zero_model_states(stage, total, ll, n, cfg.nodes, cfg.offload, param_bytes=pb, state_copies=copies,
                           trainable_params=trainable)
    params = ms.params
    if stage == 3 and cfg.offload is not Offload.PARAMS:
        params += _persistent_extra(spec, n, pb)
    # The 16-bit gradient buffers persist from the first backward on (DeepSpeed's estimate counts them
    # as model state); the fp32 partition is what the method's phases hold as gradients, so the
    # optimizer's temporaries scale with it.
    base = {C.WEIGHTS: params + buffers, C.GRADIENTS: ms.gradients_16bit,
            C.OPTIMIZER_STATE: ms.master + ms.optimizer_state}
    bucket = round_block(REDUCE_BUCKET_SIZE * pb)
    extra: dict = {None: bucket}
    if stage == 3:
        gather = round_block(min(STAGE3_MAX_LIVE_PARAMETERS, ll + STAGE3_PREFETCH_BUCKET_SIZE, total) * pb)
        extra[Phase.FORWARD] = bucket + gather
        extra[Phase.BACKWARD] = bucket + gather + round_block(ll * pb)  # the layer's 16-bit gradients
    largest = round_block(min(p.train.largest_bytes // cfg.dtype.weight_bytes, ceil_div(trainable, n)) * 4)
    return Rank(base=base, grad_bytes=ms.gradients_fp32, largest_bytes=largest, extra=extra,
                host_bytes=ms.host_bytes)


def zero_param_bytes(cfg: Config) -> int:
    """Bytes per parameter DeepSpeed keeps on the GPU: 16-bit in its bf16 / fp16 modes (amp-* included)."""
    return 4 if cfg.dtype.value == "fp32" else 2


def _persistent_extra(spec: ModelSpec, n: int, pb: int) -> int:
    """Stage 3 keeps parameters under `stage3_param_persistence_threshold` elements whole on every rank."""
    small = sum(t.numel for t in spec.tensors if t.numel < STAGE3_PARAM_PERSISTENCE_THRESHOLD)
    return pb * (small - ceil_div(small, n))


def _zero_zo(p: Inputs, stage: int, copies: int) -> Rank:
    """A ZO (or forward-gradient) method under ZeRO: no gradients and no DeepSpeed optimizer; the
    method's own state is partitioned, stage 3 partitions the weights and gathers the layer in flight
    (forward only)."""
    cfg, spec, n = p.cfg, p.spec, p.cfg.num_gpus
    pb = cfg.dtype.weight_bytes
    state = copies * ceil_div(p.train.bytes, n)
    base = {C.WEIGHTS: p.base[C.WEIGHTS], C.OPTIMIZER_STATE: state}
    extra: dict = {None: 0}
    host = 0
    largest = p.train.largest_bytes
    if stage == 3:
        weights = ceil_div(p.base[C.WEIGHTS], n) + _persistent_extra(spec, n, pb)
        base[C.WEIGHTS] = weights
        ll = largest_module_params(spec)
        total = spec.param_count
        extra[Phase.FORWARD] = round_block(min(STAGE3_MAX_LIVE_PARAMETERS, ll + STAGE3_PREFETCH_BUCKET_SIZE, total) * pb)
        largest = round_block(ceil_div(largest, n))
        if cfg.offload is Offload.PARAMS:
            host += weights * per_node(cfg)
            base[C.WEIGHTS] = 0
    if cfg.offload is not Offload.NONE:
        host += state * per_node(cfg)
        base[C.OPTIMIZER_STATE] = 0
    return Rank(base=base, grad_bytes=p.train.bytes, largest_bytes=largest, extra=extra, host_bytes=host)
