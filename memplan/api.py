"""The Python API: `estimate(...)` returns an `Estimate`, judged against a GPU when one is given.

The pipeline lives in `memplan.pipeline`; this module keeps the names callers import.
"""

from __future__ import annotations

from memplan.pipeline import (  # noqa: F401 - re-exported
    SEARCH_LIMIT,
    device_bytes,
    estimate,
    estimate_all,
    estimate_config,
    gpu_ref,
    judge,
    largest as _largest,
    resolve_gpu,
)
