"""Every reach into torch's and transformers' private APIs, in one place.

Each function names the version it was checked against. When a dependency moves, this file (and
its tests) is what changes. All imports are lazy: `memplan fit` imports neither library.
Checked against torch 2.13.0 and transformers 5.24.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def fake_tensor_mode():
    """`torch._subclasses.fake_tensor.FakeTensorMode` (torch 2.13.0): tensors with shapes, no storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode


def is_fake(t) -> bool:
    """True for a FakeTensor (`torch._subclasses.fake_tensor.is_fake`, torch 2.13.0)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def storage_key(storage) -> int:
    """A storage's identity, the same for every view of it: `UntypedStorage._cdata`, the address of
    the C++ storage (torch 2.13.0)."""
    return storage._cdata


def dispatch_mode_base():
    """`torch.utils._python_dispatch.TorchDispatchMode` (torch 2.13.0), the base of the live-bytes tracker."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_leaves(tree) -> list:
    """`torch.utils._pytree.tree_leaves` (torch 2.13.0): the tensors in nested args and kwargs."""
    from torch.utils._pytree import tree_leaves as _leaves

    return _leaves(tree)


def cuda_in_bad_fork() -> bool:
    """True in a child forked after its parent initialised CUDA (`torch.cuda._is_in_bad_fork`, torch 2.13.0)."""
    import torch

    return torch.cuda._is_in_bad_fork()


@contextlib.contextmanager
def sdpa_masks_as_for_real_tensors() -> Iterator[None]:
    """Make transformers drop the causal mask for SDPA under fake tensors as it does with real ones.

    transformers cannot read a fake tensor's values, so it keeps a full batch x seq x seq mask where,
    with real unpadded tensors, it passes `is_causal=True` and no mask. Patches
    `masking_utils._ignore_causal_mask_sdpa` and `masking_utils.find_packed_sequence_indices`
    (transformers 5.24) for memplan's batches, which are neither padded nor packed.
    """
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa
    packed = masking_utils.find_packed_sequence_indices

    def decide(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        window = local_attention_size is None or kv_length < local_attention_size
        if window and (q_length == 1 or kv_length == q_length):
            return True  # no padding in the batch: what fast_all(padding_mask) finds on real tensors
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    masking_utils._ignore_causal_mask_sdpa = decide
    masking_utils.find_packed_sequence_indices = lambda position_ids: None  # one sequence per row
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original
        masking_utils.find_packed_sequence_indices = packed


@contextlib.contextmanager
def grouped_mm_in_any_dtype() -> Iterator[None]:
    """Give `aten._grouped_mm` a fake kernel for every floating dtype, inside this block only.

    transformers 5 runs MoE experts as stacked 3-D weights through `torch.nn.functional.grouped_mm`
    (`integrations.moe._grouped_mm`). The meta kernel torch 2.13 registers for `aten._grouped_mm`
    (`_meta_registrations._meta_grouped_mm_common`) checks CUDA's fast path and refuses anything but
    bf16, while the real op runs fp32 and fp16 too (CUDA: a per-group matmul fallback in
    `Blas.cpp`; CPU: `_grouped_mm_cpu`). This mode answers the op for non-bf16 inputs with an
    empty output of the size and dtype the real op returns (`_create_grouped_mm_output_tensor`:
    2-D x 3-D -> rows x n, 2-D x 2-D -> groups x m x n, 3-D x 3-D -> groups x m x n, in mat_a's dtype
    or `out_dtype`); bf16 keeps torch's own meta kernel. It sits between the fake mode and the
    tracker, so the tracker sees the op and its one output, as on real tensors. Autograd's backward
    formulas (`derivatives.yaml`: grouped_mm of the gradient with each transposed operand, only for
    the operands that need a gradient) call the same op, so they are answered too.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.aten._grouped_mm.default

    class _AnyDtype(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is op and args[0].dtype != torch.bfloat16:
                return _grouped_mm_output(*args, **kwargs)
            return func(*args, **kwargs)

    with _AnyDtype():
        yield


def _grouped_mm_output(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """An empty tensor shaped and typed as `aten._grouped_mm`'s result (torch 2.13.0)."""
    import torch

    torch._check(mat_a.dtype == mat_b.dtype, lambda: f"grouped_mm: {mat_a.dtype} x {mat_b.dtype}")
    torch._check(bias is None, lambda: "grouped_mm: bias is not supported")
    torch._check(mat_a.size(-1) == mat_b.size(-2) or (mat_a.dim() == 2 and mat_b.dim() == 2),
                 lambda: "grouped_mm: contraction dimensions differ")
    if mat_a.dim() == 2 and mat_b.dim() == 2:
        size = [offs.size(0), mat_a.size(0), mat_b.size(1)]  # weight gradient: one block per group
    elif mat_a.dim() == 2:
        size = [mat_a.size(0), mat_b.size(-1)]  # routed rows x out features
    elif mat_b.dim() == 2:
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    return torch.empty(size, dtype=out_dtype or mat_a.dtype, device=mat_a.device)
