"""Generated plan files, valid and broken, never crash `memplan check`: a verdict (0/1) or one line (2)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memplan.cli import app
from memplan.hardware import gpu_names
from memplan.options import Attention, Dtype, HfVersion, Method, Perturbation, Scheme
from memplan.plan import Plan, Run
from memplan.spec import catalog_names

runner = CliRunner()

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
           | st.dates())
anything = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=12)


def choice(enum) -> st.SearchStrategy:
    return st.sampled_from([m.value for m in enum])


# Valid values of each run key; `plan_text` breaks some documents on purpose.
GOOD = {
    "model": st.sampled_from(catalog_names()),
    "method": choice(Method) | st.just("all") | st.lists(choice(Method), min_size=1, max_size=3),
    "scheme": choice(Scheme), "dtype": choice(Dtype), "attention": choice(Attention),
    "perturbation": choice(Perturbation), "hf_version": choice(HfVersion),
    "batch": st.integers(1, 4096) | st.just(10**30), "seq": st.integers(1, 1 << 16),
    "lora_rank": st.integers(1, 512), "prefix_tokens": st.integers(1, 64), "prompt_tokens": st.integers(1, 64),
    "zo_queries": st.integers(1, 8), "momentum": st.floats(0, 0.99), "grad_checkpointing": st.booleans(),
    "name": st.text(max_size=10), "tier": st.just("analytic"),
}
run = st.fixed_dictionaries(
    {"model": GOOD["model"]},
    optional={k: v for k, v in GOOD.items() if k != "model"},
)
plan_doc = st.fixed_dictionaries(
    {"gpus": st.lists(st.sampled_from(gpu_names()), min_size=1, max_size=3),
     "runs": st.lists(run, min_size=1, max_size=3)},
    optional={"margin": st.sampled_from(["5%", "2GiB", "0", "99.9%", "512 MiB"]),
              "tier": st.just("analytic")},
)
KEYS = [*Plan.model_fields, *Run.model_fields, "batchh", ""]


@st.composite
def plan_text(draw) -> tuple[str, str]:
    """Half plausible plans; the rest broken: a key set to junk, cut short, any document, any text."""
    mode = draw(st.sampled_from(["valid"] * 5 + ["junk key", "truncated", "any document", "any text"]))
    doc = draw(anything if mode == "any document" else plan_doc)
    if mode == "junk key":
        target = draw(st.sampled_from([doc, *doc["runs"]]))
        target[draw(st.sampled_from(KEYS) | st.text(max_size=6))] = draw(anything | st.sampled_from(
            ["h10", "a100", "opt-13", "zo-sdg", "10", "1e3GiB", -1, 0, 2.5]))
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    text = (json.dumps(doc, default=str) if suffix == ".json"
            else yaml.safe_dump(doc, default_flow_style=draw(st.booleans()), allow_unicode=True))
    if mode == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    if mode == "any text":
        text = draw(st.text(max_size=80))
    return suffix, text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=plan_text())
def test_check_never_crashes(workdir, case):
    suffix, text = case
    path = workdir / f"p{suffix}"
    path.write_text(text, encoding="utf-8")
    res = runner.invoke(app, ["check", str(path), "--json"])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in (0, 1, 2)
    event(f"exit {res.exit_code}")
    if res.exit_code == 2:
        assert res.stdout == ""
        assert res.stderr.startswith("memplan: error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "Traceback" not in res.stderr
    else:
        out = json.loads(res.stdout)
        assert out["fits"] is (res.exit_code == 0)
        assert all(r["fits"] == (r["peak_device_bytes"] <= r["budget_bytes"]) for r in out["results"])


def test_generator_reaches_valid_plans():
    """The strategy is not all noise: a plain generated plan validates and is judged."""
    doc = {"gpus": gpu_names()[:1], "runs": [{"model": catalog_names()[0], "method": "all"}]}
    assert Plan.model_validate(doc).runs[0].method == list(Method)
