"""The child: one configuration in a fresh process -- build, warm up, reset the peaks, measure, one record.

Run by the runner, either forked from `serve()` -- a server that has imported torch and transformers
but never touched CUDA, so each child creates its own CUDA context and allocator -- or as
`python -m memplan.calibration.worker` reading `{"job": ..., "settings": ...}` on stdin and printing
one `MEMPLAN_RECORD {...}` line.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from memplan import _compat
from memplan._compat import cuda_in_bad_fork
from memplan.calibration.meter import CpuMeter, CudaMeter, Meter
from memplan.errors import one_line
from memplan.result import Phase
from memplan.options import Config

MARKER = "MEMPLAN_RECORD "
PRELOAD = ("transformers.models.opt.modeling_opt", "transformers.models.llama.modeling_llama")
ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG",
             "CUDA_MODULE_LOADING", "TORCH_CUBLASLT_WORKSPACE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_one(config: Config, model_config: dict, device: torch.device, meter: Meter, *,
             warmup_steps: int, measured_steps: int, seed: int, mesh=None) -> dict:
    """Build the model and the step with the shared step code (`memplan.steps`) and run it.

    Returns the record fields the steps know (parameter counts, bytes after load, step times,
    notes); the caller adds the meter's readings.
    """
    from memplan import distributed, steps
    from memplan.options import Sharding

    sharding = distributed.layout(config)
    with tempfile.TemporaryDirectory() as d:  # steps resolves models by name or config.json path
        path = Path(d) / "config.json"
        path.write_text(json.dumps(model_config))
        cfg = config.replace(model=str(path))
        # FSDP: built in host memory; fully_shard moves each module to the device as it shards it.
        model = steps.build_model(cfg, "cpu" if sharding is Sharding.FSDP else device)
    if sharding is Sharding.FSDP:
        distributed.shard(model, mesh, cfg)
    batch = steps.make_batch(cfg, model, device, seed=seed)
    run = steps.Step(cfg, model, on_phase=meter.on_phase, seed=seed)
    if sharding is Sharding.DDP:  # its gradient buckets are allocated here
        run.model = distributed.replicate(model)
    params, notes = [p for _, p in run.params], run.warnings
    _sync(device)
    load_bytes = meter.allocated_bytes()
    torch.manual_seed(seed)
    for _ in range(warmup_steps):  # optimizer state appears on the first step
        run(batch)
    _sync(device)
    meter.reset_peak()
    times = []
    for _ in range(measured_steps):
        t0 = time.perf_counter()
        run(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    meter.on_phase(Phase.LOAD)  # state kept between steps
    return {
        "load_allocated_bytes": load_bytes,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_time_s": statistics.median(times), "step_times_s": times, "steps_impl": steps.__name__,
        "notes": sorted(set(notes)),
    }


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def environment(device: torch.device) -> dict:
    """Where the record was measured: device, memory, driver, CUDA, library versions, allocator settings."""
    env = {**_versions(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "alloc_env": {k: os.environ[k] for k in ALLOC_ENV if k in os.environ}}
    if device.type != "cuda":
        return {**env, "device": "cpu", "gpu": None, "gpu_total_bytes": None, "family": "cpu"}
    props = torch.cuda.get_device_properties(device)
    env.update(device="cuda", gpu=props.name, gpu_total_bytes=int(props.total_memory),
               capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), allocator_backend=torch.cuda.get_allocator_backend())
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        env["nvml_total_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception:
        env["driver"] = None
    from memplan.hardware import detect

    found = detect()
    match = next((g for g in found if g.display == props.name), None)
    env["family"] = match.family if match else "default"
    env["gpu_name"] = match.name if match else None
    return env


def rank_of_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local


def run_job(job: dict, settings: dict) -> dict:
    """Measure one configuration; out-of-memory and failures become records, never exceptions.

    A multi-GPU configuration runs in every process torchrun started, one rank each: the record is
    this rank's (`rank`, `world_size`), its peaks measured on its own device (or, on the CPU, by its
    own live-bytes meter).
    """
    from memplan import distributed

    t0 = time.time()
    device = torch.device(settings["device"])
    rec: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))}
    if device.type == "cuda" and cuda_in_bad_fork():
        return {**rec, "status": "error", "isolation_failed": True,
                "error": "CUDA was initialised in the fork server; rerun with --isolation spawn"}
    config = Config(**job["config"])
    sharded = distributed.layout(config) is not distributed.Sharding.NONE
    ranks = rank_of_env()
    if sharded:
        why = distributed.measure_refusal(config, ranks)
        if why:
            return {**rec, "status": "error", "error": why}
        rank, world, local = ranks
        rec.update(rank=rank, world_size=world)
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                return {**rec, "status": "error", "error": f"--num-gpus {world} on one machine needs {world} GPUs; "
                        f"this one has {torch.cuda.device_count()}"}
            device = torch.device("cuda", local)
    meter: Meter = CudaMeter(device) if device.type == "cuda" else \
        CpuMeter(settings.get("cpu_cap_bytes"), distributed=sharded)
    try:
        with contextlib.ExitStack() as stack:
            mesh = None
            if sharded:
                stack.enter_context(distributed.process_group(device))
                # The rank mesh, a host tensor on any device, is made before the meter counts.
                mesh = _compat.device_mesh(device.type, config.num_gpus)
            stack.enter_context(meter)
            if sharded and isinstance(meter, CpuMeter):
                stack.enter_context(distributed.watched(meter))
            rec.update(_run_one(config, job["model_config"], device, meter, warmup_steps=settings["warmup_steps"],
                                measured_steps=settings["measured_steps"], seed=settings.get("seed", 0), mesh=mesh))
        rec["status"] = "ok"
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", oom_phase=meter.current_phase.value, error=one_line(e, limit=500, with_type=True))
    except Exception as e:
        if "out of memory" in str(e):  # an OOM some layer re-raised as another type (e.g. MemplanError)
            rec.update(status="oom", oom_phase=meter.current_phase.value, error=one_line(e, limit=500, with_type=True))
        else:
            rec.update(status="error", error=one_line(e, limit=500, with_type=True), traceback=traceback.format_exc()[-2000:])
    readings = meter.readings()
    if rec["status"] == "ok":
        rec.update(readings)
        rec["peak_phase"] = max(readings["phases"], key=readings["phases"].get) if readings["phases"] else None
    else:  # how far it got: kept apart, so nobody reads it as a measured peak
        rec["reached_allocated_bytes"] = readings["peak_allocated_bytes"]
    rec["meter"] = meter.name
    rec["env"] = environment(device)
    rec["wall_s"] = round(time.time() - t0, 3)
    return rec


def _child(request: dict) -> None:
    """In a forked child: output to the log, stdin closed, the record to the result file; never returns."""
    code = 0
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        rec = run_job(request["job"], request["settings"])
        with open(request["result_path"], "w") as f:
            json.dump(rec, f)
    except BaseException:  # pragma: no cover - run_job turns step failures into records
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The fork server: imports once, then forks one fresh child per request line on stdin.

    It never touches CUDA, so each child makes its own context. Protocol: a request
    `{"job", "settings", "result_path", "log_path", "timeout_s"}` per line in; a reply
    `{"exit_code", "timed_out"}` per line out, once the child is gone. EOF on stdin: exit.
    """
    from memplan import steps  # noqa: F401  (imports transformers and peft)

    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol pipe
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + float(request["timeout_s"])
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        out.write(json.dumps({"exit_code": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
        out.flush()


def rank_main(request_path: str) -> None:
    """One rank under torchrun: each job of `request_path` in turn (a process group each), this rank's
    records to `<result_dir>/rank<RANK>.json` (a list) and its output to `rank<RANK>.log` beside it.
    The runner sends one job per launch (a fresh process per configuration, as on one GPU); a list
    of jobs saves the start-up of torch where the CPU meter, which starts empty per job, allows it."""
    request = json.loads(Path(request_path).read_text())
    rank = os.environ["RANK"]  # set by torchrun
    out = Path(request["result_dir"])
    log = os.open(out / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    recs = [run_job(job, request["settings"]) for job in request["jobs"]]
    tmp = out / f"rank{rank}.json.part"
    tmp.write_text(json.dumps(recs))
    tmp.replace(out / f"rank{rank}.json")


def main() -> None:
    """`python -m memplan.calibration.worker`: one job from stdin, one record line on stdout;
    with `--serve`, the fork server; with `--rank REQUEST`, one rank of a torchrun launch."""
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    if sys.argv[1:2] == ["--rank"] and len(sys.argv) == 3:
        rank_main(sys.argv[2])
        return
    request = json.loads(sys.stdin.read())
    rec = run_job(request["job"], request["settings"])
    sys.stdout.write(MARKER + json.dumps(rec) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
