"""Two real ranks on the CPU (torchrun, gloo) against the sharded trace, rank by rank.

One torchrun launch runs every configuration below in turn (a process group each); each rank's
live-bytes meter (`CpuMeter`, the tracer's counter on real tensors) measures its own step. The trace
runs rank 0 of 2 on fake tensors in the fake process group. What must agree, agrees to the byte:
- every phase of DDP, and the phases of FSDP where no collective is in flight (load: the state
  kept between steps; optimizer_step);
- FSDP's forward and backward peaks are the trace's, or above it by at most one all-gather buffer:
  gloo runs a collective in its own thread, which drops its references to the buffers when it is
  done, a moment the step does not set; the fake process group finishes every collective at once.
  On CUDA the same buffers are held until FSDP's next wait, which the trace follows.
The analytic per-GPU estimate is held to each measured rank too: DDP within 0.5 %, FSDP within 3.5 %
(see ANALYTIC_TOLERANCE).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from memplan import distributed  # noqa: E402
from memplan.calibration import grid, worker  # noqa: E402
from memplan.options import Config  # noqa: E402
from memplan.tracing import trace_step  # noqa: E402
from tiny import TINY_OPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
LAUNCH_TIMEOUT_S = 240  # two processes importing torch and transformers on a small CI runner
CASES = [  # (sharding, method, scheme[, dtype])
    ("fsdp", "fo-adam", "ft"),
    ("fsdp", "fo-adam", "lora"),
    ("fsdp", "zo-sgd", "ft"),
    ("ddp", "fo-adam", "ft"),
    ("ddp", "zo-sgd", "ft"),
    ("fsdp", "fo-adam", "ft", "amp-bf16"),  # FSDP2's MixedPrecisionPolicy: bf16 gathers over fp32 shards
]


def _config(sharding: str, method: str, scheme: str, dtype: str = "fp32") -> Config:
    return Config(model="tiny-opt", method=method, scheme=scheme, dtype=dtype, batch=2, seq=16,
                  num_gpus=WORLD, sharding=sharding)


def _job(config: Config) -> dict:
    key = grid.config_key(config, TINY_OPT)
    return grid.Job(config, "tiny-opt", TINY_OPT, key).to_dict()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{(case, rank): record} from one torchrun launch of every case on 2 gloo ranks."""
    d = tmp_path_factory.mktemp("ranks")
    request = d / "request.json"
    settings = {"device": "cpu", "warmup_steps": 1, "measured_steps": 1, "seed": 0, "cpu_cap_bytes": None}
    request.write_text(json.dumps({"jobs": [_job(_config(*c)) for c in CASES], "settings": settings,
                                   "result_dir": str(d)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "memplan.calibration.worker", "--rank", str(request)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun with {WORLD} gloo ranks gave no result within {LAUNCH_TIMEOUT_S} s:\n{output[-3000:]}")
    out = {}
    for rank in range(WORLD):
        path = d / f"rank{rank}.json"
        if not path.exists():
            log = (d / f"rank{rank}.log").read_text() if (d / f"rank{rank}.log").exists() else ""
            pytest.fail(f"torchrun exited with {proc.returncode}; rank {rank} wrote no records:\n"
                        f"{(log or output)[-3000:]}")
        for case, rec in zip(CASES, json.loads(path.read_text())):
            out[case, rank] = rec
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-opt")
    path = d / "config.json"
    path.write_text(json.dumps(TINY_OPT))
    return {c: trace_step(_config(*c).replace(model=str(path))).peak for c in CASES}


def test_every_rank_records_its_own_peaks(measured):
    for (case, rank), rec in measured.items():
        assert rec["status"] == "ok", (case, rank, rec.get("error"), rec.get("traceback"))
        assert (rec["rank"], rec["world_size"]) == (rank, WORLD)
        assert rec["meter"] == "cpu-live-bytes"
        assert rec["peak_allocated_bytes"] == max(rec["phases"].values())


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_measured_ranks_match_the_sharded_trace(case, measured, traced):
    sharding = case[0]
    trace = {ph.value: n for ph, n in traced[case].phases.items()}
    for rank in range(WORLD):
        got = measured[case, rank]["phases"]
        assert set(got) == set(trace), (rank, got, trace)
        for phase, n in trace.items():
            if sharding == "ddp" or phase in ("load", "optimizer_step"):
                assert got[phase] == n, (rank, phase, got[phase], n)
            else:  # at most one block's all-gather buffer later freed by gloo's thread (which can still
                # hold the last forward's when ZO's perturbation starts: seen once in two runs)
                assert n <= got[phase] <= n + _block_gather_bytes(), (rank, phase, got[phase], n)


# The analytic per-GPU peak without the cuBLAS workspace (neither CPU tier sees it; the largest phase
# without it, since on tiny shapes the workspace alone decides which phase peaks) against each rank.
# DDP within 0.5 % (measured: -1,024 B for fo-adam, -1,536 B for zo-sgd, of 2.1 / 0.9 MB). FSDP within
# 3.5 % (the trace: fo-adam ft +1.1 %, lora -1.9 %, zo-sgd -3.2 %), plus, below the rank, the one
# all-gather buffer gloo's thread may still hold (test above; the estimate models CUDA, where FSDP2
# frees it at its next wait): on 2 layers and 32 tokens the peak is a block's all-gather copy-out,
# where the step also holds the hidden states, the attention mask and the position ids (about 20 KiB)
# that the model does not count, and FSDP2's flat all-gather output is one 512 B-rounded buffer where
# the model rounds every tensor.
ANALYTIC_TOLERANCE = {"ddp": 0.005, "fsdp": 0.035}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_analytic_per_gpu_matches_every_measured_rank(case, measured, tmp_path):
    from memplan import analytic as tier, hardware
    from memplan.result import Category
    from memplan.spec import resolve

    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_OPT))
    cfg = _config(*case).replace(model=str(path))
    phases = tier.phases(cfg, resolve(cfg.model), hardware.family("hopper"))
    analytic = max(sum(n for c, n in m.items() if c is not Category.WORKSPACE) for m in phases.values())
    gloo = _block_gather_bytes() if case[0] == "fsdp" else 0
    for rank in range(WORLD):
        got = measured[case, rank]["peak_allocated_bytes"]
        tol = ANALYTIC_TOLERANCE[case[0]] * got
        assert got - gloo - tol <= analytic <= got + tol, (rank, analytic, got)


def _block_gather_bytes() -> int:
    """One decoder block of tiny OPT, unsharded, fp32: what one all-gather output holds."""
    h, f = TINY_OPT["hidden_size"], TINY_OPT["ffn_dim"]
    # q, k, v, out: 4 (h x h + h); fc1, fc2: h x f + f, f x h + h; two layer norms: 2 (h + h)
    numel = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    return numel * 4


def test_multi_gpu_job_outside_torchrun_is_a_clear_error():
    job = _job(_config("fsdp", "fo-adam", "ft"))
    rec = worker.run_job(job, {"device": "cpu", "warmup_steps": 1, "measured_steps": 1})
    assert rec["status"] == "error"
    assert "torchrun" in rec["error"]


def test_zero_is_refused_for_trace_and_measurement():
    cfg = Config(model="tiny-opt", method="fo-adam", num_gpus=2, sharding="zero3")
    assert "DeepSpeed" in distributed.trace_refusal(cfg)
    assert "DeepSpeed" in distributed.measure_refusal(cfg, (0, 2, 0))


def test_runner_cuts_a_torchrun_launch_at_its_timeout_and_retries_it(tmp_path):
    from memplan.calibration import records, runner

    g = grid.Grid(name="ranks", device="cpu", timeout_s=1, models={"tiny-opt": TINY_OPT},
                  configs=[{"model": "tiny-opt", "method": "zo-sgd", "num_gpus": WORLD, "sharding": "ddp"}])
    out = tmp_path / "ranks.jsonl"
    summary = runner.run(g, out=out, isolation="spawn")
    assert summary.statuses == {"timeout": 1}
    (rec,) = records.read(out)
    assert rec["isolation"] == "torchrun" and (rec["world_size"], rec["rank"]) == (WORLD, 0)
    assert "no records from 2 ranks within 1 s" in rec["error"]
    assert runner.run(g, out=out, isolation="spawn").statuses == {"timeout": 1}  # not a result: tried again
