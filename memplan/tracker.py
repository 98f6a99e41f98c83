"""Live tensor bytes, storage by storage, under a `TorchDispatchMode` (fake or real tensors alike).

Every op's outputs are looked at; a storage that is neither known nor one of the op's inputs (views
and in-place results share an input's storage) is new: it gets a record with its bytes rounded up
to 512 B, as the CUDA caching allocator rounds a block, and a finalizer on the storage object ends
it. Allocations inside a kernel that never surface as an op's output (cuBLAS workspaces, flash
attention's backward accumulators) are invisible here, on fake and real tensors alike.

Each record gets a category when it is born, by the first rule that applies:
1. `_to_copy` of a weight is a weight (autocast's 16-bit copies of the weights);
2. anything computed from a tangent is a tangent (forward-grad's dual activations);
3. a tensor of batch x seq (or seq - 1) x vocab elements whose last dim is the vocabulary is logits;
4. the innermost `region` the step opened (perturbation, optimizer state, tangents);
5. the phase: load, forward and backward allocate activations, the optimizer step its state,
   a perturbation its z.
Three things run differently under a dispatch mode (or on the CPU) than on CUDA, and the tracker
counts them as CUDA would:
- dropout: the CPU keeps an input-dtype noise tensor (`empty_like(x).bernoulli_()`), CUDA's fused
  kernel a bool mask: a tensor filled by `bernoulli_` counts one byte per element;
- autograd's zeros (`_efficientzerotensor`, the tangent of an input that has none): a ZeroTensor's
  storage has a size but no memory on any device, so it counts 0 bytes;
- gradient accumulation in backward: autograd sums two gradients of one tensor in place when it
  holds the last reference, but out of place when any dispatch mode is active (`old + new`): an
  `add` in backward whose first input dies before the next allocation counts as in place;
- bitsandbytes' `gemm_4bit` (`--quant` 4-bit forward): CUDA dequantises the whole weight into a
  buffer before `F.linear` (its unfused path, which it takes past a few rows), inside the op where
  no tracker sees it; the tracker counts that buffer alive while the op's output is made
  (`memplan.quant.gemm_4bit_scratch`).
Under torch.distributed (`distributed=True`) three more things hold:
- a DTensor op is let through (`NotImplemented`) so that DTensor runs it as ops on the local shard,
  which are what is counted; the ops DTensor runs under its own FakeTensorMode to propagate shapes
  allocate nothing and are skipped (the MemTracker of torch.distributed._tools does the same);
- FSDP2 frees and re-allocates unsharded parameters by resizing their storage (not an op): a resize
  ends the storage's record and, to a non-zero size, starts a new one;
- `wait_tensor` returns its input, as it does eagerly (its fake kernel makes a new tensor).
The step then names what it knows: `tag` (the storage had that role all its life: gradients,
optimizer state) and `bind` (from now on: MeZO's new weight copy). Events are kept in order, so the
peak and its breakdown are computed afterwards over any stretch (the measured step).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from memplan import _compat
from memplan._compat import dispatch_mode_base, size_key, storage_key, tree_leaves
from memplan.result import Category, Phase
from memplan.overhead import ROUND, round_block
from memplan.steps import Hooks

_ALLOC, _FREE, _BIND, _PHASE, _LAYER = 0, 1, 2, 3, 4
MULTI = -1  # the layer label of an op that reads several layers' parameters (a foreach optimizer step)
_BERNOULLI = (torch.ops.aten.bernoulli_.float, torch.ops.aten.bernoulli_.Tensor)
# Autograd's zeros for an input without a tangent or gradient: ATen's ZeroTensorAllocator gives the
# storage a size and a null data pointer on every device, so it holds no memory.
_ZERO = torch.ops.aten._efficientzerotensor.default
_DEFAULT = {
    Phase.LOAD: Category.ACTIVATIONS,
    Phase.FORWARD: Category.ACTIVATIONS,
    Phase.BACKWARD: Category.ACTIVATIONS,
    Phase.OPTIMIZER_STEP: Category.OPTIMIZER_STATE,
    Phase.PERTURB: Category.PERTURBATION,
}


class _Rec:
    __slots__ = ("key", "nbytes", "born", "now", "op", "sum_of", "host", "__weakref__")

    def __init__(self, key: int, nbytes: int, born: Category, op: str):
        self.key, self.nbytes, self.born, self.now, self.op = key, nbytes, born, born, op
        self.sum_of: _Rec | None = None  # backward `old + new`: the `old` it would overwrite on CUDA
        self.host = False  # offloaded: counted in host bytes, not the GPU's


@dataclass
class Peak:
    """The largest live total over a stretch of events, what it was made of, and per-phase peaks."""

    allocated: int
    phase: Phase
    components: dict[Category, int]
    phases: dict[Phase, int] = field(default_factory=dict)
    op: str = ""  # the op whose output set the peak
    host_bytes: int = 0  # the most bytes held in host memory (offloaded) at once over the stretch


class LiveBytes(Hooks, dispatch_mode_base()):
    """A dispatch mode that counts every live storage; also the `Hooks` a step reports to."""

    def __init__(self, *, logits_numels: tuple[int, ...] = (), vocab_size: int = 0, cuda_host: bool = False,
                 distributed: bool = False):
        super().__init__()
        self.distributed = distributed
        self._fake_on_entry = None
        # numels as `size_key` spells them: a symbolic size (memplan.symbolic) is unhashable as a SymInt
        self.logits_numels, self.vocab_size = {size_key(n) for n in logits_numels}, vocab_size
        self.cuda_host = cuda_host  # drop what lives in host memory on CUDA (Adam's step counters)
        self.live: dict[int, _Rec] = {}
        self.events: list[tuple] = []
        self.current = Phase.LOAD
        self._regions: list[Category] = []
        self.layer_of: dict[int, int] = {}  # storage key -> decoder layer index (`label_layers`)
        self._layer_params: list[tuple[int, list]] = []
        self._layer: int | None = None

    # ---- the dispatch mode ----

    def __enter__(self):
        if self.distributed:
            self._fake_on_entry = _compat.active_fake_mode()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.distributed:
            if _compat.is_dtensor_type(types):
                return NotImplemented  # DTensor runs it on the local shard, through this mode again
            if _compat.is_wait_tensor(func) and self._fake_on_entry is not None:
                return args[0]
            out = func(*args, **kwargs)
            if _compat.active_fake_mode() is not self._fake_on_entry:
                return out  # DTensor's shape propagation: nothing allocated
        else:
            out = func(*args, **kwargs)
        if self.layer_of:
            self._label(args, kwargs)
        scratch = self._scratch(func, args, kwargs)
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = storage_key(st)
            if key in self.live:
                continue
            if inputs is None:
                inputs = {storage_key(a.untyped_storage()): a for a in tree_leaves((args, kwargs))
                          if isinstance(a, torch.Tensor)}
            if key in inputs:
                continue  # a view or in-place result of a storage made before tracking
            rec = self._new(st, key, self._category(func, t, inputs), func.__name__)
            if func is _ZERO:  # a ZeroTensor: its storage has a size but no memory behind it
                self._resize(rec, 0)
            if func is torch.ops.aten.add.Tensor and self.current is Phase.BACKWARD:
                first = args[0] if isinstance(args[0], torch.Tensor) else None
                old = self.live.get(storage_key(first.untyped_storage())) if first is not None else None
                if old is not None and size_key(old.nbytes) == size_key(rec.nbytes):
                    rec.sum_of = old
        if func in _BERNOULLI:  # dropout noise: a bool mask on CUDA
            rec = self.live.get(storage_key(args[0].untyped_storage()))
            if rec is not None:
                self._resize(rec, _round(args[0].numel()))
        if scratch is not None:
            self.events.append((_FREE, scratch))
        return out

    def _label(self, args, kwargs) -> None:
        """A layer event where the op reads a decoder layer's parameters and the last one read another's."""
        found = None
        for a in tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                i = self.layer_of.get(storage_key(a.untyped_storage()))
                if i is not None and i != found:
                    found = i if found is None else MULTI
                    if found == MULTI:
                        break
        if found is not None and found != self._layer:
            self._layer = found
            self.events.append((_LAYER, found))

    def _scratch(self, func, args, kwargs) -> _Rec | None:
        """A buffer CUDA allocates inside `func` and frees before it returns (see the module doc)."""
        if getattr(func, "namespace", None) != "bitsandbytes":
            return None
        from memplan.quant import gemm_4bit_scratch

        nbytes = gemm_4bit_scratch(func, args, kwargs)
        if not nbytes:
            return None
        rec = _Rec(-len(self.events), nbytes, self._regions[-1] if self._regions else _DEFAULT[self.current],
                   func.__name__ + " (scratch)")
        self.events.append((_ALLOC, rec))
        return rec

    def _resize(self, rec: _Rec, nbytes: int) -> None:
        rec.nbytes = nbytes

    def resized(self, storage) -> None:
        """A storage resized in place (FSDP2's free and re-allocation of unsharded parameters)."""
        key = storage_key(storage)
        old = self.live.get(key)
        if old is not None:
            self._free(key)
        if storage.nbytes():  # (a second finalizer on the storage finds nothing left to free)
            self._new(storage, key, self._regions[-1] if self._regions else _DEFAULT[self.current], "resize_")

    def _category(self, func, t, inputs) -> Category:
        recs = [self.live.get(k) for k in inputs]
        if func is torch.ops.aten._to_copy.default and recs and recs[0] is not None \
                and recs[0].now is Category.WEIGHTS:
            return Category.WEIGHTS
        if any(r is not None and r.now is Category.TANGENTS for r in recs):
            return Category.TANGENTS
        if self.vocab_size and t.dim() >= 2 and isinstance(t.shape[-1], int) and t.shape[-1] == self.vocab_size \
                and size_key(t.numel()) in self.logits_numels:
            return Category.LOGITS
        if self._regions:
            return self._regions[-1]
        return _DEFAULT[self.current]

    def _new(self, st, key: int, category: Category, op: str) -> _Rec:
        rec = _Rec(key, _round(st.nbytes()), category, op)
        self.live[key] = rec
        self.events.append((_ALLOC, rec))
        weakref.finalize(st, self._free, key)
        return rec

    def _free(self, key: int) -> None:
        if self.layer_of:
            self.layer_of.pop(key, None)
        rec = self.live.pop(key, None)
        if rec is not None:
            self.events.append((_FREE, rec))

    # ---- what the step reports (Hooks) ----

    def phase(self, phase: Phase) -> None:
        self.current = phase
        self._relabel()
        self.events.append((_PHASE, phase))

    def label_layers(self, layers) -> None:
        """Mark ops by decoder layer: `layers` is (index, tensors) for each layer, its parameters.
        The replay (`walk(labels=True)`) then says which layer's ops each moment belongs to, which is
        how `memplan.depth` matches the moments of shallow copies of a model to extrapolate in depth."""
        self._layer_params = [(i, list(tensors)) for i, tensors in layers]
        self._relabel()

    def _relabel(self) -> None:
        """The layer map from the parameters' storages now (MeZO's `p.data = p.data + z` gives a weight a
        new storage; a freed storage's key leaves the map, so a later one at its address is not taken
        for a weight). Called at each phase boundary."""
        self._layer = None
        if self._layer_params:
            self.layer_of = {storage_key(_compat.local_tensor(t).untyped_storage()): i
                             for i, tensors in self._layer_params for t in tensors}

    @contextlib.contextmanager
    def region(self, category: Category):
        self._regions.append(category)
        try:
            yield
        finally:
            self._regions.pop()

    def _recs(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                rec = self.live.get(storage_key(_compat.local_tensor(t).untyped_storage()))
                if rec is not None:
                    yield rec

    def tag(self, category: Category, tensors) -> None:
        for rec in self._recs(tensors):
            rec.born = rec.now = category

    def bind(self, category: Category, tensors) -> None:
        for rec in self._recs(tensors):
            if rec.now is not category:
                rec.now = category
                self.events.append((_BIND, rec, category))

    def host(self, tensors) -> None:
        if self.cuda_host:
            for rec in self._recs(tensors):
                rec.nbytes = 0

    def offloaded(self, tensors) -> None:
        for rec in self._recs(tensors):
            rec.host = True

    def adopt(self, tensors, category: Category) -> None:
        """Count storages made before tracking began (the model's weights)."""
        for t in tensors:
            st = _compat.local_tensor(t).untyped_storage()
            if storage_key(st) not in self.live:
                self._new(st, storage_key(st), category, "adopt")

    def mark(self) -> int:
        """An index into the events: `peak(start=mark())` looks only at what follows."""
        self._relabel()
        self.events.append((_PHASE, self.current))
        return len(self.events) - 1

    # ---- results ----

    @property
    def allocated(self) -> int:
        return sum(r.nbytes for r in self.live.values())

    def _in_place_sums(self) -> dict[_Rec, _Rec]:
        """Backward sums `old + new` whose `old` dies before anything else is allocated: in place on CUDA."""
        found: dict[_Rec, _Rec] = {}
        events = self.events
        for i, ev in enumerate(events):
            if ev[0] != _ALLOC or ev[1].sum_of is None:
                continue
            old = ev[1].sum_of
            for later in events[i + 1:]:
                if later[0] == _ALLOC:
                    break
                if later[0] == _FREE and later[1] is old:
                    found[ev[1]] = old
                    break
        return found

    def walk(self, start: int = 0, nbytes=None, labels: bool = False):
        """Replay the events; after `start`, yield (event, phase, total, totals by category) wherever the
        live total can reach a new high (an allocation or a phase boundary). The dicts are live: copy to keep.
        `labels`: also yield at every free and layer event (`label_layers`), whose event is (4, layer index).

        `nbytes(rec)` gives a record's bytes (default: its own); `memplan.symbolic` passes bytes as
        formulas of batch and seq, so one replay serves every (batch, seq).
        """
        size = nbytes or (lambda rec: rec.nbytes)
        cat: dict[_Rec, Category] = {}
        zero = size(None) if nbytes else 0
        totals = dict.fromkeys(Category, zero)
        total, phase = zero, Phase.LOAD
        host = 0
        self.host_peak = 0  # host bytes (offloaded tensors) at their highest after `start`
        in_place = self._in_place_sums()
        overwritten: set[_Rec] = set()
        for i, ev in enumerate(self.events):
            kind = ev[0]
            if kind == _ALLOC and ev[1].host:
                host += ev[1].nbytes
                if i >= start:
                    self.host_peak = max(self.host_peak, host)
                continue
            if kind == _FREE and ev[1].host:
                host -= ev[1].nbytes
                continue
            if kind == _ALLOC:
                rec = ev[1]
                n = size(rec)
                c = cat[rec] = rec.born
                totals[c] = totals[c] + n
                total = total + n
                old = in_place.get(rec)
                if old is not None and old in cat:  # CUDA writes the sum into `old`: no new bytes
                    m = size(old)
                    totals[cat[old]] = totals[cat[old]] - m
                    total = total - m
                    overwritten.add(old)
            elif kind == _FREE:
                rec = ev[1]
                c = cat.pop(rec, rec.born)
                if rec in overwritten:
                    continue
                n = size(rec)
                totals[c] = totals[c] - n
                total = total - n
                if labels and i >= start:
                    yield ev, phase, total, totals
                continue
            elif kind == _LAYER:
                if labels and i >= start:
                    yield ev, phase, total, totals
                continue
            elif kind == _BIND:
                rec, c = ev[1], ev[2]
                if rec in cat:
                    n = size(rec)
                    totals[cat[rec]] = totals[cat[rec]] - n
                    totals[c] = totals[c] + n
                    cat[rec] = c
                continue
            else:
                phase = ev[1]
            if i >= start:
                yield ev, phase, total, totals
        self.host_peak = max(self.host_peak, host)
        if start >= len(self.events):
            yield None, phase, total, totals

    def peak(self, start: int = 0) -> Peak:
        """Replay the events: the peak after `start`, its categories at that moment, per-phase peaks."""
        best, phases = None, {}
        last = (None, Phase.LOAD, 0, {})
        for ev, phase, total, totals in self.walk(start):
            last = (ev, phase, total, totals)
            if ev is None:  # nothing after `start`: the state at the end
                break
            if total > phases.get(phase, -1):
                phases[phase] = total
            if best is None or total > best.allocated:
                best = Peak(total, phase, {c: n for c, n in totals.items() if n}, op=_op(ev) if ev else "")
        if best is None:
            _, phase, total, totals = last
            best = Peak(total, phase, {c: n for c, n in totals.items() if n})
        best.phases = phases
        best.host_bytes = self.host_peak
        return best


def _round(n) -> int:
    """`round_block` for a size that may be symbolic: a SymInt's `if n` would add a guard."""
    return round_block(n) if isinstance(n, int) else -(-n // ROUND) * ROUND


def _op(ev) -> str:
    return ev[1].op if ev[0] == _ALLOC else ""
