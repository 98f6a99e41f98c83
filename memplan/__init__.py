"""memplan: will this fine-tuning configuration fit on my GPU?

`memplan.estimate("opt-13b", "zo-sgd", batch=16, seq=512, gpu="a100-80gb")` returns an `Estimate`;
`memplan.estimate_all("opt-13b", "all", ...)` a list, one per method. Every bad argument raises
`memplan.MemplanError` with a one-line message that names the argument and what is valid.
Names are imported lazily, so the command line starts without building what it does not use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Attention": "memplan.options", "Config": "memplan.options", "Dtype": "memplan.options",
    "Method": "memplan.options", "Perturbation": "memplan.options", "Scheme": "memplan.options",
    "Category": "memplan.result", "Estimate": "memplan.result", "Phase": "memplan.result",
    "Tier": "memplan.result", "estimate_config": "memplan.api", "MemplanError": "memplan.errors",
}
__all__ = sorted([*_EXPORTS, "estimate", "estimate_all"])


def estimate(model: str, method: str = "zo-sgd", **options):
    """Peak GPU memory of one configuration: `memplan.estimate("opt-13b", "zo-sgd", batch=16, gpu="a100-80gb")`.

    Options are `memplan.Config` fields; `gpu` names a catalog GPU (or "auto"). Returns an `Estimate`.
    One method per call (`all` raises: use `estimate_all`); bad arguments raise `MemplanError`.
    """
    from memplan.api import estimate as _estimate

    return _estimate(model, method, **options)


def estimate_all(model: str, methods="all", **options):
    """One `Estimate` per method: `memplan.estimate_all("opt-13b", "all", batch=16, gpu="h100-80gb")`.

    `methods` is `all`, comma-separated names or a list of them; options as for `estimate`.
    """
    from memplan.api import estimate_all as _estimate_all

    return _estimate_all(model, methods, **options)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")
