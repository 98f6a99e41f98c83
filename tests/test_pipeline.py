"""The one pipeline: every tier's tensor bytes become an Estimate by `finish`, which carries its Config;
the one option set of fit, trace and chart; the console entry's exit codes."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from memplan import corrections, hardware, pipeline
from memplan.cli import app, main
from memplan.options import Config, Method
from memplan.result import Category, Phase, Tier
from memplan.spec import resolve

A100 = hardware.get_gpu("a100-80gb")
H100 = hardware.get_gpu("h100-80gb")
MIB = 1 << 20


def test_registry_has_the_estimating_tiers():
    assert set(pipeline.ESTIMATORS) == {Tier.ANALYTIC, Tier.TRACE}
    assert pipeline.estimator("trace").tier is Tier.TRACE
    with pytest.raises(Exception, match="unknown tier 'measured'"):
        pipeline.estimator("measured")


def test_estimate_carries_its_config_in_python_and_json():
    cfg = Config(model="opt-125m", method="fo-sgd", lora_rank=16, scheme="lora", grad_checkpointing=True)
    est = pipeline.estimate_config(cfg, H100, search=False)
    assert est.config == cfg
    data = est.to_json_dict()
    assert data["model"] == "facebook/opt-125m" and data["method"] == "fo-sgd"  # contract keys unchanged
    assert data["config"]["lora_rank"] == 16 and data["config"]["grad_checkpointing"] is True


def test_fit_suggestions_keep_every_option(run_cli):
    """D2: the table says max batch 27; the suggestion must be computed on the same (checkpointed) config."""
    code, out, err = run_cli("fit", "opt-13b", "-m", "fo-sgd", "--grad-checkpointing", "--batch", "64",
                             "--seq", "2048", "--gpu", "a100-80gb")
    assert code == 1
    assert "no single change" not in out + err
    assert "fo-sgd would fit with: --batch 27 (" in err  # notes go to stderr; stdout holds the table


def test_finish_is_the_same_for_a_peak_from_any_door():
    """Measured tensor bytes through `finish` get the analytic tier's overheads, byte for byte."""
    cfg = Config(model="opt-125m", method="zo-sgd", batch=4, seq=256)
    spec = resolve(cfg.model)
    ana = pipeline.estimate_config(cfg, H100, search=False, spec=spec)
    tensors = {c: n for c, n in ana.components.items() if c not in (Category.CONTEXT, Category.ALLOCATOR)}
    peak = pipeline.measured_peak(cfg, spec.name, ana.peak_phase, tensors, ana.phases)
    est = pipeline.finish(peak, cfg, spec, H100, tier=Tier.MEASURED, search=False)
    assert est.tier is Tier.MEASURED
    assert (est.peak_allocated_bytes, est.peak_reserved_bytes, est.peak_device_bytes) == (
        ana.peak_allocated_bytes, ana.peak_reserved_bytes, ana.peak_device_bytes)
    assert est.components == ana.components and est.fits == ana.fits


def test_finish_adds_the_corrected_workspace_where_a_tier_cannot_see_it(package_corrections):
    """D4: the trace tier's workspace comes from the corrected family, like the analytic tier's."""
    cfg = Config(model="opt-125m", method="fo-sgd")
    peak = pipeline.TensorPeak(Phase.BACKWARD, {Category.WEIGHTS: 100 * MIB}, {Phase.BACKWARD: 100 * MIB},
                               "m", workspace_counted=False)
    raw = pipeline.finish(peak, cfg, None, H100, tier=Tier.TRACE)
    # hopper: 32 MiB per cuBLAS handle, two handles once backward runs
    assert raw.components[Category.WORKSPACE] == 2 * 32 * MIB
    assert raw.phases == {Phase.BACKWARD: 100 * MIB + 64 * MIB}
    package_corrections.write_text(json.dumps({"families": {"hopper": {
        "context_bytes": 1 << 30, "allocator_slack": 0.0, "cublas_workspace_bytes": 4 * MIB, "source": "s"}}}))
    corrections.reload()
    est = pipeline.finish(peak, cfg, None, H100, tier=Tier.TRACE)
    assert est.components[Category.WORKSPACE] == 2 * 4 * MIB
    assert est.peak_allocated_bytes == 108 * MIB and est.correction == "s"
    # the correction is applied once: no slack, so reserved is allocated rounded up to 2 MiB
    assert est.peak_reserved_bytes == 108 * MIB and est.peak_device_bytes == 108 * MIB + (1 << 30)


def test_trace_goes_through_finish(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny import TINY_OPT, write

    from memplan.tracing import trace

    cfg = Config(model=write(tmp_path, TINY_OPT), method="fo-sgd", batch=2, seq=16, grad_checkpointing=False)
    est = trace(cfg, gpu=H100)
    assert est.tier is Tier.TRACE and est.config == cfg and est.fits is True
    assert est.components[Category.WORKSPACE] == 2 * 32 * MIB  # hopper, backward's second handle
    assert est.max_batch is None  # no search by tracing


# ---- one option set --------------------------------------------------------------------------


def _flat(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("command", [["fit"], ["trace"], ["chart", "grid"], ["chart", "breakdown"],
                                     ["chart", "sweep"]])
def test_help_holds_every_config_field_and_its_description(command):
    res = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    for name, info in Config.model_fields.items():
        if name in ("model", "method"):
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in res.stdout, (command, flag)
        assert _flat(info.description) in _flat(res.stdout), (command, name)


def test_existing_flags_keep_their_defaults():
    res = CliRunner().invoke(app, ["fit", "--help"], terminal_width=200)
    text = " ".join(res.stdout.split())
    for flag, default in (("--scheme", "ft"), ("--dtype", "fp16"), ("--batch", "1"), ("--seq", "512"),
                          ("--attention", "sdpa"), ("--lora-rank", "8"), ("--lora-alpha", "16"),
                          ("--prefix-tokens", "5"), ("--prompt-tokens", "10"), ("--perturbation", "mezo"),
                          ("--zo-queries", "1"), ("--hf-version", "current")):
        assert re.search(re.escape(flag) + r" \S+ .*?\[default: " + re.escape(default) + r"\]", text), flag
    for flag in ("-m, --method", "--gpu", "--json", "--grad-checkpointing", "--use-cache", "--lora-targets"):
        assert flag in text


@pytest.mark.parametrize("value", ["", ",", " , "])
def test_empty_method_is_one_line_exit_2(capsys, value):
    """F1: was an IndexError traceback and exit 1."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "opt-13b", "--method", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("memplan: error: --method names no method")


def test_methods_commas_repeats_and_all(fit_json):
    _, ests = fit_json("opt-125m", "-m", "zo-sgd,fo-adam", "-m", "zo-sgd", "-m", "fo-adam, zo-adam")
    assert [e["method"] for e in ests] == ["zo-sgd", "fo-adam", "zo-adam"]
    _, ests = fit_json("opt-125m", "-m", "zo-adam", "-m", "all")
    assert [e["method"] for e in ests] == ["zo-adam"] + [m.value for m in Method if m is not Method.ZO_ADAM]


def test_chart_takes_the_flags_fit_has(tmp_path):
    out = tmp_path / "b.svg"
    args = ["chart", "breakdown", "opt-125m", "--gpu", "h100", "-o", str(out), "--methods", "zo-sgd", "--json"]
    res = CliRunner().invoke(app, [*args, "--zo-queries", "4", "--perturbation", "inplace", "--prefix-tokens", "7"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    cfg = Config(model="opt-125m", method="zo-sgd", zo_queries=4, perturbation="inplace", prefix_tokens=7)
    assert got["peak_bytes"] == [pipeline.estimate_config(cfg, H100, search=False).peak_device_bytes]
    bad = CliRunner().invoke(app, [*args, "--zo-queries", "0"])
    assert bad.exit_code == 2 and "--zo-queries must be a positive integer, got 0" in bad.stderr


# ---- the console entry -----------------------------------------------------------------------


def test_main_registers_from_its_argv_not_the_process(monkeypatch, capsys):
    """D5: a driver started as `python drv.py models` calling main(['fit', ...])."""
    monkeypatch.setattr("sys.argv", ["drv.py", "models"])
    with pytest.raises(SystemExit) as info:
        main(["fit", "opt-125m", "--gpu", "h100", "--json"])
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out)["estimates"][0]["method"] == "zo-sgd"


def test_app_has_every_command():
    from memplan.cli import COMMANDS

    res = CliRunner().invoke(app, ["--help"])
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\b", res.stdout, re.M), name


def test_a_crash_is_exit_3_not_a_misfit(monkeypatch, capsys):
    """C10: exit 1 means "does not fit"; a bug must not look like one."""
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr("memplan.pipeline.finish", boom)
    with pytest.raises(SystemExit) as info:
        main(["fit", "opt-125m", "--gpu", "h100"])
    err = capsys.readouterr().err
    assert info.value.code == 3 and err.count("\n") == 1
    assert err.startswith("memplan: internal error: ZeroDivisionError: division by zero second line")
    assert "report" in err
