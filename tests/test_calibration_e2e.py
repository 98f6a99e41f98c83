"""The whole CPU flow: grid -> fresh processes -> records -> kill -> resume -> out of memory -> fit -> report."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from memplan.calibration import grid, records, runner  # noqa: E402
from memplan.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLOW_CALIBRATE = Path(__file__).with_name("slow_calibrate.py")
pytestmark = pytest.mark.slow


def _wait_for_records(path: Path, n: int, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(records.read(path)) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError(f"no record in {path} within {timeout_s} s")


def test_killed_run_resumes_and_the_flow_ends_in_a_report(tiny_grid, tmp_path):
    out = tmp_path / "data" / "tiny.jsonl"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The runner in its own session, so the kill reaches it, its fork server and the child in flight;
    # its workers wait 1 s before each measurement, so the kill lands mid-grid.
    proc = subprocess.Popen([sys.executable, str(SLOW_CALIBRATE), "1", "calibrate", "--grid", str(tiny_grid),
                             "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_records(out, 1, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = records.read(out)
    assert 1 <= len(first) < 5  # killed mid-grid; the config in flight is lost
    with open(out, "ab") as f:  # and as if the kill had landed in the middle of a write
        f.write(b'{"key": "torn", "status": "o')

    result = CliRunner().invoke(app, ["calibrate", "--grid", str(tiny_grid), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{len(first)} already recorded" in result.output
    killed = list(Path(tempfile.gettempdir()).glob(f"{runner.TEMP_PREFIX}{proc.pid}-*"))
    assert killed == []  # the killed run's fork-server folder went with the next run's start
    recs = records.read(out)
    assert recs[: len(first)] == first  # what was recorded stays, byte for byte
    assert len(recs) == 5 and len({r["key"] for r in recs}) == 5  # each config once, the torn line gone
    by = {(r["config"]["method"], r["config"]["batch"]): r for r in recs}
    assert by[("fo-adam", 64)]["status"] == "oom"  # past the 4 MB simulated card
    assert "simulated out of memory" in by[("fo-adam", 64)]["error"]
    assert all(r["status"] == "ok" for k, r in by.items() if k != ("fo-adam", 64))
    assert all(r["isolation"] == "fork" and r["meter"] == "cpu-live-bytes" for r in recs)

    # A third run has nothing to do.
    again = runner.run(grid.load(tiny_grid), out=out)
    assert again.skipped == 5 and again.statuses == {}

    corr, pkg = tmp_path / "corrections.json", tmp_path / "pkg.json"
    result = CliRunner().invoke(app, ["calibrate", "fit", "--data", str(out.parent), "--out", str(corr),
                                      "--package-copy", str(pkg), "--include-cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(corr.read_text())["families"]["cpu"]["records"] == 4
    md = tmp_path / "REPORT.md"
    result = CliRunner().invoke(app, ["calibrate", "report", "--data", str(out.parent), "--corrections", str(corr),
                                      "--out", str(md), "--chart", str(tmp_path / "estimate-vs-measured.png")])
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "| tiny-opt fo-adam ft fp32 b64 s16 sdpa | **oom** |" in text
    assert "| predicted not to fit | 0 | 1 |" in text  # the analytic tier saw the OOM coming
    assert (tmp_path / "estimate-vs-measured.png").is_file()


def test_spawn_isolation_and_timeouts_are_retried(tmp_path, monkeypatch):
    g = tmp_path / "one.yaml"
    g.write_text((Path(__file__).with_name("data") / "tiny-grid.yaml").read_text().split("configs:")[0]
                 + "configs:\n  - {method: zo-sgd, batch: 2}\n")
    out = tmp_path / "one.jsonl"
    monkeypatch.setattr(runner, "WORKER", (str(Path(__file__).with_name("slow_worker.py")), "30"))
    s = runner.run(grid.load(g), out=out, isolation="spawn", timeout_s=1)
    assert s.statuses == {"timeout": 1} and s.errors == 1
    monkeypatch.undo()
    s = runner.run(grid.load(g), out=out, isolation="spawn")  # a timeout is not a result: measured again
    assert s.statuses == {"ok": 1} and s.skipped == 0
    last = records.read(out)[-1]
    assert last["isolation"] == "spawn" and last["status"] == "ok" and last["peak_allocated_bytes"] > 0
