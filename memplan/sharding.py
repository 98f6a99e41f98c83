"""Layouts over several GPUs: DDP, DeepSpeed ZeRO-1/2/3, FSDP2 and CPU offload, as bytes per rank.

The single-GPU phases of a method (`memplan.methods`) already say what one forward, backward and
update keep alive for one rank's micro-batch. A layout changes only the model state and adds the
buffers of its collectives, so `phases` runs the method's own phases on the rank's share of the
model state (`Inputs` with a per-rank `base` and `train`) and then adds, per phase, what the layout
holds in flight (`Category.COMMUNICATION`). Every number is for one GPU, the busiest rank (rank 0
holds the largest shard when a tensor does not split evenly). Host memory (offload) is per machine:
the sum over the ranks that share it (`host_bytes`).

The layouts, as their libraries run by default:

- ddp: torch DistributedDataParallel. Model state replicated; the reducer keeps flat gradient
  buckets (`bucket_cap_mb=25`, the first bucket 1 MiB, `gradient_as_bucket_view=False`), allocated
  when the model is wrapped: about one more copy of the trainable gradients, in every phase.
- zero1 / zero2 / zero3 (`memplan.zero`): DeepSpeed ZeRO with its own fp32 master partition (it clones the
  parameters' partition to fp32 whatever their dtype) and the optimizer state on that master.
  `bf16`, `fp16` and `amp-*` all run as DeepSpeed's `bf16` / `fp16` mode: 16-bit parameters and
  compute (activations as under `--dtype bf16`), fp32 master, gradient partition and state; `fp32`
  keeps fp32 parameters (and still the master clone). Terms
  follow DeepSpeed's `estimate_zero2_model_states_mem_needs` and
  `estimate_zero3_model_states_mem_needs` (`zero_model_states`); on top, the reduce bucket
  (`reduce_bucket_size` elements of the gradient dtype, DeepSpeed's `contiguous_gradients` buffer)
  and, for stage 3, the gathered layer plus the prefetch bucket (`stage3_prefetch_bucket_size`),
  and the small parameters stage 3 keeps whole (`stage3_param_persistence_threshold`).
- fsdp: PyTorch FSDP2, `fully_shard` on every decoder block and on the root. Each parameter is
  split on dim 0 in ceil(rows / N) rows per rank (padded); forward all-gathers a block and
  reshards it after use; the root's parameters (embeddings, final norm, lm_head) are not resharded
  after forward (first-order: after backward; forward-only: never, so they stay gathered between
  steps); backward gathers each block again and reduce-scatters its unsharded gradients into the
  gradient shards. What is gathered at each moment follows FSDP2's own buffers (`fsdp_moments`):
  the flat all-gather output and the unsharded parameters copied out of it are two buffers, and
  forward keeps a block's flat output until the next block's copy-out (FSDP2's `all_gather_state`,
  which frees in program order instead of `record_stream`), so a block's copy-out holds three
  blocks; at the logits only the last block's flat output is left. Backward prefetches the next
  block's all-gather when a block starts (the root prefetches the last block), so a block computes
  beside the next one's flat output, and the previous block's reduce-scatter input is kept until
  this block's (`reduce_scatter_state`). CUDA allocates these on FSDP2's side streams but frees them
  in the same program order, so the allocated bytes are those of a synchronous run.
  Under `amp-*`, FSDP2's own mixed precision as torchtitan sets it: `MixedPrecisionPolicy(
  param_dtype=<16-bit>, reduce_dtype=float32)` over fp32 shards, in place of autocast. All-gathers
  produce 16-bit parameters, the forward and backward run in 16-bit (activations as under
  `--dtype bf16` / `fp16`, no autocast cache), the unsharded gradients are 16-bit and are cast
  to fp32 for the reduce-scatter; shards, their gradients and the optimizer state are fp32.
  Every parameter is gathered in param_dtype, peft's fp32 adapters too (so LoRA's paths save
  16-bit inputs, as a 16-bit model's with 16-bit adapters would), and each all-gather first casts
  the local shards to param_dtype (its inputs, beside the flat output it fills).

ZO methods are forward-only: no gradients to reduce, so ddp holds its (unused) buckets only because
the model is wrapped, zero1/2 partition just the method's own state, and fsdp / zero3 gather a block
only while it computes; z perturbs each rank's local shard. `--offload params` with a ZO method is
ZO2's scheme: the decoder blocks live on the host and stream in one after the other (the next one
uploading while one computes) and are perturbed and updated on the way; embeddings and head stay.

Notation: N ranks (`num_gpus`), P trainable parameters, pb / gb bytes per parameter / gradient
element (the dtype's weight bytes), c the method's optimizer-state copies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from memplan.errors import MemplanError
from memplan.options import Config, Offload, Scheme, Sharding
from memplan.overhead import round_block
from memplan.result import Category, Phase
from memplan.spec import ModelSpec, per_spec

if TYPE_CHECKING:
    from memplan.analytic import Inputs

C = Category
MIB = 1 << 20

# torch.nn.parallel.DistributedDataParallel defaults (bucket_cap_mb, _DEFAULT_FIRST_BUCKET_BYTES).
DDP_BUCKET_CAP_BYTES = 25 * MIB
DDP_FIRST_BUCKET_BYTES = 1 * MIB

ZERO = (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3)


def mode(cfg: Config) -> Sharding:
    return cfg.sharding.resolved(cfg.num_gpus)


def is_plain(cfg: Config) -> bool:
    """One GPU, nothing shared or offloaded: the single-device phases as they are."""
    return cfg.num_gpus == 1 and mode(cfg) is Sharding.NONE and cfg.offload is Offload.NONE


def refusal(cfg: Config) -> str | None:
    """Why a layout cannot be estimated (a combination no library runs), or None."""
    m, zo = mode(cfg), not cfg.method.is_fo  # ZO and forward-gradient: forward-only, no gradients to reduce
    if cfg.nodes > cfg.num_gpus:
        return f"--nodes {cfg.nodes} is more than --num-gpus {cfg.num_gpus}: every machine runs at least one rank"
    if cfg.num_gpus % cfg.nodes:
        return f"--num-gpus {cfg.num_gpus} does not split evenly over --nodes {cfg.nodes}"
    if m is Sharding.NONE and cfg.num_gpus > 1 and not zo:
        return (f"--sharding none with --num-gpus {cfg.num_gpus}: first-order ranks must share gradients; "
                "use ddp, zero1, zero2, zero3 or fsdp")
    if cfg.offload is Offload.NONE:
        return None
    if zo:
        from memplan import methods

        if cfg.offload is Offload.OPTIMIZER and methods.get(cfg.method).state_copies(cfg) == 0:
            return f"--offload optimizer: {cfg.method.value} keeps no optimizer state to offload"
        if m in (Sharding.ZERO1, Sharding.ZERO2) and cfg.offload is Offload.PARAMS:
            return "--offload params needs zero3 or fsdp (ZeRO offloads parameters only in stage 3), or none / ddp (ZO2)"
        return None
    if m in (Sharding.NONE, Sharding.DDP):
        return (f"--offload {cfg.offload.value} needs --sharding zero1, zero2, zero3 (ZeRO-Offload) or fsdp "
                "(CPUOffloadPolicy)")
    if cfg.offload is Offload.PARAMS and m in (Sharding.ZERO1, Sharding.ZERO2):
        return "--offload params needs zero3 or fsdp: DeepSpeed offloads parameters only in stage 3"
    if cfg.offload is Offload.OPTIMIZER and m is Sharding.FSDP:
        return ("--offload optimizer with fsdp: FSDP2's CPUOffloadPolicy moves parameters, gradients and the "
                "optimizer step together; use --offload params")
    return None


# ---- shards -------------------------------------------------------------------------------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def dim0_shard(shape: tuple[int, ...], n: int) -> int:
    """Elements of rank 0's FSDP2 shard of one tensor: ceil(rows / N) rows (`torch.chunk` on dim 0)."""
    rest = 1
    for d in shape[1:]:
        rest *= d
    return ceil_div(shape[0], n) * rest


def dim0_padded(shape: tuple[int, ...], n: int) -> int:
    """Elements of one tensor as FSDP2 all-gathers it: N padded shards."""
    return n * dim0_shard(shape, n)


Shapes = tuple[tuple[tuple[int, ...], int, "int | None"], ...]  # (shape, bytes per element, layer or None)


def frozen_shapes(cfg: Config, spec: ModelSpec) -> Shapes:
    """(shape, bytes per element, layer) of every parameter that does not train (empty for ft)."""
    if cfg.scheme is Scheme.FT:
        return ()
    return tuple((t.shape, cfg.dtype.weight_bytes, t.layer) for t in spec.tensors)


def trainable_shapes(cfg: Config, spec: ModelSpec) -> Shapes:
    """(shape, bytes per element, layer) of every trainable tensor; prefix / prompt belong to the root."""
    from memplan.methods.zo import shapes_key

    return _trainable_shapes(spec, *shapes_key(cfg, spec))


@per_spec
def _trainable_shapes(spec: ModelSpec, scheme: Scheme, *args) -> Shapes:
    from memplan.methods.zo import trainable_shapes as shapes

    layer_of = {t.name: t.layer for t in spec.tensors}  # a LoRA factor is named after its weight
    return tuple((shape, eb, layer_of.get(name.rsplit(".lora_", 1)[0])) for name, shape, eb in
                 shapes(spec, scheme, *args))


def fsdp_bytes(tensors, n: int, *, padded: bool = False, eb: int | None = None) -> int:
    """sum round512(shard * bytes) over tensors (padded: the whole all-gathered tensor); `eb` replaces
    each tensor's bytes per element (a mixed-precision all-gather)."""
    size = dim0_padded if padded else dim0_shard
    return sum(round_block(size(shape, n) * (eb or b)) for shape, b, _ in tensors)


def by_layer(tensors) -> tuple[list, dict[int, list]]:
    root, blocks = [], {}
    for t in tensors:
        (root if t[2] is None else blocks.setdefault(t[2], [])).append(t)
    return root, blocks


# ---- per-rank phases ----------------------------------------------------------------------------

Moment = dict[Category, int]
Phases = dict[Phase, Moment]


@dataclass(frozen=True, slots=True)
class Rank:
    """One rank's share: model state (base), what its method's phases read as trainable, what each
    phase adds in flight (communication), the host bytes of its machine."""

    base: dict[Category, int]
    grad_bytes: int
    largest_bytes: int
    extra: dict[Phase, int]
    host_bytes: int


def phases(p: Inputs, method_phases: Callable[[Inputs], Phases]) -> Phases:
    """Bytes per category at the peak of each phase on the busiest rank."""
    cfg = p.cfg
    if is_plain(cfg):
        return method_phases(p)
    r = rank(p)
    train = replace(p.train, bytes=r.grad_bytes, largest_bytes=r.largest_bytes)
    s = p.s
    m = mode(cfg)
    if cfg.dtype.is_amp and (m is Sharding.FSDP or m in ZERO and cfg.method.is_fo):
        # the library's own mixed precision (FSDP2's policy, DeepSpeed's bf16 / fp16): 16-bit compute
        from memplan.analytic import shapes

        s = shapes(cfg.replace(dtype=compute_dtype(cfg)), p.spec)
        if m is Sharding.FSDP:  # the policy gathers every parameter in param_dtype, peft's adapters too
            s = replace(s, adapter_bytes=s.cb)
    out = method_phases(replace(p, s=s, base=r.base, train=train))
    if m is Sharding.FSDP:
        return fsdp_moments(replace(p, s=s, base=r.base, train=train), out, r)
    for ph, moment in out.items():
        extra = r.extra.get(ph, r.extra.get(None, 0))
        if extra:
            moment = dict(moment)
            moment[C.COMMUNICATION] = moment.get(C.COMMUNICATION, 0) + extra
            out[ph] = moment
    return out


def compute_dtype(cfg: Config):
    """The 16-bit dtype an `amp-*` run computes in (FSDP2's `param_dtype`)."""
    from memplan.options import Dtype

    return Dtype.BF16 if cfg.dtype is Dtype.AMP_BF16 else Dtype.FP16


def host_bytes(p: Inputs) -> int:
    return 0 if is_plain(p.cfg) else rank(p).host_bytes


def rank(p: Inputs) -> Rank:
    refuse = refusal(p.cfg)
    if refuse:
        raise MemplanError(refuse)
    m = mode(p.cfg)
    if m is Sharding.FSDP:
        return _fsdp(p)
    if m in ZERO:
        from memplan.zero import rank as zero_rank

        return zero_rank(p, ZERO.index(m) + 1)
    return _replicated(p, ddp=m is Sharding.DDP)


def per_node(cfg: Config) -> int:
    """Ranks on one machine: host memory is the sum over them."""
    return cfg.num_gpus // cfg.nodes


def ddp_bucket_bytes(sizes: list[int]) -> int:
    """DDP's gradient buckets: params in reverse registration order, a bucket closed once it reaches
    its cap (1 MiB for the first, 25 MiB after; `compute_bucket_assignment_by_size`); each bucket one
    flat tensor."""
    total, bucket, cap = 0, 0, DDP_FIRST_BUCKET_BYTES
    for b in reversed(sizes):
        bucket += b
        if bucket >= cap:
            total, bucket, cap = total + round_block(bucket), 0, DDP_BUCKET_CAP_BYTES
    return total + round_block(bucket)


def _replicated(p: Inputs, *, ddp: bool) -> Rank:
    """none / ddp: every rank holds the whole model state; ddp adds its buckets; ZO2 offload streams blocks."""
    cfg, spec = p.cfg, p.spec
    base = dict(p.base)
    comm = 0
    if ddp:
        from memplan.methods.zo import shapes_key

        comm = _ddp_buckets(spec, shapes_key(cfg, spec))
    host = 0
    extra: dict = {None: comm}
    if cfg.offload is Offload.OPTIMIZER:  # ZO only (refusal): the method's state on the host
        host = base[C.OPTIMIZER_STATE] * per_node(cfg)
        base[C.OPTIMIZER_STATE] = 0
    elif cfg.offload is Offload.PARAMS:  # ZO2: blocks on the host, two on the GPU at a time
        whole = fsdp_sizes(cfg.replace(num_gpus=1, nodes=1), spec, mixed=False)  # one "rank": tensors whole
        on_host = whole.shards - whole.root
        host = (on_host + base[C.OPTIMIZER_STATE]) * per_node(cfg)
        base[C.WEIGHTS] -= on_host
        base[C.OPTIMIZER_STATE] = 0
        streamed = whole.two_blocks
        extra = {None: comm, Phase.FORWARD: comm + streamed, Phase.PERTURB: comm + streamed,
                 Phase.OPTIMIZER_STEP: comm + streamed}
    return Rank(base=base, grad_bytes=p.train.bytes, largest_bytes=p.train.largest_bytes, extra=extra,
                host_bytes=host)


@per_spec
def _ddp_buckets(spec: ModelSpec, key: tuple) -> int:
    return ddp_bucket_bytes([_numel(s) * eb for s, eb, _ in _trainable_shapes(spec, *key)])


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _largest(sizes: list[int], k: int) -> int:
    """The k largest blocks together (the blocks gathered at once may be any k, for mixed layers)."""
    return sum(sorted(sizes, reverse=True)[:k])


@dataclass(frozen=True, slots=True)
class FsdpSizes:
    """Bytes of one rank under FSDP2 that depend only on the model, what trains and N (cached)."""

    shards: int  # every parameter's shard
    trainable_shards: int  # the trainable ones' (their gradients and state have this size)
    largest_shard: int
    root: int  # the root's parameters, gathered
    root_trainable: int  # its trainable ones, gathered (their unsharded gradients)
    block: int  # the largest decoder block, gathered
    two_blocks: int  # the two largest decoder blocks, gathered
    first_copy_out: int  # the first block's flat all-gather output and its unsharded parameters
    copy_out: int  # the most a block's copy-out holds in forward: the previous block's flat output too
    root_grads_early: int  # the root's unsharded gradients made before the input embeddings' (lm_head, norm)
    block_trainable: int  # the largest block's trainable parameters, gathered (unsharded gradients)
    block_trainable_full: int  # the same in the parameters' own dtype (the reduce-scatter input)
    block_cast: int  # the largest block's shards cast to param_dtype, its all-gather's inputs (amp only)


def fsdp_sizes(cfg: Config, spec: ModelSpec, *, mixed: bool = True) -> FsdpSizes:
    """`FsdpSizes` of `cfg` (mixed: amp-* gathers in 16-bit, FSDP2's MixedPrecisionPolicy)."""
    from memplan.methods.zo import shapes_key

    # Mixed precision (amp-*): parameters are gathered, and gradients made, in the 16-bit param_dtype.
    mp = compute_dtype(cfg).weight_bytes if cfg.dtype.is_amp and mixed else None
    frozen_wb = cfg.dtype.weight_bytes if cfg.scheme is not Scheme.FT else None
    return _fsdp_sizes(spec, shapes_key(cfg, spec), frozen_wb, cfg.num_gpus, mp)


@per_spec
def _fsdp_sizes(spec: ModelSpec, key: tuple, frozen_wb: int | None, n: int, mp: int | None) -> FsdpSizes:
    train = _trainable_shapes(spec, *key)
    frozen = () if frozen_wb is None else tuple((t.shape, frozen_wb, t.layer) for t in spec.tensors)
    root_t, blocks_t = by_layer(train)
    root_f, blocks_f = by_layer(frozen)
    layers = sorted(set(blocks_t) | set(blocks_f))
    gathered = [fsdp_bytes(blocks_t.get(i, []) + blocks_f.get(i, []), n, padded=True, eb=mp) for i in layers]
    # Backward reaches the input embeddings last: their gradients appear at its end (a tied word
    # embedding gets the head's at its start).
    late = [] if key[0] is not Scheme.FT or not root_t else [
        (t.shape, root_t[0][1], None) for t in spec.tensors if t.layer is None and t.group == "embeddings"
        and not (spec.tie_word_embeddings and t.shape[0] == spec.vocab_size)]
    return FsdpSizes(
        shards=fsdp_bytes(train, n) + fsdp_bytes(frozen, n), trainable_shards=fsdp_bytes(train, n),
        largest_shard=max(round_block(dim0_shard(s, n) * eb) for s, eb, _ in train),
        root=fsdp_bytes(root_t + root_f, n, padded=True, eb=mp),
        root_trainable=fsdp_bytes(root_t, n, padded=True, eb=mp), block=_largest(gathered, 1),
        two_blocks=_largest(gathered, 2), first_copy_out=2 * gathered[0] if gathered else 0,
        copy_out=max([2 * g for g in gathered[:1]] + [a + 2 * b for a, b in zip(gathered, gathered[1:])], default=0),
        root_grads_early=fsdp_bytes(root_t, n, padded=True, eb=mp) - fsdp_bytes(late, n, padded=True, eb=mp),
        block_trainable=max((fsdp_bytes(blocks_t[i], n, padded=True, eb=mp) for i in blocks_t), default=0),
        block_trainable_full=max((fsdp_bytes(blocks_t[i], n, padded=True) for i in blocks_t), default=0),
        block_cast=max((fsdp_bytes(blocks_t.get(i, []) + blocks_f.get(i, []), n, eb=mp) for i in layers),
                       default=0) if mp else 0,
    )


def _fsdp(p: Inputs) -> Rank:
    """FSDP2 FULL_SHARD over N ranks (see the module doc)."""
    cfg, spec = p.cfg, p.spec
    z = fsdp_sizes(cfg, spec)
    fo = cfg.method.is_fo
    buffers = sum(round_block(t.numel * 4) for t in spec.buffers)
    grads = z.trainable_shards
    copies = p.base[C.OPTIMIZER_STATE] // p.train.bytes if p.train.bytes else 0
    state = copies * grads
    base = {C.WEIGHTS: z.shards + buffers, C.OPTIMIZER_STATE: state}
    host = 0
    if cfg.offload is Offload.PARAMS:
        # CPUOffloadPolicy: shards, their gradients and the optimizer step on the host; a block's
        # shard is copied to the GPU for its all-gather.
        host = (z.shards + (grads if fo else 0) + state) * per_node(cfg)
        base = {C.WEIGHTS: buffers, C.OPTIMIZER_STATE: 0}
        grads = 0 if fo else grads
    elif cfg.offload is Offload.OPTIMIZER:  # forward-only methods (refusal): their state on the host
        host = state * per_node(cfg)
        base[C.OPTIMIZER_STATE] = 0
    # what FSDP2 holds in flight depends on the moment, not only the phase: `fsdp_moments`
    return Rank(base=base, grad_bytes=grads, largest_bytes=z.largest_shard, extra={}, host_bytes=host)


def _plus(moment: Moment, comm: int, **drop: bool) -> Moment:
    out = {c: n for c, n in moment.items() if not drop.get(c.name.lower())}
    out[C.COMMUNICATION] = out.get(C.COMMUNICATION, 0) + comm
    return out


def fsdp_moments(p: Inputs, out: Phases, r: Rank) -> Phases:
    """The method's phases on the shards plus what FSDP2 holds in flight at their peak (the module doc):
    gathered parameters, unsharded gradients and reduce-scatter inputs, as communication."""
    from memplan.methods import peak_of

    cfg, spec, s = p.cfg, p.spec, p.s
    z = fsdp_sizes(cfg, spec)
    fo = cfg.method.is_fo
    # A block's backward: the root's unsharded gradients made so far (reduce-scattered at the end), the
    # block's parameters and the next block's prefetched flat output, its unsharded gradients as they
    # appear, and the previous block's reduce-scatter input (kept until this block's reduce-scatter
    # starts; a block with one before and one after it: three layers or more); under mixed precision
    # the prefetch's all-gather inputs too (the next block's shards cast to param_dtype). Its copy-in
    # then holds the gradients and their reduce-scatter input beside the prefetched block.
    prev_rs = z.block_trainable_full if spec.num_layers >= 3 else 0
    in_block = z.root + z.root_grads_early + z.block_trainable + max(z.two_blocks + prev_rs + z.block_cast,
                                                                     z.block + z.block_trainable_full)
    res: Phases = {}
    for ph, moment in out.items():
        if ph is Phase.FORWARD:
            # At the logits: the root and the last block's flat output. Before: a block's copy-out; the
            # last block's beside every earlier layer's saved activations.
            before_last = _plus(moment, z.root + z.copy_out, logits=True)
            before_last[C.ACTIVATIONS] = moment.get(C.ACTIVATIONS, 0) * (spec.num_layers - 1) // spec.num_layers
            candidates = [_plus(moment, z.root + z.block), before_last]
            if fo:  # the root was resharded after backward: the first block's copy-out, with nothing saved
                # yet, holds the root gathered and its flat output besides the block's own two buffers
                candidates.append(_plus(moment, 2 * z.root + z.first_copy_out, logits=True, activations=True))
            res[ph] = peak_of(candidates)
        elif ph is Phase.BACKWARD and fo:
            hidden_grad = s.tokens * spec.hidden_size * s.r
            fwd = out[Phase.FORWARD]
            ws = moment.get(C.WORKSPACE, 0)
            block_moment = _plus({**fwd, C.WORKSPACE: ws}, in_block, logits=True)
            block_moment[C.ACTIVATIONS] = block_moment.get(C.ACTIVATIONS, 0) + hidden_grad
            end = {**p.base, C.GRADIENTS: r.grad_bytes, C.WORKSPACE: ws}
            if moment.get(C.LOGITS):  # the logits' gradient: the root and the last block, prefetched
                own = _plus(moment, z.root + z.block)
            elif moment.get(C.ACTIVATIONS):  # inside a block (a recomputed one, a dequantised weight)
                own = _plus(moment, in_block)
            else:  # every gradient made: the root's unsharded ones beside it, before their reduce-scatter
                own = _plus(moment, z.root + z.root_trainable)
            res[ph] = peak_of([own, block_moment, _plus(end, z.root + z.root_trainable)])
        elif fo:  # resharded after backward
            res[ph] = dict(moment)
        else:  # forward-only: the root is never resharded, gathered between steps
            res[ph] = _plus(moment, z.root)
    return res
