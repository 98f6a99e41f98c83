"""memplan: will this fine-tuning configuration fit on my GPU?"""

from memplan.estimate import Category, Estimate, Phase, Tier
from memplan.options import Attention, Config, Dtype, Method, Perturbation, Scheme

__all__ = ["Attention", "Category", "Config", "Dtype", "Estimate", "Method", "Perturbation", "Phase", "Scheme",
           "Tier", "estimate"]
__version__ = "0.1.0"


def estimate(model: str, method: str = "zo-sgd", **options):
    """Estimate peak GPU memory of one configuration (see `memplan.api.estimate`)."""
    from memplan.api import estimate as _estimate

    return _estimate(model, method, **options)
