"""The parent: measure every configuration of a grid in its own fresh process, recording as it goes.

Isolation. Each configuration runs in a new process, so its CUDA context and caching allocator start
empty and nothing one configuration left behind inflates the next one's reserved bytes.
- `fork` (default): children are forked from a server (`worker.serve`) that has imported torch and
  transformers but never touched CUDA, so each child still creates its own context; it saves the
  ~5-10 s import per configuration. (Not multiprocessing's forkserver: its children re-import the
  parent's `__main__`, which for `memplan` is the CLI itself.) A child that finds CUDA already
  initialised says so, and the runner falls back on `spawn` for the rest of the grid.
- `spawn`: `python -m memplan.calibration.worker` per configuration; slower, nothing shared.

Resume. A record's key hashes the configuration, the measurement settings and the device, so a
rerun skips what a killed run already recorded (ok or out of memory) and loses at most the
configuration that was in flight; errors and timeouts are retried.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memplan.calibration import grid as grid_mod
from memplan import distributed
from memplan.calibration import records
from memplan.errors import MemplanError

FINAL = ("ok", "oom")  # statuses that are results; others are retried on resume
ISOLATIONS = ("fork", "spawn")
WORKER = ("-m", "memplan.calibration.worker")  # how to start a worker or the fork server: python WORKER...
TEMP_PREFIX = "memplan-calibrate-"  # the fork server's folder: memplan-calibrate-<runner pid>-XXXX


@dataclass
class Event:
    """What the runner tells its caller: a configuration starts or ends."""

    kind: str  # start | done
    index: int  # 1-based among the configurations this run measures
    total: int
    job: grid_mod.Job
    record: dict | None = None


@dataclass
class Summary:
    """Outcome of one run over a grid."""

    out: Path
    device: str
    total: int  # configurations in the grid
    skipped: int  # already recorded before this run
    busy: int = 0  # being measured by another run on the same file
    statuses: dict[str, int] = field(default_factory=dict)  # of the records this run wrote
    left: int = 0  # not measured because the time budget ran out

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in FINAL)


def resolve_device(requested: str) -> tuple[str, str]:
    """(torch device, identity for the record key): cuda where NVML sees a GPU (auto), else cpu."""
    from memplan.hardware import detect

    if requested == "cpu":
        return "cpu", "cpu"
    gpus = detect()
    if not gpus:
        if requested == "cuda":
            raise MemplanError("device cuda: NVML finds no NVIDIA GPU here; use `--device cpu` for the live-bytes meter")
        return "cpu", "cpu"
    return "cuda", f"cuda:{gpus[0].display}:{gpus[0].total_bytes}"


def settings_of(grid: grid_mod.Grid, device: str) -> dict:
    """What the worker needs besides the configuration; all of it but the timeout is in the key."""
    out = {"device": device, "warmup_steps": grid.warmup_steps, "measured_steps": grid.measured_steps,
           "seed": grid.seed}
    if device == "cpu":
        out["cpu_cap_bytes"] = grid.cpu_cap_bytes
    return out


def run_key(job: grid_mod.Job, settings: dict, device_id: str) -> str:
    return grid_mod.stable_hash({"config_key": job.config_key, "settings": settings, "device": device_id})


def default_out(grid: grid_mod.Grid, root: str | Path = "calibration/data") -> Path:
    return Path(root) / f"{grid.name}.jsonl"


def _worker_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


class _ForkExecutor:
    """Children forked from a preloaded server (`worker.serve`); each a fresh process, own CUDA context."""

    def __init__(self):
        env = _worker_env()
        # The server must never initialise CUDA: should an import ask whether CUDA is there, torch
        # answers through NVML instead of cuInit.
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        remove_stale_temp()
        self.dir = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-")
        atexit.register(shutil.rmtree, self.dir, True)  # should close() never run
        self.server = subprocess.Popen([sys.executable, *WORKER, "--serve"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                       stderr=open(os.path.join(self.dir, "server.log"), "w"))

    def run(self, job: dict, settings: dict, timeout_s: float) -> dict:
        result = os.path.join(self.dir, "record.json")
        log = os.path.join(self.dir, "child.log")
        for path in (result, log):
            if os.path.exists(path):
                os.unlink(path)
        request = {"job": job, "settings": settings, "result_path": result, "log_path": log, "timeout_s": timeout_s}
        try:
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            reply = self.server.stdout.readline()
        except (BrokenPipeError, OSError):
            reply = ""
        if not reply:
            return {"status": "error", "error": "fork server died", "log_tail": _tail(os.path.join(self.dir, "server.log"))}
        reply = json.loads(reply)
        if reply["timed_out"]:
            return {"status": "timeout", "error": f"no record within {timeout_s:g} s", "log_tail": _tail(log)}
        try:
            return json.loads(Path(result).read_text())
        except (OSError, ValueError):
            return {"status": "error", "error": f"worker exited with code {reply['exit_code']} without a record",
                    "log_tail": _tail(log)}

    def close(self) -> None:
        try:
            self.server.stdin.close()
            self.server.wait(10)
        except Exception:
            self.server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class _SpawnExecutor:
    """`python -m memplan.calibration.worker` per configuration: nothing shared but the files."""

    def run(self, job: dict, settings: dict, timeout_s: float) -> dict:
        from memplan.calibration.worker import MARKER

        env = _worker_env()
        try:
            done = subprocess.run([sys.executable, *WORKER],
                                  input=json.dumps({"job": job, "settings": settings}), capture_output=True,
                                  text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"no record within {timeout_s:g} s"}
        for line in reversed(done.stdout.splitlines()):
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER):])
        return {"status": "error", "error": f"worker exited with code {done.returncode} without a record",
                "log_tail": done.stderr[-2000:]}

    def close(self) -> None:
        pass



class _TorchrunExecutor:
    """A multi-GPU configuration: `torchrun --standalone --nproc-per-node N`, one worker per rank,
    each writing its own record (its rank, the world size, its own peaks). `--standalone` picks a
    free port for the rendezvous, so runs side by side do not collide."""

    def run(self, job: dict, settings: dict, timeout_s: float, nproc: int) -> list[dict]:
        import signal

        with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX + "ranks-") as d:
            request = Path(d) / "request.json"
            request.write_text(json.dumps({"jobs": [job], "settings": settings, "result_dir": d}))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   *WORKER, "--rank", str(request)]
            env = {**_worker_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    start_new_session=True)
            try:
                output, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
                output, _ = proc.communicate()
                return [{"status": "timeout", "error": f"no records from {nproc} ranks within {timeout_s:g} s",
                         "world_size": nproc, "log_tail": (output or "")[-2000:]}]
            recs = []
            for rank in range(nproc):
                try:
                    recs.append(json.loads((Path(d) / f"rank{rank}.json").read_text())[0])
                except (OSError, ValueError):
                    tail = _tail(str(Path(d) / f"rank{rank}.log")) or (output or "")[-2000:]
                    return [{"status": "error", "world_size": nproc,
                             "error": f"torchrun exited with code {proc.returncode}; rank {rank} left no record",
                             "log_tail": tail}]
            return recs

    def close(self) -> None:
        pass


def rank_key(key: str, rank: int) -> str:
    """The record key of one rank: rank 0 keeps the configuration's key (so resume sees it)."""
    return key if rank == 0 else grid_mod.stable_hash({"key": key, "rank": rank})


def remove_stale_temp() -> None:
    """Remove the fork-server folders of runs that died without cleaning up (killed: no `finally`)."""
    for d in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        pid = d.name[len(TEMP_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_limits(*, cpu_cap_bytes: int | None = None, timeout_s: float | None = None,
                 budget_s: float | None = None, isolation: str = "fork") -> None:
    """Bad limits and isolations are bad input, found before anything starts."""
    if isolation not in ISOLATIONS:
        raise MemplanError(f"unknown isolation {isolation!r}; valid: {', '.join(ISOLATIONS)}")
    for flag, value, least in (("--cpu-cap-bytes", cpu_cap_bytes, 1), ("--timeout-s", timeout_s, None),
                               ("--budget-s", budget_s, 0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise MemplanError(f"{flag}: expected a number, got {value!r}")
        if (least is None and value <= 0) or (least is not None and value < least):
            need = "above 0" if least is None else f"at least {least}"
            raise MemplanError(f"{flag}: must be {need}, got {value:g}")


def check_out(out: Path) -> None:
    """The records file must be a file in an existing folder (memplan creates only its default folder)."""
    if out.is_dir():
        raise MemplanError(f"{out}: is a directory; name a records file (.jsonl)")
    if not out.parent.is_dir():
        raise MemplanError(f"{out}: no such folder {str(out.parent)!r}")


def _tail(path: str, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run(grid: grid_mod.Grid, *, out: str | Path | None = None, device: str | None = None,
        cpu_cap_bytes: int | None = None, timeout_s: float | None = None, budget_s: float | None = None,
        isolation: str = "fork", on_event: Callable[[Event], None] | None = None) -> Summary:
    """Measure every configuration of `grid` not yet in `out`; append one record per configuration."""
    check_limits(cpu_cap_bytes=cpu_cap_bytes, timeout_s=timeout_s, budget_s=budget_s, isolation=isolation)
    if cpu_cap_bytes is not None:
        grid = grid.model_copy(update={"cpu_cap_bytes": cpu_cap_bytes})
    jobs = grid_mod.jobs(grid)
    dev, device_id = resolve_device(device or grid.device)
    settings = settings_of(grid, dev)
    if out is None:
        out = default_out(grid)
        out.parent.mkdir(parents=True, exist_ok=True)  # memplan's own default folder
    out = Path(out)
    check_out(out)
    finished = _finished(records.read(out))
    keyed = [(run_key(j, settings, device_id), j) for j in jobs]
    pending = [(k, j) for k, j in keyed if k not in finished]
    summary = Summary(out=out, device=device_id, total=len(jobs), skipped=len(jobs) - len(pending))
    claims = records.Claims(out) if pending else None
    executor = _ForkExecutor() if isolation == "fork" and pending else _SpawnExecutor()
    t0 = time.monotonic()
    try:
        for i, (key, job) in enumerate(pending, 1):
            if budget_s is not None and time.monotonic() - t0 > budget_s:
                summary.left = len(pending) - i + 1
                break
            # Another run on the same file may be measuring this configuration, or have finished it.
            if not claims.take(key):
                summary.busy += 1
                continue
            if key in _finished(claims.records()):
                claims.release(key)
                summary.skipped += 1
                continue
            if on_event:
                on_event(Event("start", i, len(pending), job))
            payload = job.to_dict()
            if distributed.layout(job.config) is not distributed.Sharding.NONE:  # one process per rank
                results = _TorchrunExecutor().run(payload, settings, timeout_s or grid.timeout_s, job.config.num_gpus)
                isolation = "torchrun"
            else:
                result = executor.run(payload, settings, timeout_s or grid.timeout_s)
                if result.get("isolation_failed") or result.get("error") == "fork server died":
                    executor.close()  # CUDA leaked into the server, or it died: a fresh python per config
                    executor = _SpawnExecutor()
                    result = executor.run(payload, settings, timeout_s or grid.timeout_s)
                results = [result]
                isolation = "spawn" if isinstance(executor, _SpawnExecutor) else "fork"
            recs = [{"schema": records.SCHEMA, "key": rank_key(key, result.get("rank", 0)), "tier": "measured",
                     "grid": grid.name, "device_id": device_id, "settings": settings, "isolation": isolation,
                     "world_size": job.config.num_gpus, "rank": 0, **payload, **result} for result in results]
            records.append(out, *recs)  # (closing the file drops this run's claims: the results are in)
            rec = recs[0]  # rank 0's (or the one error of a failed launch)
            summary.statuses[rec["status"]] = summary.statuses.get(rec["status"], 0) + 1
            if on_event:
                on_event(Event("done", i, len(pending), job, rec))
    finally:
        executor.close()
        if claims is not None:
            claims.close()
    return summary


def _finished(recs: list[dict]) -> set[str]:
    """Keys with a result (ok or out of memory)."""
    return {r["key"] for r in recs if r.get("status") in FINAL and isinstance(r.get("key"), str)}
