"""Calibration on bad input: junk records, damaged corrections, bad limits, shared files, killed runs."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calib_records import GIB, MIB, cuda_record
from memplan import corrections
from memplan.calibration import fitting, grid, records, runner
from memplan.cli import app

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _lines(tmp_path, *recs, raw: bytes = b"") -> Path:
    f = tmp_path / "r.jsonl"
    f.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in recs) + raw)
    return f


# ---- K1, K2: records are validated before they are fitted ---------------------------------------

def test_k1_negative_context_is_refused_not_fitted(tmp_path):
    bad = _lines(tmp_path, {"status": "ok", "meter": "cuda", "env": {"family": "hopper"},
                            "context_bytes": -99999999999})
    out = invoke("calibrate", "fit", "--data", bad, "--out", tmp_path / "c.json")
    assert out.exit_code == 2 and not (tmp_path / "c.json").exists()
    assert "skipped 1 invalid record (first: peak_allocated_bytes is None" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("memplan: error: no valid measured records")


def test_k1_status_and_meter_alone_are_not_a_measurement(tmp_path):
    bad = _lines(tmp_path, {"status": "ok", "meter": "cuda"}, {"status": "fine", "meter": "cuda"},
                 {"status": "ok", "meter": "abacus", "peak_allocated_bytes": 1})
    out = invoke("calibrate", "fit", "--data", bad, "--out", tmp_path / "c.json", "--include-cpu")
    assert out.exit_code == 2 and "skipped 3 invalid records" in out.stderr


def test_k1_valid_records_fit_and_invalid_ones_are_counted(tmp_path):
    good = [cuda_record(k, allocated=2 * GIB, reserved=2 * GIB + 100 * MIB, context=500 * MIB) for k in "abc"]
    f = _lines(tmp_path, *good, {"status": "ok", "meter": "cuda", "peak_allocated_bytes": -5,
                                 "peak_reserved_bytes": 5})
    c = tmp_path / "c.json"
    out = invoke("calibrate", "fit", "--data", f, "--out", c)
    assert out.exit_code == 0, out.output
    assert "skipped 1 invalid record (first: peak_allocated_bytes is -5" in out.stderr
    assert json.loads(c.read_text())["families"]["hopper"]["records"] == 3


def test_k1_implausible_fit_is_not_written():
    recs = [cuda_record(k, allocated=2 * GIB, reserved=5 * GIB, context=500 * MIB) for k in "ab"]  # slack 1.5
    warnings = []
    doc, _ = fitting.fit(recs, warnings=warnings)
    assert doc["families"] == {} and "hopper: not fitted: allocator_slack 1.5 outside [0.0, 1.0]" in warnings[0]


@pytest.mark.parametrize("field, value", [("peak_allocated_bytes", "lots"), ("peak_reserved_bytes", [1]),
                                          ("context_bytes", "big"), ("workspace_bytes", 1.5),
                                          ("env", "hopper"), ("peak_allocated_bytes", True)])
def test_k2_wrong_types_never_crash(tmp_path, field, value):
    rec = cuda_record("a", allocated=2 * GIB, reserved=2 * GIB, context=500 * MIB)
    rec[field] = value
    out = invoke("calibrate", "fit", "--data", _lines(tmp_path, rec), "--out", tmp_path / "c.json")
    assert out.exit_code == 2 and isinstance(out.exception, SystemExit)
    assert f"first: {field}" in out.stderr or "first: env" in out.stderr


# ---- K7: damaged lines in the middle are reported ------------------------------------------------

def test_k7_damaged_lines_are_reported_with_their_numbers(tmp_path):
    good = [cuda_record(k, allocated=2 * GIB, reserved=2 * GIB, context=500 * MIB) for k in "abcd"]
    text = "\n".join(json.dumps(r) for r in good).split("\n")
    text.insert(1, '{"key": "torn", "status": "o')  # line 2: torn in the middle
    text[3] = '{"key": "x", "st' + text[3]  # line 4: a torn line glued to the next record
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(text) + "\n" + '{"key": "tail"')  # and a torn tail: expected after a kill
    out = invoke("calibrate", "fit", "--data", f, "--out", tmp_path / "c.json")
    assert out.exit_code == 0, out.output
    assert f"memplan: warning: {f}: 2 damaged lines skipped (lines 2, 4)" in out.stderr
    out = invoke("calibrate", "report", "--data", f, "--out", tmp_path / "R.md", "--no-chart")
    assert out.exit_code == 0 and "2 damaged lines skipped (lines 2, 4)" in out.stderr


# ---- K3, K4: corrections are validated on load and live outside the package ---------------------

@pytest.mark.parametrize("text", ['{"families": {"hopper": ', '{"families":{"hopper":{"context_bytes":"big"}}}',
                                  '[1, 2]', '{"families":{"hopper":{"allocator_slack":-1}}}'])
def test_k3_damaged_corrections_never_break_fit(tmp_path, monkeypatch, text):
    path = tmp_path / "corrections.json"
    path.write_text(text)
    monkeypatch.setenv(corrections.ENV, str(path))
    corrections.reload()
    done = subprocess.run([sys.executable, "-m", "memplan", "fit", "opt-13b", "--gpu", "h100", "-m", "zo-sgd",
                           "--json"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"memplan: warning: {path}: ")
    assert json.loads(done.stdout)["estimates"][0]["peak_device_bytes"] > 0


def test_k4_fit_writes_only_the_asked_file_unless_activated(tmp_path, monkeypatch):
    data = _lines(tmp_path, *[cuda_record(k, allocated=2 * GIB, reserved=2 * GIB, context=500 * MIB) for k in "ab"])
    user = tmp_path / "config" / "memplan" / "corrections.json"
    monkeypatch.delenv(corrections.ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    before = corrections.PACKAGED.exists()
    out = invoke("calibrate", "fit", "--data", data, "--out", tmp_path / "c.json")
    assert out.exit_code == 0 and out.stdout.splitlines()[-1] == f"wrote {tmp_path / 'c.json'}"
    assert not user.exists() and corrections.PACKAGED.exists() == before
    assert corrections.active_path() in (None, corrections.PACKAGED)
    out = invoke("calibrate", "fit", "--data", data, "--out", tmp_path / "c.json", "--activate")
    assert out.exit_code == 0 and user.read_text() == (tmp_path / "c.json").read_text()
    assert corrections.active_path() == user and corrections.for_family("hopper")["context_bytes"] == 500 * MIB
    assert corrections.PACKAGED.exists() == before


def test_k4_env_path_wins_and_its_folder_is_not_created(tmp_path, monkeypatch):
    data = _lines(tmp_path, cuda_record("a", allocated=2 * GIB, reserved=2 * GIB, context=500 * MIB))
    monkeypatch.setenv(corrections.ENV, str(tmp_path / "no" / "c.json"))
    out = invoke("calibrate", "fit", "--data", data, "--out", tmp_path / "c.json", "--activate")
    assert out.exit_code == 2 and "no such folder" in out.stderr and not (tmp_path / "no").exists()


# ---- K5: the report's chart goes beside the report ------------------------------------------------

def test_k5_chart_beside_the_report_and_linked_relatively(tmp_path, monkeypatch):
    data = _lines(tmp_path, cuda_record("a", allocated=2 * GIB, reserved=2 * GIB, context=500 * MIB))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (tmp_path / "asked").mkdir()
    monkeypatch.chdir(cwd)
    md = tmp_path / "asked" / "REPORT.md"
    out = invoke("calibrate", "report", "--data", data, "--out", md)
    assert out.exit_code == 0, out.output
    assert (tmp_path / "asked" / "estimate-vs-measured.png").is_file() and list(cwd.iterdir()) == []
    assert "![estimate against measurement](estimate-vs-measured.png)" in md.read_text()


# ---- K9, K10: limits and options are checked before anything starts -------------------------------

@pytest.mark.parametrize("args, match", [
    (["--budget-s", "-1"], "--budget-s: must be at least 0, got -1"),
    (["--cpu-cap-bytes", "-5"], "--cpu-cap-bytes: must be at least 1, got -5"),
    (["--timeout-s", "0"], "--timeout-s: must be above 0, got 0"),
    (["--isolation", "thread"], "unknown isolation 'thread'; valid: fork, spawn"),
])
def test_k9_k10_bad_options_are_one_line_before_any_bar(tiny_grid, tmp_path, args, match):
    out = invoke("calibrate", "--grid", tiny_grid, "--out", tmp_path / "r.jsonl", *args)
    assert out.exit_code == 2 and out.stdout == ""
    assert out.stderr == f"memplan: error: {match}\n"
    assert not (tmp_path / "r.jsonl").exists()


def test_runner_refuses_a_missing_records_folder(tiny_grid, tmp_path):
    with pytest.raises(Exception, match="no such folder"):
        runner.run(grid.load(tiny_grid), out=tmp_path / "no" / "r.jsonl")
    assert not (tmp_path / "no").exists()


# ---- K6: runs sharing a file claim each configuration ---------------------------------------------

_HOLD = """
import sys, time
from memplan.calibration import records
c = records.Claims(sys.argv[1])
print(c.take(sys.argv[2]), flush=True)
time.sleep(60)
"""


def _holder(path, key):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), key], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "True"
    return p


def test_k6_a_claimed_config_is_left_to_its_run_and_a_dead_claim_is_free(tmp_path):
    f = tmp_path / "r.jsonl"
    other = _holder(f, "k1")
    try:
        mine = records.Claims(f)
        assert not mine.take("k1") and mine.take("k2")
    finally:
        other.kill()
        other.wait()
    assert mine.take("k1")  # the holder died: its claim went with it
    mine.close()


class _FakeExecutor:
    measured: list = []

    def run(self, job, settings, timeout_s):
        _FakeExecutor.measured.append(job["config_key"])
        return {"status": "ok", "meter": "cpu-live-bytes", "peak_allocated_bytes": 1}

    def close(self):
        pass


def test_k6_runner_skips_configs_another_run_is_measuring(tiny_grid, tmp_path, monkeypatch):
    g = grid.load(tiny_grid)
    jobs = grid.jobs(g)
    settings = runner.settings_of(g, "cpu")
    busy = runner.run_key(jobs[0], settings, "cpu")
    out = tmp_path / "r.jsonl"
    monkeypatch.setattr(runner, "_SpawnExecutor", _FakeExecutor)
    _FakeExecutor.measured = []
    other = _holder(out, busy)
    try:
        s = runner.run(g, out=out, device="cpu", isolation="spawn")
    finally:
        other.kill()
        other.wait()
    assert s.busy == 1 and s.statuses == {"ok": len(jobs) - 1}
    assert jobs[0].config_key not in _FakeExecutor.measured
    s = runner.run(g, out=out, device="cpu", isolation="spawn")  # the claim died with its run: measured now
    assert s.skipped == len(jobs) - 1 and s.statuses == {"ok": 1}
    assert len({r["key"] for r in records.read(out)}) == len(records.read(out)) == len(jobs)


def test_k6_a_config_finished_by_another_run_meanwhile_is_not_measured_again(tiny_grid, tmp_path, monkeypatch):
    g = grid.load(tiny_grid)
    jobs = grid.jobs(g)
    settings = runner.settings_of(g, "cpu")
    out = tmp_path / "r.jsonl"
    out.touch()
    real = records.read

    def read_then_other_finishes(path, damaged=None):  # the other run finishes job 0 right after our start
        recs = real(path, damaged)
        records.append(out, {"key": runner.run_key(jobs[0], settings, "cpu"), "status": "ok"})
        return recs

    monkeypatch.setattr(runner.records, "read", read_then_other_finishes)
    monkeypatch.setattr(runner, "_SpawnExecutor", _FakeExecutor)
    _FakeExecutor.measured = []
    s = runner.run(g, out=out, device="cpu", isolation="spawn")
    assert jobs[0].config_key not in _FakeExecutor.measured and s.skipped == 1


# ---- K8: no temp folders of dead runs are left -----------------------------------------------------

def test_k8_stale_temp_folders_of_dead_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{runner.TEMP_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{runner.TEMP_PREFIX}{os.getpid()}-def"
    for d in (stale, live):
        d.mkdir()
        (d / "server.log").write_text("x")
    runner.remove_stale_temp()
    assert not stale.exists() and live.exists()


# ---- T4: what did not run goes to stderr; S1: no test hook in the worker -----------------------------

def test_t4_oom_lines_go_to_stderr(tiny_grid, tmp_path, monkeypatch):
    class Oom(_FakeExecutor):
        def run(self, job, settings, timeout_s):
            return {"status": "oom", "meter": "cpu-live-bytes", "error": "simulated out of memory [x]"}

    monkeypatch.setattr(runner, "_SpawnExecutor", Oom)
    out = invoke("calibrate", "--grid", tiny_grid, "--out", tmp_path / "r.jsonl", "--isolation", "spawn")
    assert out.exit_code == 0, out.output
    assert "simulated" not in out.stdout and out.stderr.count("simulated out of memory [x]") == 5
    assert "0 already recorded; 5 oom" in out.stdout


def test_s1_worker_reads_no_test_hook():
    src = (ROOT / "memplan" / "calibration" / "worker.py").read_text()
    assert "DELAY" not in src and "os.environ.get(" not in src
