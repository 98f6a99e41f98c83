"""Tests that name GPUs the catalog will hold (a100-80gb, rtx-4090...) skip while it does not yet."""

from __future__ import annotations

import pytest

from memplan import hardware
from memplan.errors import MemplanError


def has_gpu(name: str) -> bool:
    try:
        hardware.get_gpu(name)
    except MemplanError:
        return False
    return True


def needs_gpu(*names: str):
    """Mark: skip unless every named GPU is in the catalog."""
    missing = [n for n in names if not has_gpu(n)]
    return pytest.mark.skipif(bool(missing), reason=f"not in the GPU catalog yet: {', '.join(missing)}")


def group_counts(spec) -> dict[str, int]:
    """Parameters per group (embeddings, attention, mlp, norms, lm_head)."""
    out: dict[str, int] = {}
    for t in spec.tensors:
        out[t.group] = out.get(t.group, 0) + t.numel
    return out


def layer_numel(spec, layer: int = 0) -> int:
    """Elements of one decoder/encoder layer's parameters."""
    return sum(t.numel for t in spec.tensors if t.layer == layer)
