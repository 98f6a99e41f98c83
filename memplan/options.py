"""What a user can ask for: methods, schemes, precisions, attention kernels, and the full request."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from memplan.errors import MemplanError, unknown


class _Choice(str, Enum):
    """A `str` enum whose members carry a one-line doc; parses the CLI's spelling."""

    def __new__(cls, value: str, doc: str = ""):
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: str | _Choice) -> _Choice:
        if isinstance(text, cls):
            return text
        key = str(text).strip().lower().replace("_", "-")
        for member in cls:
            if member.value == key:
                return member
        raise unknown(cls._kind(), str(text), [m.value for m in cls])

    @classmethod
    def _kind(cls) -> str:
        return cls.__name__.lower()


class Method(_Choice):
    FO_SGD = "fo-sgd", "first-order SGD: 1 forward + 1 backward; keeps gradients"
    FO_ADAM = "fo-adam", "first-order Adam: keeps gradients, exp_avg and exp_avg_sq"
    FORWARD_GRAD = "forward-grad", "forward gradient: one dual (forward-mode AD) pass with a random tangent"
    ZO_SGD = "zo-sgd", "MeZO ZO-SGD: two perturbed forwards, z regenerated from a seed"
    ZO_SGD_MMT = "zo-sgd-mmt", "ZO-SGD with momentum: keeps one momentum buffer"
    ZO_SGD_CONS = "zo-sgd-cons", "conservative ZO-SGD: five forwards, keeps the best of three candidates"
    ZO_SGD_SIGN = "zo-sgd-sign", "ZO-SignSGD: sign of the projected gradient"
    ZO_ADAM = "zo-adam", "ZO-Adam: keeps exp_avg and exp_avg_sq"
    HIZOO = "hizoo", "HiZOO: keeps a diagonal Hessian estimate; perturbs by z / sqrt(Hessian)"
    MEZO_SVRG = "mezo-svrg", "MeZO-SVRG: keeps anchor weights and a full-batch estimate; an anchor pass every few steps"
    SPARSE_MEZO = "sparse-mezo", "Sparse MeZO: perturbs only the smallest-magnitude entries; keeps one threshold per tensor"
    LOZO = "lozo", "LOZO: low-rank perturbation U V^T per weight matrix; keeps V (n x rank) per matrix"
    LOZO_M = "lozo-m", "LOZO-M: LOZO with low-rank momentum; keeps V, the previous V and U-sized momentum"
    SUBZERO = "subzero", "SubZero: perturbation in a random subspace per layer; keeps U and V (rank wide) per matrix"

    @property
    def family(self) -> str:
        """fo | zo | fg, from the method's registered spec (memplan.methods)."""
        from memplan.methods import get

        return get(self).family.value

    @property
    def is_zo(self) -> bool:
        return self.family == "zo"

    @property
    def is_fo(self) -> bool:
        return self.family == "fo"


class Scheme(_Choice):
    FT = "ft", "full fine-tuning: every weight trains"
    LORA = "lora", "LoRA adapters (rank r) on the target projections"
    PREFIX = "prefix", "trainable key/value prefixes in every layer"
    PROMPT = "prompt", "trainable virtual input embeddings"


class Dtype(_Choice):
    FP32 = "fp32", "weights, gradients, state and compute in fp32"
    FP16 = "fp16", "weights, gradients, state and compute in fp16"
    BF16 = "bf16", "weights, gradients, state and compute in bf16"
    AMP_FP16 = "amp-fp16", "fp32 weights/gradients/state; fp16 autocast compute"
    AMP_BF16 = "amp-bf16", "fp32 weights/gradients/state; bf16 autocast compute"

    @property
    def is_amp(self) -> bool:
        return self.value.startswith("amp-")

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of weights, gradients and optimizer state."""
        return 4 if self in (Dtype.FP32, Dtype.AMP_FP16, Dtype.AMP_BF16) else 2

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of activations."""
        return 4 if self is Dtype.FP32 else 2

    @property
    def torch_name(self) -> str:
        """Name of the torch dtype of the weights (`float32`...)."""
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(self.value, "float32")

    @property
    def compute_torch_name(self) -> str:
        """Name of the torch dtype of the compute (autocast target for amp)."""
        return {"amp-fp16": "float16", "amp-bf16": "bfloat16"}.get(self.value, self.torch_name)


class Attention(_Choice):
    EAGER = "eager", "materialises batch x heads x seq^2 scores and probabilities"
    SDPA = "sdpa", "fused flash / memory-efficient kernel: no seq^2 tensors"


class Perturbation(_Choice):
    MEZO = "mezo", "MeZO reference: param.data = param.data + scale * z * eps (out of place, ~3 temporaries)"
    INPLACE = "inplace", "param.data.add_(z, alpha=scale * eps): one temporary z"


class Loss(_Choice):
    FULL = "full", "the model's own loss: the whole batch's logits and their fp32 upcast at once"
    CHUNKED = "chunked", ("the lm_head, fp32 upcast and cross-entropy run per chunk of the sequence "
                          "(torchtune's CEWithChunkedOutputLoss)")


class Sharding(_Choice):
    AUTO = "auto", "none on one GPU, ddp on more"
    NONE = "none", "one GPU, nothing shared"
    DDP = "ddp", "DistributedDataParallel: everything replicated, gradients all-reduced in buckets"
    ZERO1 = "zero1", "DeepSpeed ZeRO-1: optimizer state partitioned over the ranks"
    ZERO2 = "zero2", "DeepSpeed ZeRO-2: optimizer state and gradients partitioned"
    ZERO3 = "zero3", "DeepSpeed ZeRO-3: optimizer state, gradients and parameters partitioned"
    FSDP = "fsdp", "PyTorch FSDP2 fully_shard: parameters gathered per block, gradients reduce-scattered"

    def resolved(self, num_gpus: int) -> "Sharding":
        """`auto` as it runs: none on one GPU, ddp on more."""
        if self is Sharding.AUTO:
            return Sharding.NONE if num_gpus == 1 else Sharding.DDP
        return self


class Offload(_Choice):
    NONE = "none", "everything on the GPU"
    OPTIMIZER = "optimizer", "optimizer state and its step on the host (ZeRO-Offload, FSDP CPU offload)"
    PARAMS = "params", "optimizer state and parameters on the host, streamed in per block (ZeRO-3 / FSDP offload, ZO2)"


class HfVersion(_Choice):
    CURRENT = "current", "the transformers release memplan's steps run on (5.x)"
    V4_28 = "4.28", "transformers 4.28, as pinned by MeZO and ZO-Bench (OPT eager: fp32 mask promotion, KV cache kept)"

    @classmethod
    def _kind(cls) -> str:
        return "transformers version"


class Config(BaseModel):
    """One fine-tuning configuration to estimate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Catalog id, alias, or path to a config.json / folder holding one.")
    method: Method = Field(Method.ZO_SGD, description="Optimization method.")
    scheme: Scheme = Field(Scheme.FT, description="Which weights train.")
    dtype: Dtype = Field(Dtype.FP16, description="Precision of weights, state and compute.")
    batch: int = Field(1, ge=1, description="Sequences per step.")
    seq: int = Field(512, ge=1, description="Tokens per sequence.")
    attention: Attention = Field(Attention.SDPA, description="Attention kernel.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r); does not change memory.")
    lora_targets: tuple[str, ...] = Field((), description="Module names LoRA wraps; empty: peft's default for "
                                          "the architecture (q_proj, v_proj for OPT and Llama; c_attn for GPT-2).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability on each LoRA adapter's "
                                "input (peft's lora_dropout); > 0 saves a mask and a dropped-out copy of the input "
                                "per targeted module for backward.")
    prefix_tokens: int = Field(5, ge=1, description="Prefix-tuning tokens per layer.")
    prompt_tokens: int = Field(10, ge=1, description="Prompt-tuning virtual tokens.")
    grad_checkpointing: bool = Field(False, description="Recompute each layer in backward (first-order only).")
    perturbation: Perturbation = Field(Perturbation.MEZO, description="How ZO perturbs weights.")
    zo_queries: int = Field(1, ge=1, description="ZO queries q per step (q > 1 keeps a gradient accumulator).")
    zo_sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="sparse-mezo: fraction of each tensor's entries "
                               "left unperturbed (the largest by magnitude); does not change memory.")
    zo_rank: int = Field(2, ge=1, description="Rank of the low-rank ZO perturbation (lozo, lozo-m, subzero); "
                         "LOZO's default is 2, SubZero's 8.")
    lozo_interval: int = Field(50, ge=1, description="lozo / lozo-m: steps between redraws of the kept V factor "
                               "(LOZO's step_interval).")
    subzero_interval: int = Field(2000, ge=1, description="subzero: steps between redraws of the kept projection "
                                  "matrices (SubZero's update_interval).")
    svrg_interval: int = Field(2, ge=1, description="mezo-svrg: steps between anchor passes (the reference code's q); "
                               "every step is an anchor pass at 1.")
    svrg_anchor_batches: int = Field(1, ge=1, description="mezo-svrg: batches of --batch sequences whose mean loss "
                                     "the anchor pass's full-batch estimate takes (two forwards each).")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="fo-sgd momentum (> 0 keeps a momentum buffer).")
    foreach: bool = Field(True, description="Multi-tensor (foreach) optimizer step, torch's default on CUDA.")
    hf_version: HfVersion = Field(HfVersion.CURRENT, description="transformers behaviour to model.")
    use_cache: bool = Field(False, description="Keep the KV cache during forward passes (transformers' default when not set).")
    loss: Loss = Field(Loss.FULL, description="How the loss is computed from the hidden states: full logits, or "
                       "chunked (causal LMs).")
    loss_chunks: int = Field(8, ge=1, description="--loss chunked: chunks the sequence is split into "
                             "(torchtune's default is 8).")

    num_gpus: int = Field(1, ge=1, le=4096, description="Data-parallel ranks (GPUs) the step runs on; "
                          "estimates are per GPU.")
    nodes: int = Field(1, ge=1, le=1024, description="Machines the GPUs are spread over (inter-node defaults).")
    sharding: Sharding = Field(Sharding.AUTO, description="How the ranks share model state.")
    offload: Offload = Field(Offload.NONE, description="What lives in host memory instead of on the GPU.")
    host_memory: float = Field(0.0, ge=0.0, description="Host memory of each machine in GiB; with --offload the "
                               "verdict fails when the step needs more (0: not judged).")

    @property
    def host_memory_bytes(self) -> int:
        """`host_memory` in bytes (GiB = 2^30)."""
        return int(self.host_memory * (1 << 30))

    def replace(self, **update) -> "Config":
        """A validated copy with some fields changed (model_copy would skip validation)."""
        return Config.model_validate({**self.model_dump(), **update})

    @classmethod
    def make(cls, *, spell=None, **fields) -> "Config":
        """A validated Config; bad input raises MemplanError, one line naming the field (as `spell(name)`
        spells it: `--batch` for the command line) and what is valid."""
        from pydantic import ValidationError

        try:
            return cls(**fields)
        except ValidationError as e:
            raise config_error(e, spell or (lambda name: name)) from None
        except TypeError as e:  # a field given twice, say
            raise MemplanError(str(e)) from None

    @field_validator("method", "scheme", "dtype", "attention", "perturbation", "hf_version", "loss", "sharding",
                     "offload", mode="before")
    @classmethod
    def _parse_choice(cls, value, info):
        return cls.model_fields[info.field_name].annotation.parse(value)

    @field_validator("batch", "seq", "lora_rank", "lora_alpha", "prefix_tokens", "prompt_tokens", "zo_queries",
                     "svrg_interval", "svrg_anchor_batches", "zo_rank", "lozo_interval", "subzero_interval",
                     "loss_chunks", "num_gpus", "nodes", mode="before")
    @classmethod
    def _no_bool_sizes(cls, value):
        if isinstance(value, bool):  # bool is an int subclass: batch=True would be batch 1
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value


def config_error(e, spell) -> MemplanError:
    """The first error of a Config ValidationError as one line: the field, what is wrong, what is valid."""
    err = e.errors(include_url=False)[0]
    loc = err["loc"]
    name = str(loc[0]) if loc else "config"
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return unknown("option", spell(name), [spell(f) for f in Config.model_fields])
    if kind == "missing":
        return MemplanError(f"{spell(name)} is required")
    if kind == "greater_than_equal" and ctx.get("ge") == 1:
        return MemplanError(f"{spell(name)} must be a positive integer, got {got!r}")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return MemplanError(f"{spell(name)} must be {bounds[kind]} {next(iter(ctx.values()))}, got {got!r}")
    if kind == "value_error":
        return MemplanError(f"{spell(name)} {ctx.get('error', err['msg'])}")
    text = repr(got)
    text = text if len(text) <= 60 else text[:57] + "..."
    info = Config.model_fields.get(name)
    kinds = {int: "a positive integer", float: "a number", bool: "true or false", str: "a string",
             tuple[str, ...]: "a list of module names, e.g. ['q_proj', 'v_proj']"}
    if info is not None and info.annotation in kinds:
        return MemplanError(f"{spell(name)} must be {kinds[info.annotation]}, got {text}")
    return MemplanError(f"{spell(name)}: {err['msg'][0].lower()}{err['msg'][1:]}, got {text}")


def parse_methods(items, *, where: str = "--method") -> list[Method]:
    """Method names as the command line and plan files take them: each item one name, several
    comma-separated, or `all`; repeats kept once, in order. None: the default (zo-sgd)."""
    if items is None:
        return [Method.ZO_SGD]
    out: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise MemplanError(f"a method name, a list of them, or `all`, got {item!r}")
        for name in filter(None, (n.strip() for n in item.split(","))):
            out.extend(Method) if name.lower() == "all" else out.append(Method.parse(name))
    if not out:
        raise MemplanError(f"{where} names no method; give one or more of "
                           f"{', '.join(m.value for m in Method)}, or 'all'")
    return list(dict.fromkeys(out))
