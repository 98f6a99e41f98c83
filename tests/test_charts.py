"""Charts: the plotted numbers are the estimator's, files are valid PNG/SVG, and renders are byte-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan import charts, hardware
from memplan.api import estimate_config
from memplan.errors import MemplanError
from memplan.result import GIB
from memplan.options import Config, Method

H100 = hardware.get_gpu("h100")
METHODS = list(Method)
OPTS = dict(batch=16, seq=512)
SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[1]


def peak(model: str, method, **options) -> int:
    return estimate_config(Config(model=model, method=method, **options), H100, search=False).peak_device_bytes


def svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return ["".join(t.itertext()).strip() for t in root.iter(f"{SVG}text")]


def test_grid_values_and_status():
    c = charts.grid(["opt-125m", "opt-13b"], METHODS, "h100", margin="5%", **OPTS)
    assert c.models == ["facebook/opt-125m", "facebook/opt-13b"] and c.methods == [m.value for m in METHODS]
    budget = H100.total_bytes - H100.total_bytes * 5 // 100
    assert c.capacity.budget_bytes == budget
    for i, model in enumerate(["opt-125m", "opt-13b"]):
        for j, m in enumerate(METHODS):
            n = peak(model, m, **OPTS)
            assert c.peak_bytes[i][j] == n
            assert c.status[i][j] == ("fits" if n <= budget else "tight" if n <= H100.total_bytes else "no fit")
    # OPT-13B at batch 16 x 512 on 80 GB: ZO-SGD fits, FO-Adam does not.
    assert c.status[1][METHODS.index(Method.ZO_SGD)] == "fits"
    assert c.status[1][METHODS.index(Method.FO_ADAM)] == "no fit"


def test_grid_svg_labels_are_the_estimates(tmp_path):
    c = charts.save(charts.grid(["opt-13b"], METHODS, "h100", **OPTS), tmp_path / "grid.svg")
    texts = svg_texts(tmp_path / "grid.svg")
    labels = [t for t in texts if t.endswith(" GiB") and t[0].isdigit()]
    assert labels == [f"{n / GIB:.1f} GiB" for n in c.peak_bytes[0]]
    assert any(t.startswith("Peak device memory (GiB) on NVIDIA H100") for t in texts)


def test_breakdown_sums_to_the_peak(tmp_path):
    c = charts.breakdown("opt-13b", METHODS, "h100", **OPTS)
    for j, m in enumerate(METHODS):
        est = estimate_config(Config(model="opt-13b", method=m, **OPTS), H100, search=False)
        assert c.peak_bytes[j] == est.peak_device_bytes == sum(v[j] for v in c.components.values())
        assert all(c.components[k.value][j] == v for k, v in est.components.items() if v)
    first = tmp_path / "a.svg"
    charts.save(c, first)
    charts.save(c, tmp_path / "b.svg")
    assert first.read_bytes() == (tmp_path / "b.svg").read_bytes()
    texts = svg_texts(first)
    assert f"h100-80gb capacity: {H100.total_bytes / GIB:.1f} GiB" in texts  # the capacity line's legend
    assert "peak device memory (GiB = 2^30 bytes)" in texts


def test_sweep_png_is_deterministic(tmp_path):
    values = [128, 512, 2048]
    c = charts.sweep("opt-13b", [Method.ZO_SGD, Method.FO_SGD], "h100", over="seq", values=values, batch=16)
    assert c.values == values
    assert c.peak_bytes["zo-sgd"] == [peak("opt-13b", "zo-sgd", batch=16, seq=s) for s in values]
    assert c.peak_bytes["fo-sgd"] == [peak("opt-13b", "fo-sgd", batch=16, seq=s) for s in values]
    charts.save(c, tmp_path / "a.png")
    charts.save(c, tmp_path / "b.png")
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == (tmp_path / "b.png").read_bytes()


def test_same_bytes_in_another_process(tmp_path):
    """Another interpreter, another hash seed: the same SVG bytes (fixed hash salt, no dates)."""
    code = ("import sys; from memplan import charts; "
            "charts.save(charts.sweep('opt-125m', ['zo-sgd', 'fo-adam'], 'h100', over='batch', values=[1, 4, 16]),"
            " sys.argv[1])")
    for name, seed in (("one.svg", "1"), ("two.svg", "2")):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert (tmp_path / "one.svg").read_bytes() == (tmp_path / "two.svg").read_bytes()


@pytest.mark.parametrize("call, message", [
    (lambda: charts.sweep("opt-125m", METHODS, "h100", over="lr", values=[1]), "--over: sweep over seq, batch or num-gpus"),
    (lambda: charts.sweep("opt-125m", METHODS, "h100", over="seq", values=[0, 8]), "--values: positive"),
    (lambda: charts.grid([], METHODS, "h100"), "--models: name at least one"),
    (lambda: charts.grid(["opt-125m"], METHODS, "h100", margin="5"), "--margin: write a share"),
    (lambda: charts.save(charts.grid(["opt-125m"], METHODS[:1], "h100"), "x.pdf"), r"\.png or \.svg"),
])
def test_bad_chart_requests(call, message):
    with pytest.raises(MemplanError, match=message):
        call()


def test_cli_chart_grid_json(tmp_path):
    from memplan.cli import app

    out = tmp_path / "grid.png"
    res = CliRunner().invoke(app, ["chart", "grid", "--gpu", "h100", "--models", "opt-125m,opt-13b",
                                   "--methods", "zo-sgd,fo-adam", "--batch", "16", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "grid" and data["methods"] == ["zo-sgd", "fo-adam"]
    assert data["peak_bytes"][1] == [peak("opt-13b", m, batch=16) for m in ("zo-sgd", "fo-adam")]
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["chart", "sweep", "opt-13b", "--gpu", "h100", "--values", "1,x", "-o", "s.png"])
    assert bad.exit_code == 2 and "--values" in bad.stderr


def test_charts_module_imports_no_matplotlib():
    code = "import sys, memplan.charts, memplan.cli.chart; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
