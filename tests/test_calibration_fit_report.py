"""Fitting the corrections and writing the report, on synthetic CUDA-shaped records."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from calib_records import GIB, MIB, cuda_record
from memplan import api, corrections
from memplan.calibration import fitting, records, report
from memplan.cli import app
from memplan.hardware import get_gpu
from memplan.options import Config


def fit_records():
    return [
        # slack = extra / allocated: 100/2048 = 0.048828125, 400/4096 = 0.09765625, 256/8192 = 0.03125
        cuda_record("a", allocated=2 * GIB, reserved=2 * GIB + 100 * MIB, context=500 * MIB),
        cuda_record("b", allocated=4 * GIB, reserved=4 * GIB + 400 * MIB, context=520 * MIB),
        cuda_record("c", allocated=8 * GIB, reserved=8 * GIB + 256 * MIB, context=510 * MIB),
        # below 1 GiB: segment rounding, not slack (20/10 - 1 = 1.0 would swamp the median) -> left out
        cuda_record("d", allocated=10 * MIB, reserved=20 * MIB, context=530 * MIB),
        cuda_record("e", status="oom"),  # ran out of memory: no overheads to read
    ]


def test_fit_takes_medians_per_family():
    doc, notes = fitting.fit(fit_records())
    h = doc["families"]["hopper"]
    assert h["allocator_slack"] == 0.0488  # median(0.0312, 0.0488, 0.0977), 4 decimals
    assert h["context_bytes"] == 515 * MIB  # median(500, 510, 520, 530) MiB = (510 + 520) / 2
    assert h["cublas_workspace_bytes"] == 32 * MIB
    assert h["records"] == 4 and h["slack_records"] == 3
    assert h["context_bytes_range"] == [500 * MIB, 530 * MIB]
    assert h["source"].startswith("memplan calibrate fit: 4 measured records on NVIDIA H100 80GB HBM3")


def test_fit_skips_cpu_records_unless_asked():
    cpu = {"key": "z", "tier": "measured", "status": "ok", "meter": "cpu-live-bytes", "env": {"family": "cpu"},
           "peak_allocated_bytes": 1000, "peak_reserved_bytes": None}
    doc, notes = fitting.fit([cpu])
    assert doc["families"] == {} and "skipped 1 CPU-meter records" in notes[0]
    doc, _ = fitting.fit([cpu], include_cpu=True)
    assert doc["families"]["cpu"]["allocator_slack"] == 0.0 and doc["families"]["cpu"]["context_bytes"] == 0


def test_analytic_applies_the_correction_and_fit_names_it(package_corrections):
    cfg = Config(model="opt-125m", method="fo-adam", batch=1, seq=128)  # peak at the step: workspace counts
    gpu = get_gpu("h100-80gb")
    raw = api.estimate_config(cfg, gpu, search=False)
    assert raw.correction is None
    package_corrections.write_text(json.dumps({"families": {"hopper": {
        "context_bytes": 1 * GIB, "allocator_slack": 0.0, "cublas_workspace_bytes": 0, "source": "test run X"}}}))
    corrections.reload()
    est = api.estimate_config(cfg, gpu, search=False)
    assert est.correction == "test run X"
    # context replaced; workspace dropped from allocated; no slack: reserved = allocated rounded to 2 MiB
    assert est.peak_device_bytes - est.peak_reserved_bytes == 1 * GIB
    # hopper's 32 MiB workspace per cuBLAS handle, two handles once backward has run: 2 * 33554432 gone
    assert est.peak_allocated_bytes == raw.peak_allocated_bytes - 2 * 33554432
    out = CliRunner().invoke(app, ["fit", "opt-125m", "--gpu", "h100-80gb", "--seq", "128", "-m", "fo-adam"])
    assert out.exit_code == 0
    assert "overheads corrected by calibration: test run X" in out.output


def report_records():
    tiny_total = 100 * MIB  # below the CUDA context alone: predicted not to fit
    recs = [
        cuda_record("ok-big", allocated=3 * MIB, reserved=4 * MIB, context=500 * MIB),
        cuda_record("oom-big", method="fo-adam", status="oom"),
        cuda_record("ok-tiny", method="zo-adam", allocated=3 * MIB, reserved=4 * MIB, context=500 * MIB,
                    total=tiny_total),
        cuda_record("oom-tiny", method="fo-sgd", status="oom", total=tiny_total),
    ]
    trace = {"tier": "trace", "config_key": recs[0]["config_key"], "peak_allocated_bytes": 3 * MIB}
    return recs + [trace]


def test_rows_errors_and_boundary():
    fitted = {"hopper": {"context_bytes": 500 * MIB, "allocator_slack": 0.0, "cublas_workspace_bytes": 0,
                         "source": "s"}}
    rs = report.rows(report_records(), fitted)
    assert [r.key for r in rs] == ["oom-tiny", "oom-big", "ok-big", "ok-tiny"]  # fo-sgd, fo-adam, zo-sgd, zo-adam
    ok = rs[2]
    est = ok.estimates["corrected"]["device"]
    assert ok.err("corrected") == (est - (4 + 500) * MIB) / ((4 + 500) * MIB)
    assert ok.estimates["trace"] == {"allocated": 3 * MIB}
    assert ok.err("trace", "allocated") == 0.0
    b = report.boundary(rs)
    assert b.tier == "corrected"
    assert [r.key for r in b.both_fit] == ["ok-big"]
    assert [r.key for r in b.false_fit] == ["oom-big"]
    assert [r.key for r in b.false_no_fit] == ["ok-tiny"]
    assert [r.key for r in b.both_no_fit] == ["oom-tiny"]
    stats = {(s.method, s.tier, s.view): s for s in report.error_stats(rs)}
    assert stats[("zo-sgd", "trace", "allocated")].median_abs == 0.0
    assert ("fo-adam", "analytic", "device") not in stats  # out of memory: no measurement to compare


def test_markdown_and_chart_are_deterministic(tmp_path):
    recs = report_records()
    md = report.markdown(recs, {}, chart="chart.png")
    assert md == report.markdown(recs, {}, chart="chart.png")
    for heading in ("## Error per method and tier", "## Out-of-memory boundary", "## Every record"):
        assert heading in md
    assert "| predicted to fit | 1 | 1 |" in md and "| predicted not to fit | 1 | 1 |" in md
    a, b = report.chart(recs, {}, tmp_path / "a.png"), report.chart(recs, {}, tmp_path / "b.png")
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()


def test_empty_report_says_how_to_make_records():
    assert "No measured records yet" in report.markdown([], {})


def test_cli_fit_and_report(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for r in fit_records() + report_records():
        records.append(data / "h100.jsonl", r)
    c, p = tmp_path / "corrections.json", tmp_path / "pkg.json"
    out = CliRunner().invoke(app, ["calibrate", "fit", "--data", str(data), "--out", str(c), "--package-copy", str(p)])
    assert out.exit_code == 0, out.output
    assert c.read_text() == p.read_text()
    assert set(json.loads(c.read_text())["families"]) == {"hopper"}
    md, png = tmp_path / "REPORT.md", tmp_path / "chart.png"
    out = CliRunner().invoke(app, ["calibrate", "report", "--data", str(data), "--corrections", str(c),
                                   "--out", str(md), "--chart", str(png)])
    assert out.exit_code == 0, out.output
    assert "![estimate against measurement](chart.png)" in md.read_text() and png.is_file()


@pytest.mark.parametrize("args, match", [
    (["calibrate"], "calibrate needs --grid"),
    (["calibrate", "--grid", "nope.yaml"], "nope.yaml: no such grid file"),
    (["calibrate", "run", "--grid", "nope.yaml"], "nope.yaml: no such grid file"),
    (["calibrate", "fit", "--data", "/no/such/dir"], "no such records file or folder"),
    (["calibrate", "report", "--data", "/no/such/dir"], "no such records file or folder"),
])
def test_cli_bad_input_is_one_line_exit_2(args, match):
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2
    assert match in out.output and out.output.count("\n") == 1


def test_cli_bad_yaml_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("configs: [{model: opt-125m, foo: 1}]\n")
    out = CliRunner().invoke(app, ["calibrate", "--grid", str(bad)])
    assert out.exit_code == 2 and "configs[0]: foo: unknown key" in out.output


def test_fit_with_nothing_to_fit_is_exit_2(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    out = CliRunner().invoke(app, ["calibrate", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "c.json"),
                                   "--package-copy", str(tmp_path / "p.json")])
    assert out.exit_code == 2 and "nothing to fit" in out.output
    assert not (tmp_path / "p.json").exists()


def test_cli_import_stays_light():
    code = ("import sys, memplan.cli; heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'peft') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
