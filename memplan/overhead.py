"""From tensor bytes (`allocated`) to what the allocator reserves and what the device shows.

Shared by every tier, so analytic, traced and measured estimates differ only in their tensor bytes.
"""

from __future__ import annotations

from memplan.result import Category
from memplan.hardware import Family

SEGMENT = 2 << 20  # the caching allocator maps large blocks in 2 MiB pages
ROUND = 512  # every block is rounded up to 512 B (kMinBlockSize)


def round_block(n_bytes: int) -> int:
    """Bytes the caching allocator hands out for one tensor: round up to 512 B."""
    return -(-n_bytes // ROUND) * ROUND if n_bytes else 0


def workspace_bytes(fam: Family, *, backward: bool) -> int:
    """cuBLAS workspace, one per (handle, stream); autograd's backward thread holds a second handle."""
    return fam.cublas_workspace_bytes * (2 if backward else 1)


MIB = 1 << 20
# NCCL's own device memory (channels' buffers, allocated with cudaMalloc outside torch's allocator)
# for one process group, as nvidia-smi shows it: 544 MiB with 2 ranks, 688 MiB with more, on 4 x A100
# with NVLink after a 4 MB all-reduce (NVIDIA/nccl#964). It grows with channels and algorithms
# (NVIDIA/nccl#986); calibration on a multi-GPU machine replaces it.
NCCL_TWO_RANKS_BYTES = 544 * MIB
NCCL_BYTES = 688 * MIB


def nccl_bytes(num_gpus: int) -> int:
    """NCCL's workspace on each GPU of a `num_gpus`-rank process group (0 on one GPU)."""
    if num_gpus <= 1:
        return 0
    return NCCL_TWO_RANKS_BYTES if num_gpus == 2 else NCCL_BYTES


def views(allocated: int, fam: Family, context_extra: int = 0) -> tuple[int, int, int]:
    """(allocated, reserved, device) bytes at the peak.

    reserved = allocated * (1 + slack) rounded up to a 2 MiB segment (slack: block-splitting and
    cached free blocks; a per-family constant that calibration refits); device = reserved + context.
    A calibration correction reaches here already applied to `fam` (`corrections.apply`).
    """
    # Integer arithmetic (slack in parts per million): a float product overflows for absurd requests
    # such as batch 10^300, which must still get an answer ("does not fit"), not a crash.
    reserved = allocated + allocated * round(fam.allocator_slack * 1_000_000) // 1_000_000
    reserved = -(-reserved // SEGMENT) * SEGMENT
    return allocated, reserved, reserved + fam.context_bytes + context_extra


def add_overheads(components: dict[Category, int], fam: Family,
                  context_extra: int = 0) -> tuple[dict[Category, int], int, int, int]:
    """Complete the categories with allocator slack and context (plus `context_extra`: NCCL's workspace);
    return (components, the three views)."""
    allocated = sum(components.values())
    allocated, reserved, device = views(allocated, fam, context_extra)
    out = dict(components)
    out[Category.ALLOCATOR] = reserved - allocated
    out[Category.CONTEXT] = device - reserved
    return out, allocated, reserved, device
