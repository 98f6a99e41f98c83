"""`memplan models` and `memplan gpus`, run in-process; assertions on the JSON, never on table text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from memplan import hardware
from memplan.cli import app
from memplan.spec import catalog_entries

runner = CliRunner()


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_models_json_lists_every_catalog_entry():
    models = _json(["models", "--json"])["models"]
    assert [m["id"] for m in models] == [e["id"] for e in catalog_entries()]
    opt = next(m for m in models if m["id"] == "facebook/opt-13b")
    assert opt["params"] == 12_853_473_280
    assert (opt["layers"], opt["hidden_size"], opt["heads"], opt["kv_heads"]) == (40, 5120, 40, 40)
    assert "opt-13b" in opt["aliases"] and opt["model_type"] == "opt"
    llama = next(m for m in models if m["id"] == "meta-llama/Llama-2-70b-hf")
    assert (llama["heads"], llama["kv_heads"]) == (64, 8)


def test_models_table_renders():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output


def test_gpus_json_on_a_machine_without_nvml(monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda: [])
    out = _json(["gpus", "--json"])
    assert out["detected"] == []
    h100 = next(g for g in out["gpus"] if g["name"] == "h100-80gb")
    assert (h100["total_bytes"], h100["family"]) == (85_520_809_984, "hopper")
    assert len(out["gpus"]) == len(hardware.catalog())


def test_gpus_json_lists_detected(monkeypatch):
    local = hardware.Gpu(name="a10g", display="NVIDIA A10G", total_bytes=23_028 << 20, family="ampere",
                         source="NVML device 0", detected=True)
    monkeypatch.setattr(hardware, "detect", lambda: [local])
    (found,) = _json(["gpus", "--json"])["detected"]
    assert (found["name"], found["total_bytes"], found["family"]) == ("a10g", 23_028 << 20, "ampere")


def test_gpus_table_renders_with_and_without_gpus(monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda: [])
    assert runner.invoke(app, ["gpus"]).exit_code == 0
    monkeypatch.setattr(hardware, "detect", lambda: list(hardware.catalog()[:1]))
    assert runner.invoke(app, ["gpus"]).exit_code == 0


def test_unknown_option_is_a_usage_error():
    assert runner.invoke(app, ["gpus", "--bogus"]).exit_code == 2


def test_cli_import_loads_no_heavy_modules():
    code = ("import sys, memplan.cli; "
            "print(' '.join(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == ""
