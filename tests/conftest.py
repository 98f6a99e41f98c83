"""Shared test helpers."""

from __future__ import annotations

import pytest


@pytest.fixture
def transformers_shapes():
    """{name: shape} of the model transformers builds from a config dict, on the meta device (tied weights once)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def build(cfg: dict) -> dict[str, tuple[int, ...]]:
        fields = {k: v for k, v in cfg.items() if k != "model_type"}
        config = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
        masked = cfg["model_type"] == "roberta"
        auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config)
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    return build
