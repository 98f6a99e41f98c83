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


@contextlib.contextmanager
def softmax_half_to_float(active: bool = True) -> Iterator[None]:
    """`F.softmax(x, dim, dtype=torch.float32)` on an fp16 `x` as CUDA runs it, inside this block.

    ATen's `softmax` (torch 2.13.0) calls `_softmax(x, dim, half_to_float=True)` for a CUDA fp16
    input asked for fp32 output: the kernel reads the fp16 scores and writes fp32, with no fp32 copy
    of its input, and its backward returns an fp16 gradient. Anywhere else (the CPU, bf16) it first
    copies the input to fp32 (`toType`). The trace runs on CPU fake tensors, so eager attention in
    fp16 (llama, opt, gemma... softmax in fp32) would count a copy CUDA never makes; this patches
    `torch.nn.functional.softmax` to take CUDA's path (fake tensors accept it on the CPU).
    """
    import torch
    import torch.nn.functional as F

    original = F.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype is torch.float32 and isinstance(input, torch.Tensor) and input.dtype is torch.float16 \
                and dim is not None:
            return torch._softmax(input, dim, True)
        return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    if active:
        F.softmax = softmax
    try:
        yield
    finally:
        F.softmax = original


@contextlib.contextmanager
def sdpa_dropout_fused(active: bool = True) -> Iterator[None]:
    """SDPA with attention dropout as CUDA runs it, inside this block (fake tensors only).

    On CUDA, SDPA's flash and memory-efficient kernels take `dropout_p > 0` (dropout inside the
    kernel, a philox seed saved, no seq^2 tensor). The CPU's flash kernel does not (torch 2.13.0), so
    SDPA falls back to its math path, which materialises the scores, their softmax and the dropout
    mask: a trace on the CPU would over-count attention by seq^2 terms CUDA never allocates. Here
    `torch.nn.functional.scaled_dot_product_attention` with dropout calls
    `aten._scaled_dot_product_flash_attention_for_cpu` directly: its fake kernel accepts the dropout
    and saves what the fused kernels save (the output and a logsumexp). Not under forward AD
    (forward-grad), which has no rule for the fused kernels and runs the math path on any device.
    """
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p > 0 and (not enable_gqa or key.shape[-3] == query.shape[-3]):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    if active:
        F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


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
# ---- torch.distributed: the sharded step (trace and multi-process calibration) ----------------


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of `world_size` ranks in which this process is rank 0 and no collective
    moves data: torch's `fake` backend with `torch.testing._internal.distributed.fake_pg.FakeStore`
    (torch 2.13.0), as torch's own FSDPMemTracker tests run one rank of a sharded step."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a default process group already exists in this process")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def device_mesh(device_type: str, world_size: int):
    """A 1-D mesh over every rank (`torch.distributed.device_mesh.init_device_mesh`, torch 2.13.0).
    Built outside FakeTensorMode: it reads a tensor's value."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,))


def fully_shard(module, mesh, param_dtype=None) -> None:
    """FSDP2 `torch.distributed.fsdp.fully_shard` with its defaults (reshard after forward) (torch 2.13.0).

    param_dtype: a 16-bit dtype to gather parameters in and compute in, gradients reduced in fp32
    (`MixedPrecisionPolicy(param_dtype=..., reduce_dtype=torch.float32)`, as torchtitan sets it);
    None keeps the parameters' own dtype.
    """
    from torch.distributed.fsdp import fully_shard as _fully_shard

    if param_dtype is None:
        _fully_shard(module, mesh=mesh)
        return
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    _fully_shard(module, mesh=mesh, mp_policy=policy)


def is_dtensor_type(types) -> bool:
    """True when a dispatch sees a DTensor (`torch.distributed.tensor.DTensor`, torch 2.13.0)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(t is DTensor for t in types)


def local_tensor(t):
    """A DTensor's shard on this rank (`DTensor._local_tensor`, torch 2.13.0); any other tensor itself.
    The attribute, not `to_local()`: reading it runs no op under a dispatch mode."""
    return getattr(t, "_local_tensor", t)


def is_dtensor(t) -> bool:
    """True for a DTensor (a parameter FSDP2 has sharded) (`torch.distributed.tensor.DTensor`, torch 2.13.0)."""
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


def shaped_as(local, like):
    """`local`, a tensor shaped like `like`'s shard, as a DTensor sharded as `like` is
    (`DTensor.from_local`, torch 2.13.0); `local` itself when `like` is a plain tensor."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def active_fake_mode():
    """The FakeTensorMode in force now, or None (`torch._guards.active_fake_mode`, torch 2.13.0)."""
    from torch._guards import active_fake_mode as _active

    return _active()


def is_wait_tensor(func) -> bool:
    """`_c10d_functional.wait_tensor` (torch 2.13.0): on fake tensors its meta kernel returns a new
    tensor where the eager op returns its input."""
    import torch

    return func is torch.ops._c10d_functional.wait_tensor.default


@contextlib.contextmanager
def storage_resizes(on_resize) -> Iterator[None]:
    """Call `on_resize(storage)` after every `UntypedStorage.resize_` (torch 2.13.0).

    FSDP2 frees an unsharded parameter by resizing its storage to 0 and brings it back by resizing it
    to its size: neither is an op a dispatch mode sees (torch's own MemTracker patches it the same way).
    """
    import torch

    original = torch.UntypedStorage.resize_

    def resize_(storage, size):
        out = original(storage, size)
        on_resize(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


@contextlib.contextmanager
def fsdp_collectives(region, before_reduce) -> Iterator[None]:
    """Run FSDP2's all-gathers and reduce-scatters inside `region()`; `before_reduce(grads)` gets the
    unsharded gradients each reduce-scatter consumes.

    Wraps `FSDPParamGroup.unshard`, `.wait_for_unshard` (all-gather and copy-out into the unsharded
    parameters) and `.post_backward` (reduce-scatter copy-in and output) of
    `torch.distributed.fsdp._fully_shard._fsdp_param_group` (torch 2.13.0).
    """
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    originals = {name: getattr(FSDPParamGroup, name) for name in ("unshard", "wait_for_unshard", "post_backward")}

    def wrap(name):
        original = originals[name]

        def method(group, *args, **kwargs):
            if name == "post_backward":
                grads = []
                for fp in group.fsdp_params:
                    unsharded = getattr(fp, "_unsharded_param", None)
                    if getattr(fp, "unsharded_accumulated_grad", None) is not None:
                        grads.append(fp.unsharded_accumulated_grad)
                    elif unsharded is not None and unsharded.grad is not None:
                        grads.append(unsharded.grad)
                before_reduce(grads)
            with region():
                return original(group, *args, **kwargs)
        return method

    for name in originals:
        setattr(FSDPParamGroup, name, wrap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(FSDPParamGroup, name, original)


@contextlib.contextmanager
def ddp_without_data_checks() -> Iterator[None]:
    """Build DDP over fake tensors: skip its constructor's two reads of parameter values.

    `torch.nn.parallel.distributed._verify_param_shape_across_processes` and `_sync_module_states`
    (rank 0's weights broadcast to all) read data pointers, which fake tensors lack (torch 2.13.0).
    Both run once, before the first step; neither keeps memory.
    """
    import torch.nn.parallel.distributed as ddp

    originals = ddp._verify_param_shape_across_processes, ddp._sync_module_states
    ddp._verify_param_shape_across_processes = lambda *args, **kwargs: None
    ddp._sync_module_states = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ddp._verify_param_shape_across_processes, ddp._sync_module_states = originals


class _KeptBuckets:
    """A DDP reducer that keeps its first buckets: `Reducer._rebuild_buckets` (torch 2.13.0)
    broadcasts the new bucket order, a read of tensor values that fake tensors lack."""

    def __init__(self, reducer):
        self._reducer = reducer

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def keep_ddp_buckets(ddp) -> None:
    """Skip DDP's one bucket rebuild after the first step (see `_KeptBuckets`). The rebuilt buckets
    hold the same gradients in another order (every bucket 25 MiB, where the first was 1 MiB): the
    same bytes in all, so what a rank keeps does not change."""
    ddp.reducer = _KeptBuckets(ddp.reducer)


def fake_allreduce_hook(process_group, bucket):
    """DDP's default all-reduce hook (divide the bucket by the world size, all-reduce it in place),
    returning a completed future: the fake process group's futures carry no value, which the
    reducer rejects (`GradBucket.buffer`, `torch.futures.Future`, torch 2.13.0)."""
    import torch
    import torch.distributed as dist

    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(process_group))
    dist.all_reduce(buffer, group=process_group)
    done = torch.futures.Future()
    done.set_result(buffer)
    return done
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
