"""The sharded trace (one rank of FSDP2 / DDP in torch's fake process group) on tiny shapes, to the byte.

What a rank keeps between steps (the LOAD phase of the measured step) is a sum over parameter
shards that a reader can check by hand; the moments with collectives in flight are checked against
two real gloo ranks in test_sharded_calibration.py.
"""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

from memplan.build import build_model  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.options import Config  # noqa: E402
from memplan.result import Category, Phase  # noqa: E402
from memplan.tracing import trace, trace_step  # noqa: E402
from tiny import TINY_OPT  # noqa: E402

BATCH_BYTES = 512  # input_ids (labels are the same tensor): 2 x 16 int64 = 256 B, one 512 B block


def r512(n: int) -> int:
    return -(-n // 512) * 512


@pytest.fixture(scope="module")
def opt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("opt") / "config.json"
    path.write_text(json.dumps(TINY_OPT))
    return str(path)


def _cfg(model: str, method: str, world: int, sharding: str, scheme: str = "ft", dtype: str = "fp32") -> Config:
    return Config(model=model, method=method, scheme=scheme, dtype=dtype, batch=2, seq=16, num_gpus=world,
                  sharding=sharding)


def _shard_bytes(p, world: int) -> int:
    """FSDP2 shards dim 0, padded to ceil(d0 / world) rows on every rank."""
    rows = p.shape[0]
    return -(-rows // world) * (p.numel() // rows) * 4


def _groups(model) -> list[list]:
    """FSDP groups as memplan wraps them: one per decoder layer, the rest in the root."""
    layers = model.model.decoder.layers
    inner = {id(p) for p in layers.parameters()}
    return [list(layer.parameters()) for layer in layers] + [
        [p for p in model.parameters() if id(p) not in inner]]


@pytest.mark.parametrize("world, dtype", [(2, "fp32"), (4, "fp32"), (2, "amp-bf16")])
def test_fsdp_adam_keeps_sharded_weights_gradients_and_state(opt, world, dtype):
    # amp-bf16 is FSDP2's mixed precision: the shards, the reduce-scatter outputs (reduce_dtype fp32)
    # and Adam's state stay fp32, so what a rank keeps is the fp32 run's.
    cfg = _cfg(opt, "fo-adam", world, "fsdp", dtype=dtype)
    model = build_model(cfg, "meta")
    params = list(model.parameters())  # the tied lm_head is the embedding, once
    # weights: one padded shard per parameter; gradients: one reduce-scatter output per group, the
    # sharded gradients are views of it; Adam: exp_avg and exp_avg_sq per shard.
    weights = sum(r512(_shard_bytes(p, world)) for p in params)
    grads = sum(r512(sum(_shard_bytes(p, world) for p in g)) for g in _groups(model))
    adam = 2 * weights
    peak = trace_step(cfg).peak
    assert peak.phases[Phase.LOAD] == weights + grads + adam + BATCH_BYTES


@pytest.mark.parametrize("world", [4])
def test_fsdp_zo_keeps_the_root_unsharded_between_steps(opt, world):
    # FSDP2 does not reshard the root after forward (its backward would gather it again at once);
    # a forward-only method has no backward, so the root's parameters stay gathered between steps.
    cfg = _cfg(opt, "zo-sgd", world, "fsdp")
    model = build_model(cfg, "meta")
    weights = sum(r512(_shard_bytes(p, world)) for p in model.parameters())
    # The root (embeddings with the tied head, positions, final norm), gathered: one buffer per
    # parameter, padded as the shards are (66 positions -> 4 x 17 = 68 rows at 4 ranks).
    root_unsharded = sum(r512(_shard_bytes(p, world) * world) for p in _groups(model)[-1])
    peak = trace_step(cfg).peak
    assert peak.phases[Phase.LOAD] == weights + root_unsharded + BATCH_BYTES
    assert peak.components[Category.COMMUNICATION] > 0  # gathered blocks at the peak


@pytest.mark.parametrize("method", ["fo-adam", "zo-sgd"])
def test_ddp_adds_one_bucket_copy_of_the_trainable_weights(opt, method):
    single = trace_step(_cfg(opt, method, 1, "none")).peak
    ddp = trace_step(_cfg(opt, method, 2, "ddp")).peak
    model = build_model(_cfg(opt, method, 1, "none"), "meta")
    trainable = sum(p.numel() * 4 for p in model.parameters())  # 350,720 B: one bucket (under 1 MiB)
    assert ddp.phases[Phase.LOAD] == single.phases[Phase.LOAD] + r512(trainable)
    assert ddp.components[Category.COMMUNICATION] == r512(trainable)
    assert ddp.allocated == single.allocated + r512(trainable)


def test_fsdp_lora_shards_the_frozen_base_too(opt):
    one = trace_step(_cfg(opt, "fo-adam", 1, "none", "lora")).peak
    two = trace_step(_cfg(opt, "fo-adam", 2, "fsdp", "lora")).peak
    # LoRA's Adam state and gradients are tiny; what is kept is mostly the frozen weights, halved.
    assert two.phases[Phase.LOAD] < 0.6 * one.phases[Phase.LOAD]
    assert two.components.get(Category.COMMUNICATION, 0) > 0


def test_trace_estimate_is_per_rank(opt):
    est = trace(_cfg(opt, "fo-adam", 4, "fsdp"))
    assert est.components[Category.COMMUNICATION] > 0
    assert est.trainable_params == sum(p.numel() for p in build_model(_cfg(opt, "fo-adam", 1, "none"), "meta").parameters())


@pytest.mark.parametrize("sharding, needle", [("zero1", "DeepSpeed ZeRO"), ("zero3", "DeepSpeed ZeRO")])
def test_zero_is_refused_by_the_trace(opt, sharding, needle):
    with pytest.raises(MemplanError, match=needle):
        trace_step(_cfg(opt, "fo-adam", 2, sharding))


def test_offload_is_refused_by_the_trace(opt):
    cfg = _cfg(opt, "fo-adam", 2, "fsdp").replace(offload="params")
    with pytest.raises(MemplanError, match="--offload is not traced"):
        trace_step(cfg)


@pytest.mark.parametrize("sharding, method, dtype", [("fsdp", "fo-adam", "fp32"), ("ddp", "zo-sgd", "fp32"),
                                                     ("fsdp", "fo-adam", "amp-bf16")])
def test_fake_tensors_count_what_real_ones_do_in_the_fake_group(opt, sharding, method, dtype):
    # The same rank's step on real CPU tensors (collectives still fake): every phase to the byte,
    # so nothing in the sharded trace comes from fake tensors (DDP's and FSDP's stand-ins included).
    cfg = _cfg(opt, method, 2, sharding, dtype=dtype)
    fake, real = trace_step(cfg).peak, trace_step(cfg, real=True).peak
    assert fake.phases == real.phases
    assert fake.components == real.components


@pytest.mark.parametrize("sharding, autocast", [("fsdp", False), ("ddp", True)])
def test_amp_under_fsdp_is_fsdp2_mixed_precision_not_autocast(opt, sharding, autocast):
    # fsdp: every block computes on bf16 gathered parameters over fp32 shards, outside autocast (as
    # torchtitan runs FSDP2); ddp keeps fp32 weights and autocast, as one GPU does.
    import torch

    from memplan import _compat, distributed
    from memplan.steps import Step, make_batch

    cfg = _cfg(opt, "fo-adam", 2, sharding, dtype="amp-bf16")
    seen = []
    with _compat.fake_process_group(2):
        model = build_model(cfg, "cpu")
        if sharding == "fsdp":
            distributed.shard(model, _compat.device_mesh("cpu", 2), cfg)
        shards = {p.dtype for p in model.parameters()}
        for layer in model.model.decoder.layers:
            layer.register_forward_pre_hook(lambda m, _: seen.append(
                ({p.dtype for p in m.parameters()}, torch.is_autocast_enabled("cpu"))))
        step = Step(cfg, model)
        if sharding == "ddp":
            step.model = distributed.replicate(model, fake=True)
        step(make_batch(cfg, model, "cpu"))
    assert shards == {torch.float32}
    gathered = {torch.float32} if autocast else {torch.bfloat16}
    assert seen and all(dtypes == gathered and on is autocast for dtypes, on in seen)
