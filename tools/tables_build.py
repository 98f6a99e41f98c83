"""Generate memplan/data/tensors.json: every parameter and buffer of each model_type, as formulas of config fields.

Each model_type is built once per structural variant under FakeTensorMode, with its integer config
fields as symbolic integers (torch's ShapeEnv). Every tensor's shape then comes out as an expression
of config fields, and every branch the build took on a size becomes a guard. The table keeps:

- `fields`: the class defaults of every field the tables read, and `aliases` (the class's attribute_map);
- `rules`: optional fields the config class derives when they are null (head_dim = hidden // heads...);
- `switches`: bool and optional fields whose value changes the tensor list; one variant is built per
  combination of their values, so configs that flip several at once are covered;
- per variant: tensors outside the layers, and per layer kind the tensors of one layer, with the
  guards that must hold; `layer_rule` says which kind layer i is (deepseek's first dense layers,
  qwen-moe's mlp_only_layers), and the build checks it against the layers it built.

Run with torch and transformers installed:  python tools/tables_build.py [model_type ...]
The result is checked tensor for tensor against meta-device builds by tests/test_tables.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
import time
from pathlib import Path

import sympy
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

OUT = Path(__file__).resolve().parent.parent / "memplan" / "data" / "tensors"  # one <model_type>.json each

# model_type -> how to build it. `kinds`: concrete values of the fields a layer rule reads, chosen so
# that every kind of layer appears among the BUILD_LAYERS layers built.
BUILD_LAYERS = 2
TYPES: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "olmo": {}, "olmo2": {}, "granite": {},
    "gemma": {}, "gemma2": {},
    # one rotary buffer pair per layer type present: build enough layers for the 5:1 sliding/full pattern
    "gemma3_text": {"build_layers": 6}, "phi": {}, "phi3": {}, "starcoder2": {},
    "cohere": {}, "gpt2": {}, "gptj": {}, "gpt_neox": {}, "falcon": {}, "bloom": {}, "opt": {},
    "bert": {"masked": True}, "roberta": {"masked": True},
    "mixtral": {}, "qwen2_moe": {
        "layer_rule": "'moe' if i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0 "
                      "else 'dense'",
        "kinds": {"mlp_only_layers": [0], "decoder_sparse_step": 1}},
    "qwen3_moe": {
        "layer_rule": "'moe' if i not in mlp_only_layers and num_local_experts > 0 and (i + 1) % decoder_sparse_step == 0 "
                      "else 'dense'",
        "kinds": {"mlp_only_layers": [0], "decoder_sparse_step": 1}},
    "deepseek_v2": {"layer_rule": "'moe' if i >= first_k_dense_replace else 'dense'",
                    "kinds": {"first_k_dense_replace": 1}},
    "deepseek_v3": {"layer_rule": "'moe' if i >= first_k_dense_replace else 'dense'",
                    "kinds": {"first_k_dense_replace": 1}},
}
# Integer fields that never size a tensor, or that the layer rule reads: kept concrete.
CONCRETE = {"num_hidden_layers", "n_layer", "num_layers", "n_layers", "chunk_size_feed_forward", "pretraining_tp",
            "first_k_dense_replace", "decoder_sparse_step", "num_nextn_predict_layers", "num_experts_per_tok",
            "n_group", "topk_group", "sliding_window", "max_window_layers", "_sliding_window_pattern",
            "sliding_window_pattern", "query_pre_attn_scalar", "classifier_dropout", "summary_activation",
            "num_ln_in_parallel_attn", "moe_layer_freq", "norm_topk_prob", "router_aux_loss_coef"}
# Optional integer fields a config may leave null: head_dim given or not is a structural variant.
OPTIONAL_INTS = ("head_dim", "q_lora_rank", "n_inner", "ffn_hidden_size", "num_key_value_heads",
                 "word_embed_proj_dim")
SKIP_BOOLS = {"return_dict", "output_hidden_states", "torchscript", "use_cache", "is_encoder_decoder",
              "is_decoder", "add_cross_attention", "tie_encoder_decoder", "output_attentions",
              "use_return_dict", "_output_attentions", "use_bfloat16", "tf_legacy_loss", "use_sliding_window",
              "apply_residual_connection_post_layernorm", "do_layer_norm_before", "scale_attn_weights",
              "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "use_parallel_residual",
              "norm_topk_prob", "output_router_logits", "use_qk_norm_bool", "pad_vocab_size_multiple"}


def _patch() -> None:
    """What transformers 5 needs to build on symbolic sizes (each measured to specialise or crash)."""
    import huggingface_hub.dataclasses as hd

    orig = hd._validate_simple_type

    def validate(name, value, expected):
        if isinstance(value, torch.SymInt) and expected in (int, float):
            return None
        return orig(name, value, expected)

    hd._validate_simple_type = validate
    # nn.LayerNorm(SymInt): a SymInt is no numbers.Integral
    for cls in (torch.nn.LayerNorm, torch.nn.RMSNorm):
        init = cls.__init__

        def patched(self, normalized_shape, *a, _init=init, **k):
            if isinstance(normalized_shape, torch.SymInt):
                normalized_shape = (normalized_shape,)
            _init(self, normalized_shape, *a, **k)

        cls.__init__ = patched
    # Tied bias padding pins vocab_size; weight init pins hidden_size (sqrt(fan_in)); neither sizes a tensor.
    transformers.PreTrainedModel._adjust_bias = lambda self, out, inp: None
    transformers.PreTrainedModel._initialize_weights = lambda self, module, is_custom_code=False: None
    transformers.PreTrainedModel.initialize_weights = lambda self: None
    # Modules initialise themselves in __init__ too (kaiming_uniform_ reads sqrt(fan_in)).
    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
    for cls in (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.Conv1d):
        if hasattr(cls, "reset_parameters"):
            cls.reset_parameters = lambda self: None


def _sym_int(x=0, *a):
    """int() that keeps a symbolic size symbolic (transformers writes int(hidden / heads))."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)) and not a:
        return torch.sym_int(x)
    return int(x, *a)


class _SymMath:
    """math, with sqrt that keeps a symbolic size symbolic (1 / math.sqrt(head_dim) pins head_dim)."""

    def __getattr__(self, name):
        import math
        return getattr(math, name)

    @staticmethod
    def sqrt(x):
        if isinstance(x, (torch.SymInt, torch.SymFloat)):
            return torch._sym_sqrt(x)
        import math
        return math.sqrt(x)


def _unpin(model_class) -> None:
    """Let the modelling code of `model_class` (and the rotary functions) compute on symbolic sizes."""
    import transformers.modeling_rope_utils as rope

    for mod in (sys.modules[model_class.__module__], rope):
        mod.int = _sym_int
        if hasattr(mod, "math"):
            mod.math = _SymMath()


def partial_rotary(cfg) -> float | None:
    """The class default of the rotary fraction (a float: it enters shapes as a literal)."""
    rp = getattr(cfg, "rope_parameters", None) or {}
    v = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) if isinstance(rp, dict) \
        else getattr(cfg, "partial_rotary_factor", None)
    # 1.0 too: rotary functions multiply by the fraction they default to 1.0 (Phi-4-mini sets 0.75)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else 1.0


class Build:
    """One symbolic build of `model_type` with `over` fields set (None, bools, concrete values)."""

    def __init__(self, model_type: str, spec: dict, over: dict):
        self.model_type, self.spec = model_type, spec
        defaults = transformers.AutoConfig.for_model(model_type)
        self.cls = type(defaults)
        self.layers_key = self.cls.attribute_map.get("num_hidden_layers", "num_hidden_layers")
        env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
        fixed = {self.layers_key: spec.get("build_layers", BUILD_LAYERS), **spec.get("kinds", {})}
        syms = {}
        for k, v in defaults.to_dict().items():
            if k in over or k in fixed or k in CONCRETE or k.endswith("_token_id") or k.endswith("token_ids"):
                continue
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                syms[k] = v
        for k, v in over.items():
            if isinstance(v, int) and not isinstance(v, bool) and k not in CONCRETE:
                syms[k] = v
        self.sym = {k: env.create_symintnode(env.create_symbol(v, source=ConstantSource(k)), hint=v,
                                             source=ConstantSource(k)) for k, v in syms.items()}
        self.names = {s.node.expr: sympy.Symbol(k) for k, s in self.sym.items()}
        p = partial_rotary(defaults)
        if p is not None:
            self.names[sympy.Float(p)] = sympy.Symbol("partial_rotary_factor")
        # null for a field the class lacks means: leave it out
        plain = {k: v for k, v in over.items() if k not in self.sym and (v is not None or hasattr(defaults, k))}
        cfg = transformers.AutoConfig.for_model(model_type, **fixed, **plain, **self.sym)
        self.cfg = cfg
        n_cfg = len(env.guards)
        auto = transformers.AutoModelForMaskedLM if spec.get("masked") else transformers.AutoModelForCausalLM
        _unpin(auto._model_mapping[type(cfg)])
        with FakeTensorMode(shape_env=env, allow_non_fake_inputs=True):
            model = auto.from_config(cfg)
        self.guards = sorted({self.expr(g.expr) for g in env.guards[n_cfg:]})
        self.model = model

    def expr(self, e) -> str:
        if isinstance(e, torch.SymInt):
            e = e.node.expr
        if isinstance(e, int):
            return str(e)
        return str(sympy.sympify(e).xreplace(self.names))

    def rule_values(self) -> dict:
        """Fields the config class filled in from others (the default rules), as expressions."""
        out = {}
        for k in OPTIONAL_INTS:
            v = getattr(self.cfg, k, None)
            if isinstance(v, torch.SymInt) and k not in self.sym:
                out[k] = self.expr(v)
        return out

    def tensors(self) -> tuple[dict, dict]:
        """({name: entry} outside the layers, {layer index: {suffix: entry}})."""
        outside, layers = {}, {}
        transposed = {name for name, m in self.model.named_modules() if type(m).__name__ == "Conv1D"}
        out_emb = self.model.get_output_embeddings()
        linear = {name for name, m in self.model.named_modules()
                  if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not out_emb}
        items = [(n, p, "p") for n, p in self.model.named_parameters()]
        items += [(n, b, "b") for n, b in self.model.named_buffers()]
        for name, t, kind in items:
            shape = [self.expr(d) for d in t.shape]
            entry = {"shape": shape}
            if kind == "b":
                entry["buffer"] = True
                entry["itemsize"] = t.dtype.itemsize
            module = name.rsplit(".", 1)[0]
            if module in transposed and name.endswith(".weight"):
                entry["transposed"] = True
            if module in linear and kind == "p":
                entry["linear"] = True
            m = re.match(r"^(.*?\.)(\d+)\.(.*)$", name)
            if m:
                entry["prefix"] = m.group(1)
                layers.setdefault(int(m.group(2)), {})[m.group(3)] = entry
            else:
                outside[name] = entry
        return outside, layers


def default_rules(model_type: str) -> dict[str, str]:
    """Optional int fields the config class fills in when they are null, as expressions of the others."""
    d = transformers.AutoConfig.for_model(model_type).to_dict()
    out = {}
    for k in OPTIONAL_INTS:
        if k not in d:
            continue
        env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
        syms = {f: env.create_symintnode(env.create_symbol(v, source=ConstantSource(f)), hint=v, source=ConstantSource(f))
                for f, v in d.items() if f != k and f not in CONCRETE and not f.endswith("_token_id")
                and isinstance(v, int) and not isinstance(v, bool) and v > 0}
        names = {s.node.expr: sympy.Symbol(f) for f, s in syms.items()}
        # absent (the class derives it, as DeepSeek-V3 does head_dim), else null (Llama's head_dim)
        for over in ({}, {k: None}):
            try:
                cfg = transformers.AutoConfig.for_model(model_type, **over, **syms)
            except Exception:  # noqa: BLE001 -- the class refuses a null: no rule
                continue
            v = getattr(cfg, k, None)
            if isinstance(v, torch.SymInt):
                out[k] = str(sympy.sympify(v.node.expr).xreplace(names))
                break
    return out


def layer_rule_kinds(spec: dict, cfg, n: int) -> list[str]:
    rule = spec.get("layer_rule")
    if not rule:
        return ["layer"] * n
    values = {k: getattr(cfg, k) for k in re.findall(r"[A-Za-z_]\w*", rule) if hasattr(cfg, k)}
    return [eval(rule, {}, {**values, "i": i}) for i in range(n)]


def variant(model_type: str, spec: dict, over: dict) -> dict:
    b = Build(model_type, spec, over)
    outside, layers = b.tensors()
    n = spec.get("build_layers", BUILD_LAYERS)
    kinds = layer_rule_kinds(spec, b.cfg, n)
    by_kind: dict[str, dict] = {}
    for i, kind in enumerate(kinds):
        got = layers.get(i, {})
        if kind in by_kind and by_kind[kind] != got:
            raise RuntimeError(f"{model_type}: layers of kind {kind} differ; the layer rule misses a case")
        by_kind[kind] = got
    if set(layers) - set(range(n)):
        raise RuntimeError(f"{model_type}: numbered modules outside the layer list: {sorted(layers)}")
    return {"outside": outside, "layers": by_kind, "guards": _needed(b.guards, outside, by_kind)}


def _needed(guards: list[str], outside: dict, layers: dict) -> list[str]:
    """Guards that can change a shape: an equality pinning a value that appears in no shape pinned
    nothing a table lists (sqrt(hidden) embed scales, softmax scales): dropped."""
    literals = set()
    for e in [*outside.values(), *(x for k in layers.values() for x in k.values())]:
        for d in e["shape"]:
            literals |= set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", d))
    out = []
    for g in guards:
        m = re.fullmatch(r"Eq\((.*), (-?[\d.]+)\)", g)
        if m and m.group(2) not in literals:
            continue
        out.append(g)
    return out


def _supports_sdpa(model_type: str, spec: dict, defaults) -> bool:
    """Whether transformers' model class has an SDPA attention (gemma2 and bloom in 5.24 have none)."""
    auto = transformers.AutoModelForMaskedLM if spec.get("masked") else transformers.AutoModelForCausalLM
    return bool(getattr(auto._model_mapping[type(defaults)], "_supports_sdpa", False))


def table(model_type: str) -> dict:
    spec = TYPES[model_type]
    defaults = transformers.AutoConfig.for_model(model_type)
    d = defaults.to_dict()
    base = variant(model_type, spec, {})
    rules = default_rules(model_type)
    # Structural switches: a bool flipped, or an optional int nulled / given, that changes the tensors.
    switches: dict[str, list] = {}
    # An optional int the class lacks may still be read (Qwen3-MoE: getattr(config, "head_dim", h // heads)).
    absent = {k: None for k in OPTIONAL_INTS if k not in d}
    for k, v in [*d.items(), *absent.items()]:
        if k in SKIP_BOOLS or k.startswith("_"):
            continue
        if isinstance(v, bool):
            candidates = [not v]
        elif k in OPTIONAL_INTS and k in rules:
            continue  # the config derives it when null: a default rule, no switch
        elif k in OPTIONAL_INTS and (v is None or isinstance(v, int)):
            candidates = [None] if v is not None else [_given(k, d)]
        else:
            continue
        for alt in candidates:
            try:
                other = variant(model_type, spec, {k: alt})
            except Exception as e:  # noqa: BLE001 -- a value transformers itself refuses is no variant
                print(f"  {model_type}: {k}={alt!r} does not build ({type(e).__name__}: {str(e)[:80]})")
                continue
            if _shapes(other) != _shapes(base):
                switches[k] = [v, alt]
    # One variant per combination of switch values (null ints marked as null, given ones as "set").
    variants = []
    keys = sorted(switches)
    for combo in itertools.product(*(switches[k] for k in keys)):
        over = dict(zip(keys, combo))
        try:
            var = base if not over or all(over[k] == d.get(k) for k in keys) else variant(model_type, spec, over)
        except Exception as e:  # noqa: BLE001
            print(f"  {model_type}: {over} does not build ({type(e).__name__})")
            continue
        variants.append({"when": {k: _state(over[k]) for k in keys}, **var})
    return {
        "class": type(defaults).__name__,
        "masked": bool(spec.get("masked")),
        "sdpa": _supports_sdpa(model_type, spec, defaults),
        "aliases": dict(type(defaults).attribute_map),
        "layers_key": type(defaults).attribute_map.get("num_hidden_layers", "num_hidden_layers"),
        "defaults": {k: v for k, v in d.items() if _jsonable(v) and not k.startswith("_") or k in ("_sliding_window_pattern",)},
        "rules": rules,
        "layer_rule": spec.get("layer_rule", "'layer'"),
        "switches": {k: [_state(x) for x in vs] for k, vs in switches.items()},
        "variants": variants,
    }


def _given(k: str, d: dict) -> int:
    """A value for an optional int field that is null by default (distinct from everything else)."""
    return {"head_dim": 96, "q_lora_rank": 384, "n_inner": 1000, "ffn_hidden_size": 1000,
            "num_key_value_heads": 4, "word_embed_proj_dim": 112}.get(k, 7)


def _state(v):
    """How a variant names a field's value: bools as they are, ints as "set", null as None."""
    if isinstance(v, bool) or v is None:
        return v
    return "set"


def _shapes(var: dict) -> tuple:
    return (json.dumps(var["outside"], sort_keys=True), json.dumps(var["layers"], sort_keys=True))


def _jsonable(v) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def main(argv: list[str]) -> None:
    _patch()
    wanted = argv or list(TYPES)
    OUT.mkdir(parents=True, exist_ok=True)
    for mt in wanted:
        t0 = time.perf_counter()
        t = table(mt)
        print(f"{mt}: {len(t['variants'])} variant(s), switches {list(t['switches'])}, "
              f"{time.perf_counter() - t0:.1f} s")
        doc = {"about": f"generated by tools/tables_build.py from transformers {transformers.__version__} "
                        f"(torch {torch.__version__.split('+')[0]}); do not edit by hand",
               "transformers": transformers.__version__, **t}
        (OUT / f"{mt}.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
