"""Tiny model configs for fast CPU tests (2 layers, hidden 64)."""

import json

TINY_OPT = {
    "model_type": "opt", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "ffn_dim": 128, "max_position_embeddings": 64, "word_embed_proj_dim": 64, "do_layer_norm_before": True,
    "enable_bias": True, "activation_function": "relu", "dropout": 0.0, "attention_dropout": 0.0,
    "tie_word_embeddings": True,
}
TINY_LLAMA = {  # grouped-query attention: 4 query heads share 2 key/value heads
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False,
}


def write(tmp_path, cfg: dict, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def fp64_loss(logits, labels, vocab_size, **_):
    """transformers' causal LM loss, without its upcast to fp32 (which would swamp a finite difference)."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), labels[:, 1:].reshape(-1))


def fp64_model(cfg):
    """(model, batch): `cfg`'s model in fp64 with that loss, in eval mode (no dropout: f is
    deterministic), for finite differences against autograd."""
    from memplan.build import build_model, make_batch

    model = build_model(cfg).double()
    model.loss_function = fp64_loss
    model.eval()
    return model, make_batch(cfg, model)
