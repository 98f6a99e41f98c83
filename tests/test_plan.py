"""Plan files: validation messages, margin arithmetic, results and fixes computed by the estimator."""

from __future__ import annotations

import json

import pytest

from memplan import hardware, plan
from memplan.api import _largest, device_bytes, estimate_config
from memplan.errors import MemplanError
from memplan.margin import Margin
from memplan.options import Config, Method
from memplan.spec import resolve

GIB = 1 << 30
H100 = hardware.get_gpu("h100")

GOOD = """\
gpus: [h100]
margin: 5%
runs:
  - name: opt13b-zo
    model: facebook/opt-13b
    method: [zo-sgd, fo-adam]
    scheme: ft
    dtype: fp16
    batch: 16
    seq: 512
"""


def test_margin_forms():
    assert Margin.parse("5%").bytes_of(100 * GIB) == 5 * GIB
    assert Margin.parse("2GiB").bytes_of(80 * GIB) == 2 * GIB
    assert Margin.parse("512 MiB").fixed_bytes == 512 << 20
    assert Margin.parse("1.5GB").fixed_bytes == 1_500_000_000  # SI: 10^9
    assert Margin.parse(0) == Margin.parse("0") == Margin()
    assert str(Margin.parse("2gib")) == "2GiB" and str(Margin.parse("5%")) == "5%"


@pytest.mark.parametrize("bad", [5, "5", "0.05", 0.05, "100%", "-1GiB", "2 potatoes", True, None])
def test_margin_refuses_ambiguous_or_invalid(bad):
    with pytest.raises(ValueError, match="5%|share"):
        Margin.parse(bad)


def test_parse_good_plan():
    pf = plan.parse(GOOD)
    run = pf.plan.runs[0]
    assert [m.value for m in run.method] == ["zo-sgd", "fo-adam"]
    assert [c.method.value for c in run.configs()] == ["zo-sgd", "fo-adam"]
    assert all(isinstance(c, Config) and c.batch == 16 for c in run.configs())
    assert pf.plan.margin == "5%" and pf.plan.tier == "analytic"
    assert pf.run_lines == (4,)  # `- name:` is on line 4


def test_json_plan_and_method_all():
    text = json.dumps({"gpus": "h100", "runs": [{"model": "opt-125m", "method": "all"}]})
    pf = plan.parse(text, "p.json")
    assert pf.plan.gpus == ["h100"] and len(pf.plan.runs[0].method) == len(Method)
    assert pf.plan.run_names() == ["runs[0]"]


@pytest.mark.parametrize("old, new, message", [
    ("batch: 16", "batch: 0", r"^plan\.yaml: runs\[0\]\.batch: must be >= 1, got 0 \(line 9\)$"),
    ("batch: 16", "batchh: 16", r"runs\[0\]\.batchh: unknown key 'batchh' \(did you mean batch\?\); `memplan schema` lists them all"),
    ("zo-sgd,", "zo-sdg,", r"runs\[0\]\.method: unknown method 'zo-sdg' \(did you mean zo-sgd"),
    ("[h100]", "[h10]", r"gpus: unknown GPU 'h10' \(did you mean h100"),
    ("facebook/opt-13b", "opt-13", r"runs\[0\]\.model: unknown model 'opt-13' \(did you mean opt-13b"),
    ("5%", "5", r"margin: write a share such as 5% or an amount"),
    ("fp16", "fp8", r"runs\[0\]\.dtype: unknown dtype 'fp8'; valid: amp-bf16, amp-fp16, bf16, fp16, fp32"),
    ("batch: 16", "batch: lots", r"runs\[0\]\.batch: .*integer.*got 'lots'"),
    ("runs:", "runz:", r"runs: required key missing.*runz: unknown key 'runz' \(did you mean runs\?"),
    ("gpus: [h100]\n", "gpus: [h100\n", r"^plan\.yaml: line 2, column 7: invalid YAML: "),
    ("seq: 512", "seq: 512\n  - {name: opt13b-zo, model: opt-125m}",
     r"runs\[1\]\.name: 'opt13b-zo' is also the name of runs\[0\]"),
])
def test_bad_plans_name_file_key_and_fix(old, new, message):
    assert old in GOOD
    with pytest.raises(MemplanError, match=message):
        plan.parse(GOOD.replace(old, new))


@pytest.mark.parametrize("text, message", [
    ("", "expected a mapping with keys gpus, margin, tier, runs; got an empty file"),
    ("[1, 2]", "got a list"),
    ("5", "got an integer$"),
    ("text", "got a string$"),
    ('{"gpus": ["h100"],', r"p\.json: line 1, column 19: invalid JSON"),
])
def test_not_a_plan(text, message):
    with pytest.raises(MemplanError, match=message):
        plan.parse(text, "p.json" if text.startswith("{") else "plan.yaml")


def _bomb(levels: int = 9) -> str:
    """Anchors a..i, each nine aliases of the one before: `*i` expands to 9^9 strings (a 400-byte file)."""
    names = "abcdefghi"[:levels]
    lines = ['x:', '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  {n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", [
    "gpus: [h100]\nmargin: *i\nruns:\n  - model: opt-125m\n",
    "gpus: [h100]\nruns:\n  - {model: opt-125m, name: *i}\n",
    "gpus: [h100]\nruns:\n  - {model: *i}\n",
    "gpus: [h100]\nruns:\n  - {model: opt-125m, *i : 1}\n",
    "gpus: *i\nruns:\n  - {model: opt-125m}\n",
])
def test_alias_bomb_is_refused_at_once_in_one_short_line(where):
    import time

    start = time.perf_counter()
    with pytest.raises(MemplanError, match=r"^plan\.yaml: YAML aliases expand this file by more than") as e:
        plan.parse(_bomb() + where)
    assert time.perf_counter() - start < 2 and len(str(e.value)) < 200


def test_aliases_within_the_budget_still_work():
    # Shared run settings through an anchor and a merge key: the later key wins, its line is reported.
    text = ("gpus: [h100]\nruns:\n  - &base {name: a, model: opt-125m, batch: 4}\n"
            "  - <<: *base\n    name: b\n    batch: 0\n")
    with pytest.raises(MemplanError, match=r"runs\[1\]\.batch: must be >= 1, got 0 \(line 6\)$"):
        plan.parse(text)
    pf = plan.parse(text.replace("batch: 0", "batch: 8"))
    assert [(r.name, r.model, r.batch) for r in pf.plan.runs] == [("a", "opt-125m", 4), ("b", "opt-125m", 8)]


def test_a_huge_margin_value_is_quoted_short():
    with pytest.raises(MemplanError, match=r"^plan\.yaml: margin: write a share .*; got \[.*\.\.\.") as e:
        plan.parse(GOOD.replace("margin: 5%", "margin: " + str(list(range(10_000)))))
    assert len(str(e.value)) < 300


def test_recursive_alias_is_refused():
    with pytest.raises(MemplanError, match=r"line 1: an alias refers to a value that contains it"):
        plan.parse("gpus: &g [h100, *g]\nruns: [{model: opt-125m}]\n")


@pytest.mark.parametrize("text, message", [
    ("gpus: [h100]\ngpus: [rtx-4090]\nruns:\n  - {model: opt-125m}\n",
     r"^plan\.yaml: duplicate key 'gpus' on lines 1 and 2; the later one would silently replace the first$"),
    ("gpus: [h100]\nruns:\n  - {name: a, model: opt-125m, batch: 4, batch: 4000}\n",
     r"^plan\.yaml: runs\[0\]: duplicate key 'batch' on line 3;"),
    ("gpus: [h100]\nruns:\n  - model: opt-125m\n  - model: opt-125m\n    seq: 64\n    seq: 128\n",
     r"^plan\.yaml: runs\[1\]: duplicate key 'seq' on lines 5 and 6;"),
])
def test_duplicate_keys_are_refused_with_both_lines(text, message):
    with pytest.raises(MemplanError, match=message):
        plan.parse(text)


def test_duplicate_keys_in_json_are_refused():
    with pytest.raises(MemplanError, match=r"^p\.json: duplicate key 'batch'"):
        plan.parse('{"gpus": ["h100"], "runs": [{"model": "opt-125m", "batch": 1, "batch": 2}]}', "p.json")


@pytest.mark.parametrize("runs, message", [
    ("[{model: opt-125m}, {name: 'runs[0]', model: opt-350m}]",
     r"runs\[1\]\.name: 'runs\[0\]' is also the default name of runs\[0\]; names must be unique"),
    ("[{name: 'runs[1]', model: opt-125m}, {model: opt-350m}]",
     r"runs\[0\]\.name: 'runs\[1\]' is also the default name of runs\[1\]"),
])
def test_explicit_name_may_not_take_a_default_name(runs, message):
    with pytest.raises(MemplanError, match=message):
        plan.parse(f"gpus: [h100]\nruns: {runs}\n")


def test_many_bad_runs_give_a_short_line():
    text = "gpus: [h100]\nruns:\n" + "".join(f"  - {{name: r{i}, model: opt-125m, batch: 0}}\n" for i in range(5000))
    with pytest.raises(MemplanError) as e:
        plan.parse(text)
    message = str(e.value)
    assert message.startswith("plan.yaml: runs[0].batch: must be >= 1, got 0 (line 3); runs[1].batch")
    assert message.endswith(" (and 4997 more)") and len(message) < 400


def test_gpus_auto_without_a_gpu_names_the_plan_key(monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda: [])
    with pytest.raises(MemplanError, match=r"^plan\.yaml: gpus: `auto` means the local GPU.*gpus: \[a100-80gb\]") as e:
        plan.parse(GOOD.replace("[h100]", "auto"))
    assert "--gpu" not in str(e.value)


def test_model_path_is_relative_to_the_plan(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(
        {"model_type": "opt", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 128}))
    (tmp_path / "plan.yaml").write_text("gpus: [h100]\nruns: [{model: tiny, seq: 64}]\n")
    pf = plan.load(tmp_path / "plan.yaml")
    assert pf.plan.runs[0].model == str(tmp_path / "tiny")
    assert plan.check(pf)[0].fits


def test_schema_documents_every_field():
    s = plan.schema()
    assert s["additionalProperties"] is False
    run = s["$defs"]["Run"]
    assert run["additionalProperties"] is False
    assert set(Config.model_fields) <= set(run["properties"])
    for props in (s["properties"], run["properties"]):
        assert all(p.get("description") for p in props.values())
    assert "zo-sgd: MeZO" in json.dumps(run["properties"]["method"])
    assert "eager: materialises" in s["$defs"]["Attention"]["description"]


def test_fits_means_peak_within_total_minus_margin():
    # The largest batch within the 5% budget fits; one more does not, though it fits the bare GPU.
    spec, margin = resolve("opt-13b"), Margin.parse("5%")
    budget = H100.total_bytes - H100.total_bytes * 5 // 100
    cfg = Config(model="opt-13b", method="zo-sgd", seq=2048)
    n = _largest(cfg, spec, H100, "batch", budget)
    assert 1 < n < _largest(cfg, spec, H100, "batch")
    text = "gpus: [h100]\nmargin: 5%\nruns:\n" + "".join(
        f"  - {{name: b{b}, model: opt-13b, seq: 2048, batch: {b}}}\n" for b in (n, n + 1))
    fits, over = plan.check(plan.parse(text))
    assert fits.margin_bytes == margin.bytes_of(H100.total_bytes) == H100.total_bytes * 5 // 100
    assert fits.budget_bytes == budget
    assert fits.estimate.peak_device_bytes == device_bytes(cfg.model_copy(update={"batch": n}), spec, H100)
    assert fits.fits and fits.estimate.peak_device_bytes <= budget
    assert not over.fits and budget < over.estimate.peak_device_bytes <= H100.total_bytes
    assert over.estimate.fits is True  # the estimate's own verdict has no margin
    assert over.fixes[0].field == "batch" and over.fixes[0].value == n
    assert over.advice().startswith(f"smallest change: batch: {n} (")


def test_fixes_are_computed_and_each_one_fits():
    pf = plan.parse(GOOD.replace("scheme: ft", "scheme: ft\n    attention: eager").replace("[zo-sgd, fo-adam]", "all"))
    budget = Margin.parse("5%").budget(H100.total_bytes)
    spec = resolve("opt-13b")
    misfits = [r for r in plan.check(pf) if not r.fits]
    assert {r.method for r in misfits} >= {"fo-sgd", "fo-adam"}
    for r in misfits:
        assert r.fixes, r.method
        for fix in r.fixes:
            if fix.field == "gpu":
                continue
            fields = dict(model="opt-13b", method=r.method, batch=16, seq=512, attention="eager")
            cfg = Config(**{**fields, **fix.changes})
            assert fix.peak_device_bytes == estimate_config(cfg, H100, search=False, spec=spec).peak_device_bytes
            assert fix.peak_device_bytes <= budget


def test_trace_tier_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tracing(name, *args, **kwargs):
        if name == "memplan.tracing":
            raise ModuleNotFoundError("No module named 'memplan.tracing'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tracing)
    with pytest.raises(MemplanError, match="tier: trace needs the trace tier .*use tier: analytic"):
        plan.check(plan.parse(GOOD.replace("margin: 5%", "margin: 5%\ntier: trace")))


def test_trace_tier_plan_is_really_traced(tmp_path):
    """D1: `tier: trace` always failed (it imported a function that does not exist)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny import TINY_OPT, write

    from memplan.result import Tier
    from memplan.tracing import trace

    model = write(tmp_path, TINY_OPT)
    text = f"gpus: [h100]\nmargin: 5%\ntier: trace\nruns:\n  - model: {model}\n    method: [zo-sgd, fo-sgd]\n" \
           "    batch: 2\n    seq: 16\n"
    results = plan.check(plan.parse(text))
    assert [r.estimate.tier for r in results] == [Tier.TRACE, Tier.TRACE]
    for r in results:
        traced = trace(r.estimate.config, gpu=H100)
        assert r.estimate.peak_device_bytes == traced.peak_device_bytes
        assert r.estimate.components == traced.components and r.fits


def test_fit_suggestions_keep_their_flags():
    from memplan.suggest import fixes, suggestions

    spec = resolve("opt-13b")
    cfg = Config(model="opt-13b", method="fo-adam", batch=16)
    est = estimate_config(cfg, H100, spec=spec)
    assert est.fits is False
    found = fixes(est, spec, H100)
    # Each suggestion is a flag of `fit`, and applying it makes the run fit, by the estimator.
    for fix in found:
        gpu = hardware.get_gpu(fix.value) if fix.field == "gpu" else H100
        changed = cfg.replace(**fix.changes)
        assert fix.peak_device_bytes == device_bytes(changed, spec, gpu) <= gpu.total_bytes
    # ZO-SGD fits (28.9 GiB) and the H200 (140 GiB) is the smallest larger GPU that holds it as it is.
    zo = device_bytes(cfg.replace(method="zo-sgd"), spec, H100)
    h200 = device_bytes(cfg, spec, hardware.get_gpu("h200"))
    line = suggestions(est, spec, H100)[0]
    assert line.startswith("fo-adam would fit with: ")
    assert f"--method zo-sgd ({zo / GIB:.1f} GiB)" in line and line.endswith(f"--gpu h200 ({h200 / GIB:.1f} GiB)")

@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_an_integer_too_long_to_read_is_one_line(tmp_path, suffix):
    # Python refuses integers of more than 4300 digits; the plan reader must say so, not crash.
    digits = "9" * 5000
    text = (f"gpus: [h100-80gb]\nruns:\n  - model: opt-125m\n    batch: {digits}\n" if suffix == ".yaml"
            else f'{{"gpus": ["h100-80gb"], "runs": [{{"model": "opt-125m", "batch": {digits}}}]}}')
    path = tmp_path / f"p{suffix}"
    path.write_text(text)
    with pytest.raises(MemplanError, match="integer of more than 4300 digits"):
        plan.load(path)
