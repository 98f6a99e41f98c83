"""Per-GPU layouts (memplan.sharding): DeepSpeed's own ZeRO estimators, torch's FSDP2 shards and DDP
buckets, and what each layout does to a step's phases."""

from __future__ import annotations

import pytest

from memplan import analytic, hardware
from memplan.errors import MemplanError
from memplan.options import Config, Offload, Sharding
from memplan.overhead import nccl_bytes, round_block
from memplan.result import Category as C, Phase
from memplan.sharding import (
    DDP_BUCKET_CAP_BYTES, DDP_FIRST_BUCKET_BYTES, ddp_bucket_bytes, dim0_padded, dim0_shard, fsdp_bytes,
    trainable_shapes,
)
from memplan.zero import REDUCE_BUCKET_SIZE, largest_module_params, zero_model_states
from memplan.spec import resolve

from tests.tiny import TINY_LLAMA, write

GIB = 1 << 30
FAM = hardware.family("hopper")


def phases(**kw):
    cfg = Config(**{"model": "opt-125m", "method": "fo-adam", "dtype": "bf16", **kw})
    return analytic.phases(cfg, resolve(cfg.model), FAM)


# ---- DeepSpeed ZeRO ------------------------------------------------------------------------------

# (total params, largest layer params, GPUs per node, nodes): divisible by the rank count, so that
# DeepSpeed's int(18 P / N) and memplan's 18 ceil(P / N) agree to the byte.
ZERO_CASES = [(1_000_000, 10_000, 1, 1), (2_851_000_000, 32_000_000, 8, 1), (70_553_706_496, 1_050_673_152, 8, 4),
              (6_738_415_616, 131_072_000, 4, 2), (124_440_576, 38_597_376, 2, 1)]


@pytest.mark.parametrize("params,largest,per_node,nodes", ZERO_CASES)
def test_zero_gpu_terms_equal_deepspeed_estimators(params, largest, per_node, nodes):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = per_node * nodes
    for offload, cpu_offload in ((Offload.NONE, False), (Offload.OPTIMIZER, True)):
        _, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=cpu_offload)
        assert zero_model_states(2, params, largest, n, nodes, offload).gpu_bytes == gpu
    for offload, cpu, cpu_params in ((Offload.NONE, False, False), (Offload.OPTIMIZER, True, False),
                                     (Offload.PARAMS, True, True)):
        ds_cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=cpu,
                                                               cpu_offload_params=cpu_params, zero_init=True)
        ours = zero_model_states(3, params, largest, n, nodes, offload)
        assert ours.gpu_bytes == gpu
        if offload is not Offload.NONE:  # DeepSpeed's host figure carries a 1.5 buffer factor
            assert ours.host_bytes * 1.5 == pytest.approx(ds_cpu, rel=1e-12)


def test_zero_rounds_partitions_up_like_deepspeed_pads_them():
    # 1001 params over 4 ranks: DeepSpeed's formula int(18 * 1001 / 4) = 4504; the padded partition
    # is ceil(1001 / 4) = 251 elements, 18 * 251 = 4518: at most 18 bytes per rank apart.
    assert zero_model_states(2, 1001, 10, 4).gpu_bytes == 2 * 1001 + 18 * 251


def test_zero3_published_t5_3b_figures():
    # DeepSpeed docs memory.rst: t5-3b ("2851M total params, 32M largest layer params", printed as
    # int(n / 1e6)) on 1 node x 8 GPUs, ZeRO-3: 0.12 / 0.79 / 6.10 GB per GPU (offload params+optimizer /
    # optimizer / none), GiB in fact. t5-3b's counts: 2,851,598,336 params; its largest module, the
    # shared embedding, 32128 x 1024.
    p, ll = 2_851_598_336, 32128 * 1024
    got = [zero_model_states(3, p, ll, 8, 1, o).gpu_bytes / GIB for o in (Offload.PARAMS, Offload.OPTIMIZER, Offload.NONE)]
    assert [round(g, 2) for g in got] == [0.12, 0.79, 6.10]


def test_zero1_keeps_whole_16bit_gradients():
    # P_os (ZeRO paper): 2P + 2P + (4 fp32 grads + 4 master + 8 Adam) P / N
    assert zero_model_states(1, 8000, 10, 8).gpu_bytes == 2 * 8000 + 2 * 8000 + 16 * 1000


def test_zero_phases_hold_the_model_states_and_the_reduce_bucket():
    spec = resolve("opt-125m")
    for stage, mode in ((1, Sharding.ZERO1), (2, Sharding.ZERO2)):
        load = phases(num_gpus=4, sharding=mode)[Phase.LOAD]
        ms = zero_model_states(stage, spec.param_count, largest_module_params(spec), 4)
        buffers = sum(round_block(t.numel * 4) for t in spec.buffers)
        assert load[C.WEIGHTS] + load[C.GRADIENTS] + load[C.OPTIMIZER_STATE] == ms.gpu_bytes + buffers
        assert load[C.COMMUNICATION] == REDUCE_BUCKET_SIZE * 2  # 5e8 bf16 elements: DeepSpeed's ipg buffer


def test_largest_module_is_deepspeeds_largest_layer(transformers_shapes):
    # DeepSpeed's model_to_params: max over modules of their own (recurse=False) parameters: OPT-125m's
    # token embedding, 50272 x 768 (the lm_head is tied to it).
    assert largest_module_params(resolve("opt-125m")) == 50272 * 768


# ---- FSDP2 ---------------------------------------------------------------------------------------


def test_dim0_shards_pad_to_the_world_size():
    # (10, 3) over 4 ranks: torch.chunk gives 3, 3, 3, 1 rows; rank 0 holds 3 rows, the all-gather 4 x 3.
    assert dim0_shard((10, 3), 4) == 9
    assert dim0_padded((10, 3), 4) == 36
    assert dim0_shard((7,), 8) == 1 and dim0_padded((7,), 8) == 8


@pytest.mark.parametrize("n", [2, 3, 4])
def test_fsdp_shards_equal_fully_shard_on_a_fake_process_group(tmp_path, n):
    """Rank 0's local shards, as FSDP2 makes them on the `fake` backend, byte for byte."""
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=n, store=FakeStore())
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
                k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, dtype=torch.bfloat16)).bfloat16()
        mesh = init_device_mesh("cpu", (n,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        local = sum(round_block(p.to_local().numel() * 2) for p in model.parameters())
    finally:
        dist.destroy_process_group()
    cfg = Config(model=write(tmp_path, TINY_LLAMA), method="fo-adam", dtype="bf16", num_gpus=n, sharding="fsdp")
    spec = resolve(cfg.model)
    assert fsdp_bytes(trainable_shapes(cfg, spec), n) == local


def test_fsdp_model_state_per_rank_and_gathered_blocks(tmp_path):
    cfg = Config(model=write(tmp_path, TINY_LLAMA), method="fo-adam", dtype="bf16", num_gpus=4, sharding="fsdp")
    spec = resolve(cfg.model)
    ph = analytic.phases(cfg, spec, FAM)
    shards = fsdp_bytes(trainable_shapes(cfg, spec), 4)
    buffers = sum(round_block(t.numel * 4) for t in spec.buffers)
    assert ph[Phase.LOAD][C.WEIGHTS] == shards + buffers
    assert ph[Phase.LOAD][C.GRADIENTS] == shards
    assert ph[Phase.LOAD][C.OPTIMIZER_STATE] == 2 * shards  # exp_avg, exp_avg_sq on the shards
    # One block: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128, two norms of 64;
    # over 4 ranks every dim 0 splits evenly, so gathered = unsharded, each tensor rounded to 512 B.
    block = sum(round_block(e * 2) for e in (4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64))
    root = round_block(256 * 64 * 2) * 2 + round_block(64 * 2)
    # One token, where the buffers outweigh the activations (here a block outweighs the root).
    one = analytic.phases(cfg.replace(seq=1), spec, FAM)
    # Forward: the last block's copy-out holds the previous block's flat all-gather output (kept until
    # then), its own flat output and its unsharded parameters, beside the gathered root.
    assert one[Phase.FORWARD][C.COMMUNICATION] == root + 3 * block
    # Backward, the last block (first to run backward): the root with its unsharded gradients made so far
    # (lm_head's and the norm's; the embedding's come last), the block and the prefetched one before it,
    # and the block's unsharded gradients (no earlier reduce-scatter input held: it is the first).
    embed = round_block(256 * 64 * 2)
    assert one[Phase.BACKWARD][C.COMMUNICATION] == root + (root - embed) + 2 * block + block
    assert ph[Phase.OPTIMIZER_STEP].get(C.COMMUNICATION, 0) == 0  # resharded after backward
    assert ph[Phase.LOAD].get(C.COMMUNICATION, 0) == 0


def test_fsdp_per_gpu_peak_falls_with_more_gpus():
    peaks = [sum(max(phases(num_gpus=n, sharding="fsdp").values(), key=lambda m: sum(m.values())).values())
             for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]


def test_zo_under_fsdp_keeps_the_root_gathered_between_steps(tmp_path):
    cfg = Config(model=write(tmp_path, TINY_LLAMA), method="zo-sgd", dtype="bf16", num_gpus=4, sharding="fsdp",
                 seq=1)
    ph = analytic.phases(cfg, resolve(cfg.model), FAM)
    block = sum(round_block(e * 2) for e in (4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64))
    root = round_block(256 * 64 * 2) * 2 + round_block(64 * 2)
    # Never resharded after forward (no backward to gather it for): load, perturb and the update hold it.
    for phase in (Phase.LOAD, Phase.PERTURB, Phase.OPTIMIZER_STEP):
        assert ph[phase][C.COMMUNICATION] == root, phase
    # A block's copy-out: the previous block's flat output (kept until now), this one's and its parameters.
    assert ph[Phase.FORWARD][C.COMMUNICATION] == root + 3 * block
    one_gpu = analytic.phases(cfg.replace(num_gpus=1, sharding="none"), resolve(cfg.model), FAM)
    assert ph[Phase.PERTURB][C.WEIGHTS] < one_gpu[Phase.PERTURB][C.WEIGHTS] / 3  # the shards


# ---- DDP -----------------------------------------------------------------------------------------


def test_ddp_buckets_follow_torchs_assignment():
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    spec = resolve("opt-125m")
    tensors = [torch.empty(t.numel, dtype=torch.bfloat16) for t in spec.tensors]
    # DDP hands the reducer its parameters in reverse order (gradients become ready back to front).
    buckets, _ = dist._compute_bucket_assignment_by_size(list(reversed(tensors)),
                                                         [DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_CAP_BYTES])
    rev = list(reversed(tensors))
    expected = sum(round_block(sum(rev[i].numel() * 2 for i in b)) for b in buckets)
    assert ddp_bucket_bytes([t.numel * 2 for t in spec.tensors]) == expected


def test_ddp_replicates_and_adds_one_gradient_copy():
    one, ddp = phases(), phases(num_gpus=4, sharding="ddp")
    for ph in one:
        assert ddp[ph][C.WEIGHTS] == one[ph][C.WEIGHTS]
        assert ddp[ph][C.OPTIMIZER_STATE] == one[ph][C.OPTIMIZER_STATE]
    grads = one[Phase.LOAD][C.GRADIENTS]
    assert grads <= ddp[Phase.LOAD][C.COMMUNICATION] <= grads + 512 * 40  # plus each bucket's rounding


# ---- offload, overheads, refusals -----------------------------------------------------------------


def test_zero_offload_moves_state_to_the_host():
    spec = resolve("opt-125m")
    cfg = Config(model="opt-125m", method="fo-adam", dtype="bf16", num_gpus=8, nodes=2, sharding="zero3",
                 offload="optimizer")
    ms = zero_model_states(3, spec.param_count, largest_module_params(spec), 8, 2, Offload.OPTIMIZER)
    assert analytic.host_bytes(cfg, spec) == ms.host_bytes == 4 * 16 * -(-spec.param_count // 8)
    assert analytic.phases(cfg, spec, FAM)[Phase.LOAD][C.OPTIMIZER_STATE] == 0


def test_zo2_streams_blocks_from_the_host():
    spec = resolve("opt-125m")
    cfg = Config(model="opt-125m", method="zo-sgd", dtype="fp16", offload="params")
    ph = analytic.phases(cfg, spec, FAM)
    assert ph[Phase.LOAD][C.WEIGHTS] < phases(method="zo-sgd", dtype="fp16")[Phase.LOAD][C.WEIGHTS]
    assert analytic.host_bytes(cfg, spec) > 0
    assert ph[Phase.FORWARD][C.COMMUNICATION] > 0


def test_nccl_workspace_is_a_context_overhead(fit_json):
    assert nccl_bytes(1) == 0 and nccl_bytes(2) == 544 << 20 and nccl_bytes(8) == 688 << 20
    _, (one,) = fit_json("opt-125m", "-m", "zo-sgd", "--gpu", "h100")
    _, (many,) = fit_json("opt-125m", "-m", "zo-sgd", "--gpu", "h100", "--num-gpus", "8", "--sharding", "none")
    assert many["components"]["context"] - one["components"]["context"] == 688 << 20


@pytest.mark.parametrize("kw,match", [
    (dict(method="fo-adam", num_gpus=2, sharding="none"), "first-order ranks must share gradients"),
    (dict(method="fo-adam", num_gpus=2, sharding="ddp", offload="optimizer"), "needs --sharding zero1"),
    (dict(method="fo-adam", num_gpus=2, sharding="zero2", offload="params"), "only in stage 3"),
    (dict(method="fo-adam", num_gpus=2, sharding="fsdp", offload="optimizer"), "CPUOffloadPolicy"),
    (dict(method="zo-sgd", offload="optimizer"), "no optimizer state"),
    (dict(method="zo-sgd", num_gpus=6, nodes=4, sharding="fsdp"), "does not split evenly"),
])
def test_layouts_no_library_runs_are_refused(kw, match):
    with pytest.raises(MemplanError, match=match):
        analytic.phases(Config(model="opt-125m", **kw), resolve("opt-125m"), FAM)


def test_host_memory_fails_the_verdict(fit_json, run_cli):
    args = ("llama-3.1-8b", "-m", "fo-adam", "--dtype", "bf16", "--num-gpus", "2", "--sharding", "zero3",
            "--offload", "params", "--gpu", "h100")
    code, (est,) = fit_json(*args)
    assert est["host_bytes"] > 100 * GIB and est["fits"] is True and code == 0
    code, (est,) = fit_json(*args, "--host-memory", "64")
    assert est["fits"] is False and code == 1
    assert any("host memory" in w for w in est["warnings"])
    code, (est,) = fit_json(*args, "--host-memory", "1024")
    assert est["fits"] is True


def test_fit_says_per_gpu(run_cli):
    code, out, err = run_cli("fit", "opt-125m", "-m", "fo-adam", "--num-gpus", "4", "--sharding", "fsdp",
                             "--gpu", "h100")
    assert code == 0, err
    text = " ".join(out.split())
    assert "all sizes per GPU" in text and "4 GPUs, fsdp" in text
    code, out, err = run_cli("fit", "opt-125m", "-m", "fo-adam", "--num-gpus", "2", "--sharding", "none")
    assert code == 2 and "first-order ranks must share gradients" in err


# ---- suggestions, plans, charts ------------------------------------------------------------------


def test_suggestions_propose_layouts_with_per_gpu_numbers():
    from memplan.api import estimate_config
    from memplan.pipeline import device_bytes
    from memplan.suggest import fixes, suggestions

    spec, gpu = resolve("llama-3.1-8b"), hardware.get_gpu("a100-40gb")
    cfg = Config(model="llama-3.1-8b", method="fo-adam", dtype="bf16", seq=2048)
    est = estimate_config(cfg, gpu, spec=spec)
    found = {f.flag: f for f in fixes(est, spec, gpu)}
    # The fewest GPUs that hold it: 4 under FSDP (2 is not enough), each fix re-estimated as applied.
    more = found["--sharding fsdp --num-gpus 4"]
    assert more.peak_device_bytes == device_bytes(cfg.replace(**more.changes), spec, gpu) <= gpu.total_bytes
    assert device_bytes(cfg.replace(sharding="fsdp", num_gpus=2), spec, gpu) > gpu.total_bytes * 0.95
    assert f"--sharding fsdp --num-gpus 4 ({more.peak_device_bytes / GIB:.1f} GiB per GPU)" in \
        suggestions(est, spec, gpu)[0]
    assert more.to_json_dict()["also"] == {"num_gpus": 4}


def test_suggestions_offer_zo2_offload():
    from memplan.api import estimate_config
    from memplan.suggest import fixes

    spec, gpu = resolve("llama-3.1-70b"), hardware.get_gpu("h100")
    est = estimate_config(Config(model="llama-3.1-70b", method="zo-sgd"), gpu, spec=spec)
    assert "--offload params" in [f.flag for f in fixes(est, spec, gpu)]


def test_plan_runs_take_layouts_and_judge_the_host():
    from memplan import plan

    text = ("gpus: [h100]\nmargin: 5%\nruns:\n  - name: big\n    model: llama-3.1-8b\n    method: fo-adam\n"
            "    dtype: bf16\n    num_gpus: 8\n    sharding: zero3\n    offload: optimizer\n    host_memory: 16\n")
    (r,) = plan.check(plan.parse(text))
    assert r.estimate.config.num_gpus == 8 and r.estimate.host_bytes > 16 * GIB
    assert r.estimate.peak_device_bytes <= r.budget_bytes and not r.fits  # the host, not the GPU, is short
    (r,) = plan.check(plan.parse(text.replace("host_memory: 16", "host_memory: 512")))
    assert r.fits


def test_gpu_sweep_has_a_line_per_sharding_mode():
    from memplan import charts

    # (on opt-125m, NCCL's workspace outweighs what sharding saves: a 8B model falls with every doubling)
    c = charts.sweep("llama-3.1-8b", ["fo-adam"], "h100", over="num-gpus", values=[1, 2, 8], dtype="bf16")
    assert list(c.peak_bytes) == ["ddp", "zero1", "zero2", "zero3", "fsdp"]
    fsdp = c.peak_bytes["fsdp"]
    assert fsdp[0] > fsdp[1] > fsdp[2]
    from memplan.api import estimate_config

    one = estimate_config(Config(model="llama-3.1-8b", method="fo-adam", dtype="bf16", num_gpus=8, sharding="zero2"),
                          hardware.get_gpu("h100"), search=False)
    assert c.peak_bytes["zero2"][2] == one.peak_device_bytes
    zo = charts.sweep("opt-125m", ["zo-sgd"], "h100", over="num-gpus", values=[2], sharding="fsdp")
    assert list(zo.peak_bytes) == ["fsdp"]


def test_trace_refuses_zero_and_offload(run_cli):
    # fsdp and ddp are traced (tests/test_sharded_trace.py); DeepSpeed cannot run on fake tensors.
    code, _, err = run_cli("trace", "opt-125m", "-m", "zo-sgd", "--num-gpus", "2", "--sharding", "zero3")
    assert code == 2 and "DeepSpeed ZeRO, which cannot run on fake tensors" in err
    code, _, err = run_cli("trace", "opt-125m", "-m", "fo-adam", "--num-gpus", "2", "--sharding", "zero3",
                           "--offload", "optimizer")
    assert code == 2 and "--offload is not traced" in err


def test_api_takes_layouts():
    from memplan import estimate

    est = estimate("llama-3.1-8b", "fo-adam", dtype="bf16", num_gpus=4, sharding="zero2", gpu="h100", search=False)
    assert est.config.num_gpus == 4 and est.components[C.COMMUNICATION] == round_block(REDUCE_BUCKET_SIZE * 2)


def test_zo2_keeps_the_root_and_streams_two_blocks_exactly(tmp_path):
    cfg = Config(model=write(tmp_path, TINY_LLAMA), method="zo-sgd", dtype="fp16", offload="params")
    spec = resolve(cfg.model)
    ph = analytic.phases(cfg, spec, FAM)
    # Root: embedding 256 x 64, final norm 64, lm_head 256 x 64 (untied), fp16, each rounded to 512 B.
    root = 2 * round_block(256 * 64 * 2) + round_block(64 * 2)
    buffers = sum(round_block(t.numel * 4) for t in spec.buffers)
    assert ph[Phase.LOAD][C.WEIGHTS] == root + buffers
    block = sum(round_block(e * 2) for e in (4096, 2048, 2048, 4096, 8192, 8192, 8192, 64, 64))
    assert ph[Phase.FORWARD][C.COMMUNICATION] == 2 * block  # the block computing and the next uploading
    assert analytic.host_bytes(cfg, spec) == 2 * block  # both decoder blocks live on the host
