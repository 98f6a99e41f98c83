"""Every example runs: the plans pass `check`, the CI workflow and pre-commit hook call it right, the script sweeps."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memplan.api import estimate_config
from memplan.cli import app
from memplan.errors import MemplanError
from memplan.hardware import get_gpu
from memplan.options import Config
from memplan.spec import resolve
from catalog_helpers import has_gpu

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PLANS = sorted((EXAMPLES / "plans").glob("*.yaml"))
runner = CliRunner()


def missing_names(path: Path) -> list[str]:
    """GPUs and models a plan names that this checkout's catalogs lack (the catalog branch adds them)."""
    doc = yaml.safe_load(path.read_text())
    missing = [g for g in doc["gpus"] if not has_gpu(g)]
    for run in doc["runs"]:
        try:
            resolve(run["model"])
        except MemplanError:
            missing.append(run["model"])
    return list(dict.fromkeys(missing))


def runnable(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not missing_names(p)]


def test_the_expected_examples_exist():
    assert {p.name for p in PLANS} >= {"workstation-24gb.yaml", "a100-80gb-node.yaml", "h100.yaml"}
    assert runnable(PLANS), "at least h100.yaml runs with today's catalog"


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_example_plan_fits(path):
    missing = missing_names(path)
    if missing:
        pytest.skip(f"not in the catalog yet: {', '.join(missing)}")
    res = runner.invoke(app, ["check", str(path), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["fits"] and out["results"]
    assert all(r["headroom_bytes"] >= 0 for r in out["results"])


def test_schema_file_is_current():
    res = runner.invoke(app, ["schema"])
    assert json.loads((EXAMPLES / "plan.schema.json").read_text()) == json.loads(res.stdout), \
        "regenerate: memplan schema > examples/plan.schema.json"
    for path in PLANS:
        assert path.read_text().startswith("# yaml-language-server: $schema=../plan.schema.json")


def test_github_workflow_installs_then_gates(tmp_path):
    wf = yaml.safe_load((EXAMPLES / "github-actions" / "memplan-gate.yml").read_text())
    steps = wf["jobs"]["memory"]["steps"]
    runs = [s.get("run", "") for s in steps]
    install = next(i for i, r in enumerate(runs) if "pip install" in r and "memplan" in r)
    gate = next(i for i, r in enumerate(runs) if r.startswith("memplan check"))
    assert install < gate
    # The gate's command line, with the plans glob pointed at the examples, passes and writes its report.
    command, *args = shlex.split(runs[gate])[1:]
    args = [command, *map(str, runnable(PLANS)), *(a for a in args if not a.endswith("*.yaml"))]
    args[args.index("--junit") + 1] = str(tmp_path / "memplan-report.xml")
    res = runner.invoke(app, args, env={"GITHUB_ACTIONS": "true"})
    assert res.exit_code == 0, res.output
    assert (tmp_path / "memplan-report.xml").read_bytes().startswith(b"<?xml")
    report = next(s for s in steps if s.get("with", {}).get("path") == "memplan-report.xml")
    assert report["if"] == "always()"


def test_pre_commit_hook_runs_check_on_plan_files():
    cfg = yaml.safe_load((EXAMPLES / "pre-commit-config.yaml").read_text())
    (hook,) = [h for repo in cfg["repos"] if repo["repo"] == "local" for h in repo["hooks"]]
    assert hook["entry"] == "memplan check" and hook["pass_filenames"] is True
    rel = [str(p.relative_to(ROOT)) for p in PLANS]
    assert all(re.search(hook["files"], r) for r in rel)
    assert not re.search(hook["files"], "examples/sweep_best_method.py")
    res = runner.invoke(app, shlex.split(hook["entry"])[1:] + [str(p) for p in runnable(PLANS)])
    assert res.exit_code == 0, res.output


def test_sweep_script_picks_the_preferred_method_that_fits():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(EXAMPLES / "sweep_best_method.py"), "--models", "opt-125m,opt-13b",
                          "--gpus", "h100", "--batch", "16", "--seq", "512", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    sys.path.insert(0, str(EXAMPLES))
    try:
        from sweep_best_method import PREFERENCE, SCHEMES
    finally:
        sys.path.remove(str(EXAMPLES))
    gpu = get_gpu("h100")
    budget = gpu.total_bytes - gpu.total_bytes * 5 // 100
    assert [r["model"] for r in rows] == ["facebook/opt-125m", "facebook/opt-13b"]
    for r in rows:
        order = [(m.value, s.value) for m in PREFERENCE for s in SCHEMES]
        chosen = order.index((r["method"], r["scheme"]))
        for method, scheme in order[: chosen + 1]:
            n = estimate_config(Config(model=r["model"], method=method, scheme=scheme, batch=16, seq=512),
                                gpu, search=False).peak_device_bytes
            assert (n <= budget) == ((method, scheme) == (r["method"], r["scheme"]))
        assert r["peak_device_bytes"] <= r["budget_bytes"] == budget
    # OPT-13B in fp16 at batch 16 x 512 on 80 GB: FO-Adam cannot fit (weights, gradients and two
    # states alone are 8 bytes per parameter = 96 GiB), so the choice is never fo-adam with ft.
    assert (rows[1]["method"], rows[1]["scheme"]) != ("fo-adam", "ft")
