"""Quantised base weights (`--quant`): bitsandbytes layouts, as transformers and peft load and prepare them.

A model loaded with `BitsAndBytesConfig` has every linear layer but the output embedding replaced by
a bitsandbytes module (transformers' `replace_with_bnb_linear`, skipping `get_keys_to_not_convert`:
the lm_head, tied weights and the last parameter); embeddings, norms, the lm_head and the layers'
biases stay ordinary parameters. Per quantised weight of n = out x in elements:

- 4-bit (nf4, fp4; `Params4bit`): the packed weight, (n + 1) // 2 bytes of uint8 stored as a
  (n / 2, 1) tensor; its `QuantState`: absmax, one fp32 per block of 64 weights, and the 16-entry
  fp32 code. With double quantisation (nf4-dq, `bnb_4bit_use_double_quant`) absmax is uint8 (minus
  its mean, kept as a 0-d fp32 offset), with one fp32 constant per 256 of them (`state2.absmax`)
  and its own copy of the 256-entry fp32 dynamic code (`quantize_blockwise` copies it per tensor).
- int8 (LLM.int8(), `Int8Params`): the int8 weight (n bytes) and its row statistics `SCB`, one fp32
  per output row.

peft's `prepare_model_for_kbit_training` then freezes everything and casts every fp16 / bf16
parameter that is not 4-bit (embeddings, norms, lm_head, biases) to fp32. So the residual stream,
norms and logits run in fp32 whatever --dtype says; the bitsandbytes layers cast their input to the
compute dtype (--dtype's) and their output back to fp32. Activations are those of an fp32 model with
frozen linear layers, plus these casts. With --grad-checkpointing peft also turns on gradient
checkpointing (memplan asks for the non-reentrant kind, so peft's `enable_input_require_grads` hook,
needed only for the reentrant one, is not installed).

Each quantised layer's matmul dequantises its weight: in backward, bitsandbytes' `MatMul4Bit` and
`MatMul8bitLt` build the whole weight (compute dtype; int8: its input's, fp32) for grad_input =
grad_output @ W; in forward, CUDA's `gemm_4bit` does the same (dequantise, then `F.linear`) on its
unfused path, inside the op, where the tracker adds it by rule (`gemm_4bit_scratch`). One layer's
copy at a time: it sets the peak only where the logits are small. int8 layers also save their input
for backward (`MatMul8bitLt` keeps A), as a trainable linear layer would.

Only adapters train on a quantised base (bitsandbytes weights have no gradient); ZO methods perturb
and update the adapters only, never the quantised weights.
"""

from __future__ import annotations

import contextlib

from memplan.options import Config, Dtype, Quant, Scheme
from memplan.overhead import round_block

BLOCK = 64  # bnb_4bit blocksize (transformers' BitsAndBytesConfig always quantises with 64)
NESTED_BLOCK = 256  # blocksize of the second level (quantize_blockwise of the absmax)
CODE_4BIT = 16  # fp32 entries of the nf4 / fp4 code, one per quantised weight
CODE_NESTED = 256  # fp32 entries of the dynamic 8-bit code of the second level, one copy per weight
# Embeddings that stay unquantised (modules transformers' replace_with_bnb_linear never sees as Linear).
QUANTISED_GROUPS = ("attention", "mlp")
QUANTISED_EXTRA = ("project_in", "project_out")  # OPT-350m's projections are nn.Linear


def refusal(cfg: Config, *, masked: bool = False) -> str | None:
    """Why `cfg` cannot run with a quantised base, or None."""
    if cfg.quant is Quant.NONE:
        return None
    if cfg.scheme is Scheme.FT:
        return (f"--quant {cfg.quant.value}: bitsandbytes weights are not trainable; use --scheme lora, prefix "
                "or prompt (only adapters train on a quantised base)")
    if cfg.dtype.is_amp:
        return (f"--quant with --dtype {cfg.dtype.value} is not modelled yet; use --dtype fp16, bf16 or fp32 "
                "(the compute dtype of the quantised layers)")
    if masked:
        return "--quant supports causal LMs (llama, opt, gpt2 families); masked-LM heads are not modelled"
    return None


def compute_dtype(cfg: Config) -> Dtype:
    """bnb_4bit_compute_dtype (and the dtype weights are quantised from): --dtype's."""
    return cfg.dtype


def is_quantised(t) -> bool:
    """A `memplan.arch` Tensor that bitsandbytes replaces: the weight of a layer's linear module."""
    return len(t.shape) == 2 and t.name.endswith(".weight") and \
        (t.group in QUANTISED_GROUPS or t.module in QUANTISED_EXTRA)


def tensor_bytes(quant: Quant, t) -> int:
    """Bytes of one quantised weight and its quantisation state, each tensor rounded to 512 B."""
    n = t.numel
    if quant is Quant.INT8:
        return round_block(n) + round_block(t.fan_out * 4)  # int8 weight + SCB (fp32 per row)
    blocks = -(-n // BLOCK)
    packed = round_block((n + 1) // 2)
    code = round_block(CODE_4BIT * 4)
    if quant is Quant.NF4_DQ:
        nested = -(-blocks // NESTED_BLOCK)
        # uint8 absmax, fp32 offset (0-d), fp32 state2.absmax and state2.code
        return packed + code + round_block(blocks) + round_block(4) + round_block(nested * 4) \
            + round_block(CODE_NESTED * 4)
    return packed + code + round_block(blocks * 4)


# Linear modules of one layer that read the same input tensor.
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def layer_input_width(spec) -> int:
    """Elements per token of the distinct inputs of every layer's quantised linear modules (q, k and v
    read one tensor, gate and up another), summed over the layers."""
    widths: dict[tuple, int] = {}
    for t in spec.tensors:
        if is_quantised(t) and t.layer is not None:
            widths[(t.layer, t.group, SHARED_INPUT.get(t.module, t.module))] = t.fan_in
    return sum(widths.values())


def dequantised_bytes(cfg: Config, t, *, backward: bool) -> int:
    """One quantised weight dequantised for a matmul.

    4-bit: the weight in the compute dtype; nf4-dq first dequantises its absmax to fp32: in backward
    (`F.dequantize_4bit`) the offset is added in place, in CUDA's forward (`gemm_4bit`'s unfused
    path) into a second buffer. int8: `CB * SCB` in its input's dtype (fp32 after
    prepare_model_for_kbit_training): in backward on every device; in forward on the CPU
    (`MatMul8bitFp`, which the trace runs), while CUDA's `MatMul8bitLt` multiplies in int8 and holds
    its input in fp16 and int8 instead (smaller at training sizes): memplan counts the weight, an
    upper bound for CUDA.
    """
    n = t.numel
    if cfg.quant is Quant.INT8:
        return round_block(n * 4)
    out = round_block(n * compute_dtype(cfg).compute_bytes)
    if cfg.quant is Quant.NF4_DQ:
        out += (1 if backward else 2) * round_block(-(-n // BLOCK) * 4)
    return out


GEMM_4BIT_FUSED_ROWS = 4  # bitsandbytes' CUDA gemm_4bit always runs its fused kernel up to 4 rows


def gemm_4bit_scratch(func, args, kwargs) -> int:
    """Bytes CUDA's `bitsandbytes::gemm_4bit` allocates inside the op on its unfused path: the
    dequantised weight in A's dtype (and, nested, the fp32 absmax twice). Past 1536 rows CUDA always
    takes that path; between 4 and 1536 it picks per GPU and shape, and memplan assumes the unfused
    one (the larger). 0 for other ops."""
    if func.name() != "bitsandbytes::gemm_4bit":
        return 0
    a, shape = args[0], args[2]
    rows = a.numel() // a.shape[-1]
    if rows <= GEMM_4BIT_FUSED_ROWS:
        return 0
    n = 1
    for d in shape:
        n *= d
    nbytes = round_block(n * a.element_size())
    nested = kwargs.get("absmax_8bit") if "absmax_8bit" in kwargs else (args[7] if len(args) > 7 else None)
    if nested is not None:
        nbytes += 2 * round_block(nested.numel() * 4)
    return nbytes


# ---- the real model (torch imported inside) ---------------------------------------------------


def bnb_config(cfg: Config):
    """transformers' BitsAndBytesConfig for `cfg.quant` (4-bit: blocksize 64, uint8 storage)."""
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quant is Quant.INT8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4" if cfg.quant is Quant.FP4 else "nf4",
        bnb_4bit_use_double_quant=cfg.quant is Quant.NF4_DQ,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype(cfg).torch_name),
    )


def quantise(model, cfg: Config, *, mode=None):
    """Replace `model`'s linear layers by bitsandbytes ones holding its weights quantised, as
    `from_pretrained(quantization_config=...)` does; then peft's `prepare_model_for_kbit_training`.

    Real tensors go through transformers' own path (`Params4bit(w).to(device)`, `Int8Params(w).to(device)`).
    A fake tensor cannot sit inside those Parameter subclasses, so fake weights are quantised by the
    same bitsandbytes functions (their fake kernels give the shapes and dtypes) and kept in a plain
    Parameter carrying the same attributes: the same tensors, byte for byte. `mode` is their
    FakeTensorMode, active while they are quantised.
    """
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert

    q = bnb_config(cfg)
    skip = sorted(set(get_keys_to_not_convert(model)) | set(model._keep_in_fp32_modules or ()))
    old = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D) or type(m) is torch.nn.Linear}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=q)
    fake = mode is not None
    with mode or contextlib.nullcontext():
        _load(model, old, fake=fake)
        setattr(model, "is_loaded_in_4bit" if cfg.quant.four_bit else "is_loaded_in_8bit", True)
        setattr(model, "quantization_method", q.quant_method)
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.grad_checkpointing and cfg.method.is_fo,
            gradient_checkpointing_kwargs={"use_reentrant": False})


def _load(model, old: dict, *, fake: bool) -> None:
    """Each bitsandbytes module gets its source module's weight, quantised, and its bias."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        src = old[name]
        w = src.weight.data
        w = w.T if isinstance(src, Conv1D) else w
        device = w.device
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = _fake_4bit(module, w) if fake else \
                bnb.nn.Params4bit(w, requires_grad=False, **module.weight.__dict__).to(device)
        else:
            kw = {k: v for k, v in module.weight.__dict__.items() if k != "SCB"}
            module.weight = _fake_8bit(w, kw) if fake else \
                bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, **kw).to(device)
        if src.bias is not None:
            module.bias = src.bias


def _fake_4bit(module, w):
    import torch
    from bitsandbytes import functional as F

    packed, state = F.quantize_4bit(w, blocksize=module.weight.blocksize,
                                    compress_statistics=module.weight.compress_statistics,
                                    quant_type=module.weight.quant_type, quant_storage=module.weight.quant_storage)
    p = torch.nn.Parameter(packed, requires_grad=False)
    p.quant_state, p.bnb_quantized, p.module = state, True, module
    for k in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(p, k, getattr(module.weight, k))
    module.quant_state = state
    return p


def _fake_8bit(w, kw):
    import torch
    from bitsandbytes import functional as F

    cb, scb, _ = F.int8_vectorwise_quant(w.contiguous().to(dtype=torch.float16))
    p = torch.nn.Parameter(cb, requires_grad=False)
    p.CB, p.SCB = cb, scb
    for k, v in kw.items():
        if k != "CB":
            setattr(p, k, v)
    return p


@contextlib.contextmanager
def shared_state(mode=None):
    """bitsandbytes caches the second-level code of nf4-dq in a module dict (`functional.name2qmap`)
    and copies it into each weight's state; a fake model (`mode`: its FakeTensorMode) gets a fake
    cache to copy from, and the real cache stays real."""
    from bitsandbytes import functional as F

    if mode is None:
        yield
        return
    saved = F.name2qmap.pop("dynamic", None)
    F.name2qmap["dynamic"] = mode.from_tensor(F.create_dynamic_map())
    try:
        yield
    finally:
        F.name2qmap.pop("dynamic", None)
        if saved is not None:
            F.name2qmap["dynamic"] = saved


def state_tensors(model) -> list:
    """Every tensor of the quantisation state that is not a parameter (absmax, codes, offsets, SCB)."""
    import torch

    out = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code, qs.offset]
            if qs.state2 is not None:
                out += [qs.state2.absmax, qs.state2.code]
        for holder in (w, getattr(module, "state", None)):
            scb = getattr(holder, "SCB", None)
            out.append(scb)
    return [t for t in out if isinstance(t, torch.Tensor)]
