"""memplan: will this fine-tuning configuration fit on my GPU?

`memplan.estimate("opt-13b", "zo-sgd", batch=16, seq=512, gpu="a100-80gb")` returns an `Estimate`.
Names are imported lazily, so the command line starts without building what it does not use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Attention": "memplan.options", "Config": "memplan.options", "Dtype": "memplan.options",
    "Method": "memplan.options", "Perturbation": "memplan.options", "Scheme": "memplan.options",
    "Category": "memplan.result", "Estimate": "memplan.result", "Phase": "memplan.result",
    "Tier": "memplan.result", "estimate_config": "memplan.api",
}
__all__ = sorted([*_EXPORTS, "estimate"])


def estimate(model: str, method: str = "zo-sgd", **options):
    """Peak GPU memory of one configuration: `memplan.estimate("opt-13b", "zo-sgd", batch=16, gpu="a100-80gb")`.

    Options are `memplan.Config` fields; `gpu` names a catalog GPU (or "auto"). Returns an `Estimate`.
    """
    from memplan.api import estimate as _estimate

    return _estimate(model, method, **options)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")
