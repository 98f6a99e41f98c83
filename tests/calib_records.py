"""Synthetic records shaped like the CUDA runner's, for fit and report tests (no GPU needed)."""

from memplan.calibration.grid import config_key
from memplan.options import Config

GIB, MIB = 1 << 30, 1 << 20
TINY = {"model_type": "opt", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 128, "word_embed_proj_dim": 64}
H100 = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "gpu_total_bytes": 85520809984, "family": "hopper",
        "driver": "550.54", "cuda": "12.4", "torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}


def cuda_record(key, *, method="zo-sgd", batch=1, status="ok", allocated=None, reserved=None, context=None,
                workspace=32 * MIB, total=None):
    cfg = Config(model="tiny-opt", method=method, batch=batch, seq=16, dtype="fp16")
    rec = {"schema": 1, "key": key, "tier": "measured", "grid": "synthetic", "meter": "cuda", "status": status,
           "config": cfg.model_dump(mode="json"), "model_name": "tiny-opt", "model_config": dict(TINY),
           "config_key": config_key(cfg, TINY), "env": {**H100, **({"gpu_total_bytes": total} if total else {})},
           "settings": {"device": "cuda", "warmup_steps": 1, "measured_steps": 2, "seed": 0}}
    if status == "ok":
        rec.update(peak_allocated_bytes=allocated, peak_reserved_bytes=reserved, workspace_bytes=workspace,
                   context_bytes=context, peak_device_bytes=None if context is None else reserved + context)
    else:
        rec["error"] = "OutOfMemoryError: CUDA out of memory"
    return rec
