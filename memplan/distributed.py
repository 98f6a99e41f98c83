"""The real step on several data-parallel ranks: FSDP2 or DDP around the same model and step.

- fsdp: `fully_shard` on every decoder block, then on the root (embeddings, final norm, lm_head),
  as torchtitan and the FSDP2 docs wrap a transformer. Each block's parameters are all-gathered
  before its forward (and again before its backward), resharded after it; each block's gradients are
  reduce-scattered as its backward ends. The optimizer sees only this rank's shards.
  FSDP2 keeps the root gathered after forward (backward would gather it again at once), so a
  forward-only method (ZO) keeps it gathered between steps. A ZO step draws z for, and perturbs,
  this rank's shard only; MeZO's out-of-place perturbation is written back into the shard's storage,
  from which FSDP all-gathers (`methods.zo.perturb`).
- ddp: `DistributedDataParallel` around the model: every rank keeps all weights, gradients and
  optimizer state, plus gradient buckets (one flat copy of the trainable gradients, in buckets of
  25 MiB, the first 1 MiB).

The trace runs one rank of this (rank 0 of `num_gpus`) on fake tensors in torch's fake process group,
where collectives move no data but allocate what they would; the calibration worker runs every rank
for real under torchrun. ZeRO (DeepSpeed) cannot run on fake tensors: its traces are refused.

What the tracker sees as `communication`: everything FSDP allocates while it all-gathers (the
all-gather buffers and the unsharded parameters copied out of them) and while it reduce-scatters
(the copy-in buffer), and DDP's gradient buckets. Unsharded gradients are `gradients`; so are the
reduce-scatter outputs, which become the sharded gradients the optimizer steps.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from memplan import _compat
from memplan.options import Config, Offload, Sharding
from memplan.result import Category

TRACED = (Sharding.FSDP, Sharding.DDP)


def layout(config: Config) -> Sharding:
    """The sharding the step runs under (`auto`: none on one GPU, ddp on more)."""
    return config.sharding.resolved(config.num_gpus)


def trace_refusal(config: Config) -> str | None:
    """Why the trace cannot run this layout, or None. ZeRO is DeepSpeed's engine, which needs real
    devices and a real process group; offload moves state to the host, which fake tensors do not model."""
    sharding = layout(config)
    if config.offload is not Offload.NONE:
        return "the trace runs on fake tensors on one device: --offload is not traced (use the analytic tier)"
    if sharding in (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3):
        return (f"--sharding {sharding.value} is DeepSpeed ZeRO, which cannot run on fake tensors: "
                "the trace covers fsdp and ddp (use the analytic tier for ZeRO)")
    return None


def blocks(model) -> list:
    """The repeated decoder blocks: the `ModuleList` holding the most parameters (peft-wrapped too)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def mixed_precision(config: Config) -> bool:
    """FSDP2 runs `amp-*` with its own mixed precision (16-bit gathers and compute, fp32 reduce),
    in place of autocast."""
    return layout(config) is Sharding.FSDP and config.dtype.is_amp


def shard(model, mesh, config: Config) -> None:
    """FSDP2: `fully_shard` every decoder block, then the root; `amp-*` with FSDP2's mixed precision."""
    param_dtype = None
    if mixed_precision(config):
        import torch

        param_dtype = getattr(torch, config.dtype.compute_torch_name)
    for block in blocks(model):
        _compat.fully_shard(block, mesh, param_dtype)
    _compat.fully_shard(model, mesh, param_dtype)


def replicate(model, *, fake: bool = False):
    """DDP around `model` (CPU or one device per process); gradients copied into 25 MiB buckets.

    fake: in the fake process group (the trace), whose all-reduce futures carry no value and where
    DDP's constructor cannot read fake weights; `_compat` has the stand-ins (same bytes).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not fake:
        return DistributedDataParallel(model)
    with _compat.ddp_without_data_checks():
        ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, _compat.fake_allreduce_hook)
    _compat.keep_ddp_buckets(ddp)
    return ddp


@contextlib.contextmanager
def watched(tracker) -> Iterator[None]:
    """Let `tracker` (a `tracker.LiveBytes`) see FSDP2's storage resizes and sort its collectives' bytes."""
    def grads_of_reduce(grads):
        tracker.tag(Category.GRADIENTS, grads)

    with _compat.storage_resizes(tracker.resized), \
            _compat.fsdp_collectives(lambda: tracker.region(Category.COMMUNICATION), grads_of_reduce), \
            warnings.catch_warnings():
        # transformers' decoder layers return a view; FSDP2 warns that an in-place op on it would skip
        # its pre-backward hook. The step never writes into a layer's output.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
        yield


def measure_refusal(config: Config, ranks: tuple[int, int, int] | None) -> str | None:
    """Why this process cannot measure a rank of `config`, or None."""
    sharding = layout(config)
    if sharding not in TRACED:
        return (f"--sharding {sharding.value}: the calibration runner measures fsdp and ddp "
                "(ZeRO needs DeepSpeed's engine, which memplan's step does not run)")
    if config.offload is not Offload.NONE:
        return "--offload is not measured by the calibration runner"
    if ranks is None:
        return (f"a {config.num_gpus}-GPU configuration runs one process per rank: "
                "`memplan calibrate` starts them with torchrun")
    if ranks[1] != config.num_gpus:
        return f"torchrun started {ranks[1]} ranks for a configuration of --num-gpus {config.num_gpus}"
    return None


_GROUPS = iter(range(1 << 30))  # one store prefix per group this process makes


@contextlib.contextmanager
def process_group(device) -> Iterator[None]:
    """The default process group of a torchrun launch: NCCL between GPUs, gloo on the CPU.

    Each group this process makes (one per configuration) gets its own prefix in torchrun's store:
    a group made after another one was destroyed would otherwise meet the first one's keys there.
    """
    import datetime

    import torch
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous

    timeout = datetime.timedelta(seconds=120)
    store, rank, world = next(rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"memplan-group-{next(_GROUPS)}", store)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        yield
        dist.barrier()  # every rank done with this group's collectives before it goes
    finally:
        dist.destroy_process_group()
