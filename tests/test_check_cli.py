"""`memplan check` and `memplan schema` in-process: exit codes, JSON, JUnit XML, GitHub annotations."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan import hardware
from memplan.cli import app

runner = CliRunner()
H100 = hardware.get_gpu("h100")

PLAN = """\
gpus: [h100]
margin: 2GiB
runs:
  - name: small
    model: opt-125m
    method: [zo-sgd, fo-adam]
    batch: 8
  - name: big-adam
    model: opt-13b
    method: fo-adam
    batch: 16
"""


def invoke(*args, env=None):
    return runner.invoke(app, list(map(str, args)), env=env)


@pytest.fixture
def plan_file(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text(PLAN)
    return p


def test_all_fit_exits_0(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(PLAN.split("  - name: big-adam")[0])
    res = invoke("check", p, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["fits"] is True and [r["method"] for r in out["results"]] == ["zo-sgd", "fo-adam"]


def test_misfit_exits_1_and_names_it(plan_file):
    res = invoke("check", plan_file, "--json")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    bad = [r for r in out["results"] if not r["fits"]]
    assert [(r["run"], r["gpu"], r["method"]) for r in bad] == [("big-adam", "h100-80gb", "fo-adam")]
    r = bad[0]
    assert r["margin_bytes"] == 2 * 2**30 and r["budget_bytes"] == H100.total_bytes - 2 * 2**30
    assert r["peak_device_bytes"] == r["estimate"]["peak_device_bytes"] > r["budget_bytes"]
    assert r["headroom_bytes"] == r["budget_bytes"] - r["peak_device_bytes"]
    assert r["line"] == 8
    assert r["fixes"] and r["fixes"][0]["peak_device_bytes"] <= r["budget_bytes"]
    # The misfit is named in words too, on stderr (text is for people; this only checks it is said).
    assert "does not fit: big-adam on h100-80gb [fo-adam]" in invoke("check", plan_file).stderr.replace("\n", " ")


def test_table_mode_keeps_stdout_for_the_table(plan_file):
    # `memplan check plan.yaml > table.txt`: verdicts in words and warnings go to stderr.
    text = PLAN.replace("    batch: 16\n", "    batch: 16\n    seq: 4096\n    grad_checkpointing: true\n")
    plan_file.write_text(text.replace("method: [zo-sgd, fo-adam]", "method: [zo-sgd, fo-sgd]"))
    res = invoke("check", plan_file)
    assert res.exit_code == 1
    err = " ".join(res.stderr.split())
    assert "does not fit: big-adam on h100-80gb [fo-adam]" in err
    assert "warning: big-adam: seq 4096 is beyond facebook/opt-13b's 2048 positions" in err
    out = " ".join(res.stdout.split())
    assert "does not fit" not in out and "warning" not in out
    assert out.startswith("memplan check") and "big-adam" in out and "no fit" in out


def test_invalid_plan_exits_2_with_one_line(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text(PLAN.replace("batch: 8", "batch: 0"))
    res = invoke("check", p)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == f"memplan: error: {p}: runs[0].batch: must be >= 1, got 0 (line 7)\n"


BOMB = "".join(["x:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"]
               + [f"  {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("text, message", [
    (BOMB + "gpus: [h100]\nmargin: *i\nruns: [{model: opt-125m}]\n",
     "YAML aliases expand this file by more than 100,000 values; write the values out, or use fewer aliases"),
    ("gpus: [h100]\nruns:\n  - {name: a, model: opt-125m, batch: 4, batch: 4000}\n",
     "runs[0]: duplicate key 'batch' on line 3; the later one would silently replace the first"),
    ("gpus: [h100]\nruns:\n  - model: opt-125m\n  - {name: 'runs[0]', model: opt-350m}\n",
     "runs[1].name: 'runs[0]' is also the default name of runs[0]; names must be unique"),
])
def test_hostile_or_ambiguous_plans_exit_2_with_one_short_line(tmp_path, text, message):
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    res = invoke("check", p)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == f"memplan: error: {p}: {message}\n"


def test_one_bad_file_stops_all(plan_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"gpus": ["h100"], "runs": [{"model": "opt-125m", "colour": "red"}]}')
    res = invoke("check", plan_file, bad, "--json")
    assert res.exit_code == 2 and "runs[0].colour: unknown key 'colour'" in res.stderr
    assert invoke("check", tmp_path / "missing.yaml").exit_code == 2


def test_junit_report(plan_file, tmp_path):
    out = tmp_path / "reports" / "memplan.xml"
    out.parent.mkdir()
    res = invoke("check", plan_file, "--junit", out, "--json")
    assert res.exit_code == 1
    root = ET.parse(out).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "3" and root.get("failures") == "1"
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == [
        "small on h100-80gb [zo-sgd]", "small on h100-80gb [fo-adam]", "big-adam on h100-80gb [fo-adam]"]
    failure = cases[2].find("failure")
    assert failure is not None and all(c.find("failure") is None for c in cases[:2])
    peak = json.loads(res.stdout)["results"][2]["peak_device_bytes"]
    assert f"peak {peak / 2**30:.2f} GiB >" in failure.get("message")
    assert "2.00 GiB margin" in failure.get("message") and "smallest change:" in failure.text
    assert [p.name for p in out.parent.iterdir()] == ["memplan.xml"]  # no temp file left behind


def test_junit_unwritable_is_bad_input(plan_file, tmp_path):
    res = invoke("check", plan_file, "--junit", tmp_path / "no" / "such" / "dir.xml")
    assert res.exit_code == 2 and "--junit" in res.stderr


def test_github_annotations_only_in_actions(plan_file):
    res = invoke("check", plan_file, "--json", env={"GITHUB_ACTIONS": "true"})
    assert res.exit_code == 1
    json.loads(res.stdout)  # annotations go to stderr under --json
    errors = [line for line in res.stderr.splitlines() if line.startswith("::error ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"::error file={plan_file},line=8,title=memplan%3A big-adam on h100-80gb [fo-adam]")
    plain = invoke("check", plan_file, env={"GITHUB_ACTIONS": "true"})
    assert plain.stdout.count("::error ") == 1
    assert "::error" not in invoke("check", plan_file, env={"GITHUB_ACTIONS": "false"}).output


def test_schema_command_prints_the_plan_schema():
    res = invoke("schema")
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    assert schema["title"] == "memplan plan" and set(schema["required"]) == {"gpus", "runs"}


def test_cli_import_stays_light():
    import subprocess

    code = ("import sys, memplan.cli; "
            "print([m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules])")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_names_are_printed_as_typed_not_as_emoji(run_cli, tmp_path):
    # rich turns `:smile:` into an emoji by default; a run name must reach the table unchanged.
    plan = tmp_path / "p.json"
    plan.write_text('{"gpus": ["h100-80gb"], "runs": [{"name": "run :smile: a", "model": "opt-125m"}]}')
    code, out, err = run_cli("check", str(plan))
    assert code == 0 and "run :smile: a" in out and "\U0001f604" not in out
