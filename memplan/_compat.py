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


def size_key(n):
    """A size as a hashable value that compares without guards: an int as is, a SymInt as its sympy
    expression (`SymInt.node.expr`, torch 2.13.0). `==` on two SymInts would record a guard."""
    node = getattr(n, "node", None)
    return n if node is None else node.expr


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


def symbolic_shape_env():
    """A `torch.fx.experimental.symbolic_shapes.ShapeEnv` (torch 2.13.0) for a fake mode with symbolic sizes."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return ShapeEnv()


def symbolic_sizes(mode, batch: int, seq: int) -> tuple:
    """(batch, seq) as SymInts of `mode`'s ShapeEnv with these hints (torch 2.13.0: `FakeTensorMode.from_tensor`
    with a `StatelessSymbolicContext`). A hint of 1 stays a plain 1: torch specialises size-1 dims anyway."""
    import torch
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    dims = [DimDynamic.STATIC if n == 1 else DimDynamic.DYNAMIC for n in (batch, seq)]
    placeholder = mode.from_tensor(torch.empty(batch, seq, dtype=torch.int8, device="meta"),
                                   source=ConstantSource("batch_x_seq"),
                                   symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
    return tuple(placeholder.shape)


@contextlib.contextmanager
def pad_without_pins(active: bool = True) -> Iterator[None]:
    """`torch.nn.functional.pad` of the last dim, constant mode, as `new_full` + `copy_` for symbolic sizes.

    torch 2.13.0's `torch._C._nn.pad` reads sizes as concrete integers, which pins symbolic batch and
    seq to their hints (transformers' ForCausalLMLoss pads the labels). The replacement allocates one
    tensor of the padded shape, as the original does, so the bytes counted are the same.
    """
    if not active:
        yield
        return
    import torch
    import torch.nn.functional as F

    original = F.pad

    def pad(input, pad, mode="constant", value=None):
        if mode != "constant" or len(pad) != 2 or min(pad) < 0 or all(isinstance(n, int) for n in input.shape):
            return original(input, pad, mode, value)
        left, right = pad
        n = input.shape[-1]
        out = input.new_full((*input.shape[:-1], n + left + right), 0 if value is None else value)
        out[..., left:left + n].copy_(input)
        return out

    F.pad = pad
    try:
        yield
    finally:
        F.pad = original
