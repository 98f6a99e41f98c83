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


def _cfg(model: str, method: str, world: int, sharding: str, scheme: str = "ft") -> Config:
    return Config(model=model, method=method, scheme=scheme, dtype="fp32", batch=2, seq=16, num_gpus=world,
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


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_adam_keeps_sharded_weights_gradients_and_state(opt, world):
    cfg = _cfg(opt, "fo-adam", world, "fsdp")
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


@pytest.mark.parametrize("sharding, method", [("fsdp", "fo-adam"), ("ddp", "zo-sgd")])
def test_fake_tensors_count_what_real_ones_do_in_the_fake_group(opt, sharding, method):
    # The same rank's step on real CPU tensors (collectives still fake): every phase to the byte,
    # so nothing in the sharded trace comes from fake tensors (DDP's and FSDP's stand-ins included).
    cfg = _cfg(opt, method, 2, sharding)
    fake, real = trace_step(cfg).peak, trace_step(cfg, real=True).peak
    assert fake.phases == real.phases
    assert fake.components == real.components
