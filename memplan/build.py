"""The model factory shared by the tracer and the calibration runner: config, model, PEFT wrapper, batch.

Architectures outside memplan's registry (memplan.arch) still build and trace, as long as
transformers and peft know them.
"""

from __future__ import annotations


from memplan import arch
from memplan.errors import MemplanError, one_line
from memplan.options import Config, Quant, Scheme


def model_config_dict(model: str) -> tuple[str, dict]:
    """(name, transformers config fields) of a catalog model, alias, config.json path or hub id.

    Architectures outside memplan's analytic catalog still trace, as long as transformers builds them;
    their config comes from the same places (`spec.resolve`), a hub id's from the cache it was fetched to.
    """
    from memplan import hub
    from memplan.spec import resolve

    try:
        spec = resolve(model)
        return spec.name, dict(spec.config)
    except hub.HubError:
        raise  # the hub gave no config: asking again cannot help
    except MemplanError:
        from memplan.configs import check_config, config_path, read_config

        path = config_path(model)
        if path is not None and path.suffix == ".json":
            cfg, note, where = hub.text_model(read_config(path), str(path))
            name = str(model) + note
        elif path is None and (found := hub.find(model)) is not None:
            cfg, name, where = found.config, found.name, found.where
        else:
            raise
        check_config(cfg, where)
        if not isinstance(cfg, dict) or not cfg.get("model_type"):
            raise MemplanError(f"{model}: config has no 'model_type'") from None
        return name, cfg


def hf_config(config: Config):
    """The transformers config object, or a MemplanError naming what transformers refused."""
    from transformers import AutoConfig

    _, fields = model_config_dict(config.model)
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    model_type = fields.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers raises ValueError, KeyError, TypeError...
        raise MemplanError(f"{config.model}: transformers cannot build a {model_type!r} config: "
                           f"{one_line(e)}") from None
    return cfg


# Encoders the trace tier runs without a registered family (memplan.arch) train as masked LMs too.
_UNREGISTERED_ENCODERS = ("bert", "xlm-roberta", "deberta", "deberta-v2", "electra")


def is_masked_lm(cfg) -> bool:
    """Encoders (roberta, bert) train as masked LMs; everything else as a causal LM."""
    family = arch.find(cfg.model_type)
    if family is not None:
        return family.objective == "masked"
    return cfg.model_type in _UNREGISTERED_ENCODERS


def lora_targets(config: Config, cfg) -> list[str] | str:
    """Config's LoRA targets; empty means the architecture's default (peft's own mapping, else memplan's);
    all-linear goes to peft as its own shorthand (every linear layer but the output head)."""
    if tuple(config.lora_targets) == ("all-linear",):
        return "all-linear"
    if config.lora_targets:
        return list(config.lora_targets)
    family = arch.find(cfg.model_type)
    if family is not None:
        return list(family.lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    if cfg.model_type in peft_map:
        return list(peft_map[cfg.model_type])
    raise MemplanError(f"no default LoRA targets for model_type {cfg.model_type!r}; name them in lora_targets")


def build_model(config: Config, device="cpu", *, materialise=None, mode=None):
    """The model with random weights on `device` ('meta' builds no storage), quantised as `config.quant`
    asks, PEFT-wrapped, in train mode.

    `materialise(model)`, when given, runs on the bare model before it is quantised: the tracer swaps
    meta weights for fake ones there, since quantising needs their values' shapes and dtypes; `mode`
    (its FakeTensorMode) is then active while the model is quantised.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    cfg = hf_config(config)
    auto = AutoModelForMaskedLM if is_masked_lm(cfg) else AutoModelForCausalLM
    dtype = getattr(torch, config.dtype.torch_name)
    attention = config.attention.value
    if attention == "sdpa" and not getattr(auto._model_mapping.get(type(cfg), None), "_supports_sdpa", True):
        attention = "eager"  # as transformers picks when none is asked for (gemma2, bloom: no SDPA)
    try:
        with torch.device(device):
            model = auto.from_config(cfg, dtype=dtype, attn_implementation=attention)
    except MemplanError:
        raise
    except Exception as e:
        raise MemplanError(f"{config.model}: transformers cannot build the model: {one_line(e)}") from None
    if materialise is not None:
        materialise(model)
    if config.quant is not Quant.NONE:
        return _quantised(config, cfg, model, mode=mode)
    if config.grad_checkpointing and config.method.is_fo:
        # Non-reentrant: works with PEFT (no input needing grad) and saves only layer inputs.
        kwargs = {"use_reentrant": False}
        if torch.device(device).type not in ("cpu", "meta") and not torch.cuda.is_available():
            kwargs["preserve_rng_state"] = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.scheme is not Scheme.FT:
        model = _peft(config, cfg, model)
    model.train()
    return model


def _quantised(config: Config, cfg, model, *, mode=None):
    """bitsandbytes layers, peft's prepare_model_for_kbit_training (which also turns on gradient
    checkpointing when asked), then the adapters."""
    from memplan import quant

    refuse = quant.refusal(config, masked=is_masked_lm(cfg))
    if refuse:
        raise MemplanError(refuse)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MemplanError(f"--quant {config.quant.value} needs the bitsandbytes package (pip install bitsandbytes)") \
            from None
    with quant.shared_state(mode):
        model = quant.quantise(model, config, mode=mode)
        model = _peft(config, cfg, model)  # adapters on the CPU; a tracer makes them fake next
    model.train()
    return model


def _peft(config: Config, cfg, model):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    task = TaskType.CAUSAL_LM if not is_masked_lm(cfg) else TaskType.FEATURE_EXTRACTION
    if config.scheme is Scheme.LORA:
        pc = LoraConfig(task_type=task, r=config.lora_rank, lora_alpha=config.lora_alpha,
                        target_modules=lora_targets(config, cfg), lora_dropout=config.lora_dropout)
    elif config.scheme is Scheme.PREFIX:
        pc = PrefixTuningConfig(task_type=task, num_virtual_tokens=config.prefix_tokens)
    else:
        # The virtual tokens sit beside the token embeddings, whose width peft would otherwise take
        # from hidden_size (OPT-350m embeds in 512 dimensions and projects in to 1024).
        pc = PromptTuningConfig(task_type=task, num_virtual_tokens=config.prompt_tokens,
                                token_dim=model.get_input_embeddings().embedding_dim)
    try:
        return get_peft_model(model, pc)
    except Exception as e:
        raise MemplanError(f"{config.model}: peft cannot apply {config.scheme.value}: {one_line(e)}") from None


def make_batch(config: Config, model, device="cpu", *, seed: int = 0, shape=None) -> dict:
    """Random token ids (batch x seq) in the vocabulary; labels = input_ids.

    `shape`: symbolic (batch, seq) sizes on fake tensors, whose values nobody reads: zeros, one
    allocation of the same bytes as the concrete batch."""
    import torch

    if shape is not None:
        ids = torch.zeros(shape, dtype=torch.long, device=device)
        return {"input_ids": ids, "labels": ids}
    vocab = _base_config(model).vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (config.batch, config.seq), generator=gen)
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids}


def _base_config(model):
    return getattr(model, "config", None) or model.base_model.config


def trainable(model) -> list[tuple[str, object]]:
    """(name, parameter) of every trainable parameter, tied ones once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
