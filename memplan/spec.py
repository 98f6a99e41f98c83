"""Model shapes: every parameter tensor of a Hugging Face architecture, from its config fields.

A spec is built from a config dict (the catalog's, a local config.json, or one in the local Hugging
Face cache). Names and shapes follow transformers' own modules, so a test can hold every catalog
entry against a meta-device model built by transformers, tensor by tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from memplan import configs
from memplan.errors import MemplanError, unknown

CATALOG_PATH = Path(__file__).with_name("data") / "models.json"
SUPPORTED_TYPES = ("opt", "llama", "mistral", "qwen2", "gpt2", "roberta")

# peft's default LoRA targets per architecture (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
LORA_TARGETS = {
    "opt": ("q_proj", "v_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "roberta": ("query", "value"),
}


@dataclass(frozen=True, slots=True)
class Tensor:
    """One parameter: its transformers name, shape, the module's short name and its layer (or None)."""

    name: str
    shape: tuple[int, ...]
    module: str
    layer: int | None
    group: str  # embeddings | attention | mlp | norms | lm_head

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts that change memory, for one architecture."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    tie_word_embeddings: bool
    gated_mlp: bool
    activation: str
    attention_bias: bool  # q/k/v projections carry a bias
    out_bias: bool  # the attention output projection carries a bias
    mlp_bias: bool
    norm: str  # layernorm | rmsnorm
    pre_norm: bool
    word_embed_proj_dim: int  # OPT-350m: 512, with project_in / project_out
    type_vocab_size: int = 0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    source: str = ""
    config: dict = field(default_factory=dict, repr=False, compare=False)
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # per-spec cache of derived sums

    # ---- tensors --------------------------------------------------------------------------

    @cached_property
    def tensors(self) -> tuple[Tensor, ...]:
        """Every trainable parameter tensor (tied ones once), named as transformers names them."""
        return tuple(_TENSORS[self.model_type](self))

    @cached_property
    def buffers(self) -> tuple[Tensor, ...]:
        """Non-parameter tensors that live on the device (rotary frequencies, position ids)."""
        if self.model_type in ("llama", "mistral", "qwen2"):
            half = self.head_dim // 2
            return (
                Tensor("model.rotary_emb.inv_freq", (half,), "rotary_emb", None, "buffers"),
                Tensor("model.rotary_emb.original_inv_freq", (half,), "rotary_emb", None, "buffers"),
            )
        return ()

    @cached_property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    def group_counts(self) -> dict[str, int]:
        """Parameters per group (embeddings, attention, mlp, norms, lm_head)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.group] = out.get(t.group, 0) + t.numel
        return out

    @cached_property
    def largest_numel(self) -> int:
        """Elements of the largest single parameter (bounds per-tensor ZO temporaries)."""
        return max(t.numel for t in self.tensors)

    @cached_property
    def layer_numel(self) -> int:
        """Elements of one decoder/encoder layer's parameters."""
        return sum(t.numel for t in self.tensors if t.layer == 0)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def is_causal(self) -> bool:
        return self.model_type != "roberta"

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        return LORA_TARGETS[self.model_type]


# ---- per-architecture tensor lists ----------------------------------------------------------


def _linear(prefix: str, module: str, out_f: int, in_f: int, bias: bool, layer, group) -> list[Tensor]:
    ts = [Tensor(f"{prefix}{module}.weight", (out_f, in_f), module, layer, group)]
    if bias:
        ts.append(Tensor(f"{prefix}{module}.bias", (out_f,), module, layer, group))
    return ts


def _norm(prefix: str, module: str, h: int, bias: bool, layer, group="norms") -> list[Tensor]:
    ts = [Tensor(f"{prefix}{module}.weight", (h,), module, layer, group)]
    if bias:
        ts.append(Tensor(f"{prefix}{module}.bias", (h,), module, layer, group))
    return ts


def _opt(s: ModelSpec) -> list[Tensor]:
    h, f, wpd = s.hidden_size, s.intermediate_size, s.word_embed_proj_dim
    b, affine = s.attention_bias, s.config.get("layer_norm_elementwise_affine", True)
    p = "model.decoder."
    ts = [
        Tensor(p + "embed_tokens.weight", (s.vocab_size, wpd), "embed_tokens", None, "embeddings"),
        # OPT offsets learned positions by 2 (OPTLearnedPositionalEmbedding).
        Tensor(p + "embed_positions.weight", (s.max_positions + 2, h), "embed_positions", None, "embeddings"),
    ]
    if wpd != h:
        ts += _linear(p, "project_out", wpd, h, False, None, "embeddings")
        ts += _linear(p, "project_in", h, wpd, False, None, "embeddings")
    if s.pre_norm and not s.config.get("_remove_final_layer_norm", False):
        ts += _norm(p, "final_layer_norm", h, affine, None) if affine else []
    for i in range(s.num_layers):
        lp = f"{p}layers.{i}."
        for m in ("k_proj", "v_proj", "q_proj", "out_proj"):
            ts += _linear(lp + "self_attn.", m, h, h, b, i, "attention")
        if affine:
            ts += _norm(lp, "self_attn_layer_norm", h, True, i)
        ts += _linear(lp, "fc1", f, h, s.mlp_bias, i, "mlp")
        ts += _linear(lp, "fc2", h, f, s.mlp_bias, i, "mlp")
        if affine:
            ts += _norm(lp, "final_layer_norm", h, True, i)
    if not s.tie_word_embeddings:
        ts.append(Tensor("lm_head.weight", (s.vocab_size, wpd), "lm_head", None, "lm_head"))
    return ts


def _llama(s: ModelSpec) -> list[Tensor]:
    h, f = s.hidden_size, s.intermediate_size
    ts = [Tensor("model.embed_tokens.weight", (s.vocab_size, h), "embed_tokens", None, "embeddings")]
    for i in range(s.num_layers):
        lp = f"model.layers.{i}."
        ts += _linear(lp + "self_attn.", "q_proj", s.q_dim, h, s.attention_bias, i, "attention")
        ts += _linear(lp + "self_attn.", "k_proj", s.kv_dim, h, s.attention_bias, i, "attention")
        ts += _linear(lp + "self_attn.", "v_proj", s.kv_dim, h, s.attention_bias, i, "attention")
        ts += _linear(lp + "self_attn.", "o_proj", h, s.q_dim, s.out_bias, i, "attention")
        ts += _linear(lp + "mlp.", "gate_proj", f, h, s.mlp_bias, i, "mlp")
        ts += _linear(lp + "mlp.", "up_proj", f, h, s.mlp_bias, i, "mlp")
        ts += _linear(lp + "mlp.", "down_proj", h, f, s.mlp_bias, i, "mlp")
        ts += _norm(lp, "input_layernorm", h, False, i)
        ts += _norm(lp, "post_attention_layernorm", h, False, i)
    ts += _norm("model.", "norm", h, False, None)
    if not s.tie_word_embeddings:
        ts.append(Tensor("lm_head.weight", (s.vocab_size, h), "lm_head", None, "lm_head"))
    return ts


def _gpt2(s: ModelSpec) -> list[Tensor]:
    h, f = s.hidden_size, s.intermediate_size
    ts = [
        Tensor("transformer.wte.weight", (s.vocab_size, h), "wte", None, "embeddings"),
        Tensor("transformer.wpe.weight", (s.max_positions, h), "wpe", None, "embeddings"),
    ]
    for i in range(s.num_layers):
        lp = f"transformer.h.{i}."
        ts += _norm(lp, "ln_1", h, True, i)
        # Conv1D stores weights as (in, out).
        ts += [Tensor(lp + "attn.c_attn.weight", (h, 3 * h), "c_attn", i, "attention"),
               Tensor(lp + "attn.c_attn.bias", (3 * h,), "c_attn", i, "attention"),
               Tensor(lp + "attn.c_proj.weight", (h, h), "c_proj", i, "attention"),
               Tensor(lp + "attn.c_proj.bias", (h,), "c_proj", i, "attention")]
        ts += _norm(lp, "ln_2", h, True, i)
        ts += [Tensor(lp + "mlp.c_fc.weight", (h, f), "c_fc", i, "mlp"),
               Tensor(lp + "mlp.c_fc.bias", (f,), "c_fc", i, "mlp"),
               Tensor(lp + "mlp.c_proj.weight", (f, h), "c_proj", i, "mlp"),
               Tensor(lp + "mlp.c_proj.bias", (h,), "c_proj", i, "mlp")]
    ts += _norm("transformer.", "ln_f", h, True, None)
    if not s.tie_word_embeddings:
        ts.append(Tensor("lm_head.weight", (s.vocab_size, h), "lm_head", None, "lm_head"))
    return ts


def _roberta(s: ModelSpec) -> list[Tensor]:
    h, f = s.hidden_size, s.intermediate_size
    p = "roberta.embeddings."
    ts = [
        Tensor(p + "word_embeddings.weight", (s.vocab_size, h), "word_embeddings", None, "embeddings"),
        Tensor(p + "position_embeddings.weight", (s.max_positions, h), "position_embeddings", None, "embeddings"),
        Tensor(p + "token_type_embeddings.weight", (s.type_vocab_size, h), "token_type_embeddings", None,
               "embeddings"),
    ]
    ts += _norm(p, "LayerNorm", h, True, None)
    for i in range(s.num_layers):
        lp = f"roberta.encoder.layer.{i}."
        for m in ("query", "key", "value"):
            ts += _linear(lp + "attention.self.", m, h, h, True, i, "attention")
        ts += _linear(lp + "attention.output.", "dense", h, h, True, i, "attention")
        ts += _norm(lp + "attention.output.", "LayerNorm", h, True, i)
        ts += _linear(lp + "intermediate.", "dense", f, h, True, i, "mlp")
        ts += _linear(lp + "output.", "dense", h, f, True, i, "mlp")
        ts += _norm(lp + "output.", "LayerNorm", h, True, i)
    # RobertaForMaskedLM head: dense + layer_norm + decoder (tied to word_embeddings) + bias.
    ts += _linear("lm_head.", "dense", h, h, True, None, "lm_head")
    ts += _norm("lm_head.", "layer_norm", h, True, None, group="lm_head")
    ts.append(Tensor("lm_head.bias", (s.vocab_size,), "lm_head", None, "lm_head"))
    if not s.tie_word_embeddings:
        # transformers 5 ties decoder.bias to lm_head.bias only together with the word embeddings
        # (_tied_weights_keys), so an untied head carries both vectors; 4.x always shared them.
        ts.append(Tensor("lm_head.decoder.weight", (s.vocab_size, h), "decoder", None, "lm_head"))
        ts.append(Tensor("lm_head.decoder.bias", (s.vocab_size,), "decoder", None, "lm_head"))
    return ts


_TENSORS = {"opt": _opt, "llama": _llama, "mistral": _llama, "qwen2": _llama, "gpt2": _gpt2, "roberta": _roberta}


# ---- from a config dict ---------------------------------------------------------------------


def _need(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise MemplanError(f"{where} lacks {key!r}, which a {cfg.get('model_type')} config needs")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemplanError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def spec_from_config(cfg: dict, name: str, *, source: str = "", where: str = "config") -> ModelSpec:
    """Build a spec from a transformers config dict; errors name the missing or bad field."""
    if not isinstance(cfg, dict):
        raise MemplanError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    configs.check_config(cfg, where)
    cfg = configs.without_nulls(cfg)
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise MemplanError(
            f"{where}: model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    if mt == "gpt2":
        h = _need(cfg, "n_embd", where)
        heads = _need(cfg, "n_head", where)
        common = dict(
            vocab_size=_need(cfg, "vocab_size", where), hidden_size=h, num_layers=_need(cfg, "n_layer", where),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=cfg.get("n_inner") or 4 * h, max_positions=_need(cfg, "n_positions", where),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True), gated_mlp=False,
            activation=cfg.get("activation_function", "gelu_new"), attention_bias=True, out_bias=True,
            mlp_bias=True, norm="layernorm", pre_norm=True, word_embed_proj_dim=h,
            hidden_dropout=cfg.get("resid_pdrop", 0.1), attention_dropout=cfg.get("attn_pdrop", 0.1),
        )
    else:
        h = _need(cfg, "hidden_size", where)
        heads = _need(cfg, "num_attention_heads", where)
        common = dict(
            vocab_size=_need(cfg, "vocab_size", where), hidden_size=h,
            num_layers=_need(cfg, "num_hidden_layers", where), num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or h // heads,
            max_positions=_need(cfg, "max_position_embeddings", where), word_embed_proj_dim=h,
        )
        if mt == "opt":
            common.update(
                intermediate_size=_need(cfg, "ffn_dim", where),
                tie_word_embeddings=cfg.get("tie_word_embeddings", True), gated_mlp=False,
                activation=cfg.get("activation_function", "relu"),
                attention_bias=cfg.get("enable_bias", True), out_bias=cfg.get("enable_bias", True),
                mlp_bias=cfg.get("enable_bias", True), norm="layernorm",
                pre_norm=cfg.get("do_layer_norm_before", True),
                word_embed_proj_dim=cfg.get("word_embed_proj_dim") or h,
                hidden_dropout=cfg.get("dropout", 0.1), attention_dropout=cfg.get("attention_dropout", 0.0),
            )
        elif mt == "roberta":
            common.update(
                intermediate_size=_need(cfg, "intermediate_size", where),
                tie_word_embeddings=cfg.get("tie_word_embeddings", True), gated_mlp=False,
                activation=cfg.get("hidden_act", "gelu"), attention_bias=True, out_bias=True, mlp_bias=True,
                norm="layernorm", pre_norm=False, type_vocab_size=cfg.get("type_vocab_size", 2),
                hidden_dropout=cfg.get("hidden_dropout_prob", 0.1),
                attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
            )
        else:  # llama, mistral, qwen2
            bias = cfg.get("attention_bias", False) if mt == "llama" else mt == "qwen2"
            common.update(
                intermediate_size=_need(cfg, "intermediate_size", where),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False), gated_mlp=True,
                activation=cfg.get("hidden_act", "silu"), attention_bias=bias,
                out_bias=cfg.get("attention_bias", False) if mt == "llama" else False,
                mlp_bias=cfg.get("mlp_bias", False) if mt == "llama" else False, norm="rmsnorm", pre_norm=True,
                attention_dropout=cfg.get("attention_dropout", 0.0), hidden_dropout=0.0,
            )
    if common["num_heads"] % common["num_kv_heads"]:
        raise MemplanError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
    return ModelSpec(name=name, model_type=mt, source=source, config=dict(cfg), **common)


# ---- resolving what the user typed -----------------------------------------------------------


@lru_cache(maxsize=1)
def _catalog() -> list[dict]:
    return json.loads(CATALOG_PATH.read_text())["models"]


def catalog_entries() -> list[dict]:
    """The shipped catalog: id, aliases, source and config fields of each model."""
    return list(_catalog())


def catalog_names() -> list[str]:
    names = []
    for e in _catalog():
        names.append(e["id"])
        names.extend(e.get("aliases", []))
    return names


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    return dirs


def _from_hf_cache(model_id: str) -> Path | None:
    if model_id.count("/") > 1:
        return None
    folder = "models--" + model_id.replace("/", "--")
    for root in _hf_cache_dirs():
        snaps = root / folder / "snapshots"
        if snaps.is_dir():
            found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
    return None


def _read_config(path: Path) -> dict:
    return configs.read_config(path)


_RESOLVED: dict[str, ModelSpec] = {}


def resolve(model: str) -> ModelSpec:
    """A catalog id or alias (any case), a config.json or a folder with one, or a hub id in the local cache."""
    if model in _RESOLVED:
        return _RESOLVED[model]
    key = model.strip().lower()
    for e in _catalog():
        if key == e["id"].lower() or key in (a.lower() for a in e.get("aliases", [])):
            spec = spec_from_config(e["config"], e["id"], source=e.get("source", ""), where=e["id"])
            _RESOLVED[model] = spec
            return spec
    path = configs.config_path(model)  # None: no such local path
    if path is not None:
        cfg = _read_config(path)
        return spec_from_config(cfg, str(model), source=str(path), where=str(path))
    if Path(model).suffix == ".json" or os.sep in model and not model.count("/") == 1:
        raise MemplanError(f"{model}: no such file")
    cached = _from_hf_cache(model)
    if cached is not None:
        return spec_from_config(_read_config(cached), model, source=str(cached), where=f"{model} (local cache)")
    raise unknown("model", model, catalog_names(), listing="memplan models")
