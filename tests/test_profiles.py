"""Profiles: a trace's bytes as formulas of batch and seq (memplan.profile, memplan.symbolic, memplan.probe).

The symbolic profile of a tiny model is checked byte for byte against concrete fake traces at points
none of its traces ran at: b = 1, odd lengths, s past a sliding window. The probe (forward-grad) is
checked within its stated bound. Then the cache, the formula evaluator and the message without torch.
"""

from __future__ import annotations

import json

import pytest

from memplan import profile
from memplan.errors import MemplanError
from memplan.options import Config
from memplan.result import Category, Phase
from tiny import TINY_LLAMA, write

torch = pytest.importorskip("torch")

# A tiny Mistral whose sliding window (16) lies inside its context: sdpa drops the mask only below it,
# so torch records s < 16 as a guard and the profile holds two regimes per batch regime.
TINY_MISTRAL = {**TINY_LLAMA, "model_type": "mistral", "sliding_window": 16, "max_position_embeddings": 48}


def _trace(cfg: Config, b: int, s: int):
    from memplan.tracing import trace_step

    return trace_step(cfg.model_copy(update={"batch": b, "seq": s})).peak


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write(d, TINY_LLAMA)
    m = tmp_path_factory.mktemp("mistral")
    write(m, TINY_MISTRAL)
    return str(d), str(m)


@pytest.fixture(scope="module")
def profiles(tiny_dir):
    """Symbolic profiles of the tiny models, built once per module: {(which, method, dtype, attention): Profile}."""
    from memplan.symbolic import trace_profile

    made = {}

    def get(which, method, dtype, attention):
        k = (which, method, dtype, attention)
        if k not in made:
            made[k] = trace_profile(Config(model=tiny_dir[which], method=method, dtype=dtype, attention=attention))
        return made[k]

    return get


@pytest.mark.parametrize("which, method, dtype, attention, points", [
    (0, "fo-adam", "bf16", "sdpa", [(1, 1), (1, 37), (5, 23)]),
    (0, "zo-sgd", "amp-bf16", "eager", [(1, 50), (7, 33)]),
    (1, "fo-sgd", "bf16", "sdpa", [(1, 40), (3, 15), (2, 47)]),  # both sides of the window
])
def test_symbolic_profile_replays_concrete_traces_byte_for_byte(tiny_dir, profiles, which, method, dtype,
                                                                 attention, points):
    from memplan.symbolic import trace_profile

    cfg = Config(model=tiny_dir[which], method=method, dtype=dtype, attention=attention)
    prof = profiles(which, method, dtype, attention)
    assert prof.source == "symbolic" and len(prof.to_json()) < 12_000
    if any(s == 1 for _, s in points):  # one-token sequences are a regime traced when first asked for
        assert prof.peak(1, 1) is None
        prof = trace_profile(cfg, into=prof, at=(1, 1))
    for b, s in points:
        want, got = _trace(cfg, b, s), prof.peak(b, s)
        assert got is not None, (b, s)
        assert (got.allocated, got.phase) == (want.allocated, want.phase), (b, s)
        assert got.components == {c: n for c, n in want.components.items() if n}, (b, s)
        assert got.phases == dict(want.phases), (b, s)
    if which == 1:  # the window is a regime edge torch recorded, not a fitted guess
        assert any("s < 16" in r.when or "s <= 15" in r.when for r in prof.regimes)
        assert any("s >= 16" in r.when for r in prof.regimes)


def test_profile_round_trips_through_json(profiles):
    prof = profiles(0, "zo-sgd", "amp-bf16", "eager")
    again = profile.Profile.from_json(prof.to_json())
    assert again == prof
    assert again.peak(4, 33) == prof.peak(4, 33)


def test_probe_fits_forward_grad_within_its_bound(tiny_dir):
    """forward-grad pins batch and seq; the probe's fit is within 1 % here (published bound: 5 %)."""
    from memplan.symbolic import build_profile

    cfg = Config(model=tiny_dir[0], method="forward-grad", dtype="bf16", attention="eager")
    prof = build_profile(cfg)
    assert prof.source == "probe"
    for b, s in [(1, 40), (6, 64)]:
        want, got = _trace(cfg, b, s), prof.peak(b, s)
        assert abs(got.allocated - want.allocated) <= 0.01 * want.allocated, (b, s, got.allocated, want.allocated)
        assert got.phase == want.phase


def test_forward_grad_pins_its_sizes(tiny_dir):
    from memplan.symbolic import Pinned, trace_profile

    with pytest.raises(Pinned, match="forward-grad pins"):
        trace_profile(Config(model=tiny_dir[0], method="forward-grad", dtype="bf16"), max_traces=1)


# ---- the cache ---------------------------------------------------------------------------------


def _small_profile(**kw) -> profile.Profile:
    # weights 1024 B; activations 8 B per token: 1024 + 8*b*s at the forward's peak.
    rows = (profile.Row(Phase.FORWARD, {Category.WEIGHTS: ((0, 1024),), Category.ACTIVATIONS: ((1, 8),)}),
            profile.Row(Phase.LOAD, {Category.WEIGHTS: ((0, 1024),)}))
    return profile.Profile(("1", "b*s"), (profile.Regime("b >= 1 and s >= 1", rows),),
                           versions=profile.installed_versions(), **kw)


def test_cache_miss_then_hit_and_atomic_write(monkeypatch):
    config = {"model_type": "llama", "hidden_size": 64}
    cfg = Config(model="x", method="zo-sgd")
    assert profile.find(config, cfg) is None
    profile._LOADED.clear()
    writes = []
    import memplan.files

    real = memplan.files.write_atomic
    monkeypatch.setattr(memplan.files, "write_atomic", lambda p, d, **k: (writes.append(p), real(p, d, **k)))
    path = profile.store(config, cfg, _small_profile())
    assert writes == [path] and path.parent == profile.cache_dir()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left beside it
    profile._LOADED.clear()
    found = profile.find(config, cfg)
    assert found is not None and found.peak(2, 10).allocated == 1024 + 8 * 2 * 10
    # any other option, model field or format is another key: a miss
    assert profile.key(config, cfg) != profile.key(config, cfg.replace(dtype="bf16"))
    assert profile.key(config, cfg) != profile.key({**config, "hidden_size": 65}, cfg)
    assert profile.key(config, cfg) == profile.key(config, cfg.replace(batch=7, seq=3, model="y"))


def test_cache_made_with_other_versions_or_broken_is_a_miss():
    config, cfg = {"model_type": "llama"}, Config(model="x")
    path = profile.store(config, cfg, _small_profile())
    data = json.loads(path.read_text())
    data["versions"] = {"torch": "0.0", "transformers": "0.0"}
    path.write_text(json.dumps(data))
    profile._LOADED.clear()
    assert profile.find(config, cfg) is None
    path.write_text("{not json")
    profile._LOADED.clear()
    assert profile.find(config, cfg) is None


def test_unknown_outside_every_regime():
    prof = profile.Profile(("1",), (profile.Regime("b == 1", (profile.Row(Phase.LOAD, {Category.WEIGHTS: ((0, 512),)}),)),))
    assert prof.peak(1, 9).allocated == 512
    assert prof.peak(2, 9) is None


@pytest.mark.parametrize("text", ["__import__('os')", "b.real", "open", "[b]", "1.5*b", "f(b)", "b if s else 1"])
def test_formulas_only_integer_arithmetic(text):
    with pytest.raises(MemplanError, match="profile formula"):
        profile.formula(text)


def test_formula_arithmetic():
    # 512-byte rounding of 3*b*s bytes: 512 * ceil(3*b*s / 512)
    assert profile.evaluate("-512*((-(3*b*s))//512)", 4, 100) == 1536
    assert profile.evaluate("(b >= 2) and (s < 16)", 2, 15) is True


# ---- the analytic tier -------------------------------------------------------------------------


def test_unknown_type_traces_on_first_use_then_answers_from_the_cache(tmp_path, monkeypatch):
    """stablelm has neither hand formulas nor a tensor table: the first estimate traces a profile, the
    second reads it."""
    from transformers import AutoConfig

    from memplan.api import estimate_config
    from memplan.tracing import trace

    d = tmp_path / "stablelm"
    d.mkdir()
    fields = AutoConfig.for_model("stablelm", vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64).to_dict()
    write(d, fields)
    cfg = Config(model=str(d), method="zo-sgd", dtype="bf16", batch=3, seq=20)
    with pytest.raises(MemplanError, match="has no closed-form activations for model_type 'stablelm' and "
                                           "tracing them is off"):
        estimate_config(cfg, search=False)  # the suite's MEMPLAN_TRACE=never
    monkeypatch.setenv("MEMPLAN_TRACE", "auto")
    first = estimate_config(cfg, search=False)
    assert len(list(profile.cache_dir().glob("*.json"))) == 1
    profile._LOADED.clear()
    import memplan.symbolic

    with monkeypatch.context() as m:
        m.setattr(memplan.symbolic, "build_profile", lambda *a, **k: pytest.fail("traced again"))
        second = estimate_config(cfg.replace(batch=5, seq=33), search=False)
    traced = trace(cfg.replace(batch=5, seq=33))
    assert second.peak_allocated_bytes == traced.peak_allocated_bytes
    assert second.components == traced.components and first.tier.value == "analytic"
    # batch 1 is another regime: traced when first asked for, then kept in the cached file
    (path,) = profile.cache_dir().glob("*.json")
    assert len(json.loads(path.read_text())["regimes"]) == 1
    third = estimate_config(cfg.replace(batch=1, seq=40), search=False)
    assert third.peak_allocated_bytes == trace(cfg.replace(batch=1, seq=40)).peak_allocated_bytes
    assert len(json.loads(path.read_text())["regimes"]) == 2


def test_a_table_family_is_traced_on_first_use(tmp_path, monkeypatch, capsys):
    """qwen3's activations borrow llama's formulas (approximate, said in a warning) where tracing is off
    (MEMPLAN_TRACE=never); by default the first estimate traces its profile, caches it, and gives the
    trace's bytes with no warning; the CLI says so on stderr while it traces."""
    from transformers import AutoConfig

    from memplan.api import estimate_config
    from memplan.cli import main
    from memplan.tracing import trace

    fields = AutoConfig.for_model("qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=64).to_dict()
    write(tmp_path, fields)
    cfg = Config(model=str(tmp_path), method="fo-adam", dtype="bf16", batch=3, seq=20)
    before = estimate_config(cfg, search=False)
    assert any("approximate" in w for w in before.warnings)
    assert not list(profile.cache_dir().glob("*.json"))
    monkeypatch.setenv("MEMPLAN_TRACE", "auto")
    after, traced = estimate_config(cfg, search=False), trace(cfg)
    assert after.peak_allocated_bytes == traced.peak_allocated_bytes
    assert not any("approximate" in w for w in after.warnings)
    assert len(list(profile.cache_dir().glob("*.json"))) == 1
    with pytest.raises(SystemExit) as done:  # the CLI: a status line on stderr before the trace of a new option
        main(["fit", str(tmp_path), "-m", "fo-sgd", "--dtype", "bf16", "--batch", "3", "--seq", "20"])
    assert done.value.code == 0
    assert "memplan: tracing" in capsys.readouterr().err
    monkeypatch.setenv("MEMPLAN_TRACE", "sometimes")
    with pytest.raises(MemplanError, match="MEMPLAN_TRACE='sometimes': valid values are auto"):
        estimate_config(cfg.replace(method="zo-adam"), search=False)


def test_unknown_type_without_torch_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from memplan.cli import main

    write(tmp_path, {"model_type": "stablelm", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setenv("MEMPLAN_TRACE", "auto")
    with pytest.raises(SystemExit) as e:
        main(["fit", str(tmp_path), "--gpu", "a100-80gb"])
    assert e.value.code == 2
    with pytest.raises(MemplanError, match=r"model_type 'stablelm'.*pip install 'memplan\[torch\]'"):
        from memplan.api import estimate

        estimate(str(tmp_path), "zo-sgd")


# ---- the case: Llama-2-7B, bf16, eager, batch 8 x 2048 ----------------------------------

LLAMA_2_7B_2_LAYERS = {  # Llama-2-7B's widths (meta-llama/Llama-2-7b-hf config.json), 2 of its 32 layers
    "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


@pytest.mark.parametrize("method, bound", [("zo-sgd", 0)])
def test_llama_2_7b_widths_at_8_x_2048_agree_with_the_trace(tmp_path, method, bound):
    """The hand formulas missed the full-depth trace here by -7 % (zo-sgd); a profile computed at these
    widths gives the trace's bytes. (forward-grad: its hand formulas give the trace's bytes, tests/test_fg_vs_trace.py.)"""
    from memplan.api import estimate_config
    from memplan.pipeline import make_profile, model_of
    from memplan.tracing import trace

    write(tmp_path, LLAMA_2_7B_2_LAYERS)
    cfg = Config(model=str(tmp_path), method=method, dtype="bf16", attention="eager", batch=8, seq=2048)
    make_profile(cfg, model_of(cfg.model))  # what `memplan profile` does
    got, want = estimate_config(cfg, search=False), trace(cfg)
    assert abs(got.peak_allocated_bytes - want.peak_allocated_bytes) <= bound * want.peak_allocated_bytes
    if bound == 0:
        assert got.components == want.components and got.phases == want.phases


@pytest.mark.parametrize("method", ["zo-sgd"])
def test_shipped_llama_2_7b_profiles_give_the_full_depth_trace(method):
    """memplan ships the profiles of this case: `fit` answers it without torch, with the trace's bytes
    (recorded in calibration/profiles-7b.jsonl by calibration/llama_7b_case.py)."""
    from pathlib import Path

    from memplan.api import estimate_config
    from memplan.pipeline import AnalyticTier

    records = [json.loads(line) for line in
               (Path(__file__).parents[1] / "calibration" / "profiles-7b.jsonl").read_text().splitlines()]
    rec = next(r for r in records if r["method"] == method)
    cfg = Config(model="llama-2-7b", method=method, dtype="bf16", attention="eager", batch=8, seq=2048)
    est = estimate_config(cfg, search=False)
    tensor = est.peak_allocated_bytes - est.components[Category.WORKSPACE]
    assert not AnalyticTier().tensor_peak(cfg, None, None).workspace_counted  # profile-backed
    assert abs(tensor - rec["trace_bytes"]) <= rec["bound"] * rec["trace_bytes"]


def test_profile_command_caches_what_fit_then_reads(tiny_dir, capsys):
    from memplan.cli import main
    from memplan.tracing import trace

    with pytest.raises(SystemExit) as e:
        main(["profile", tiny_dir[0], "-m", "zo-adam", "--dtype", "bf16", "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)["profiles"]
    assert [p["method"] for p in out] == ["zo-adam"] and out[0]["source"] == "symbolic"
    from pathlib import Path

    assert Path(out[0]["path"]).is_file() and Path(out[0]["path"]).parent == profile.cache_dir()
    with pytest.raises(SystemExit) as e:
        main(["fit", tiny_dir[0], "-m", "zo-adam", "--dtype", "bf16", "--batch", "6", "--seq", "45", "--json"])
    fitted = json.loads(capsys.readouterr().out)["estimates"][0]
    traced = trace(Config(model=tiny_dir[0], method="zo-adam", dtype="bf16", batch=6, seq=45))
    assert fitted["peak_allocated_bytes"] == traced.peak_allocated_bytes
    assert fitted["components"] == {c.value: n for c, n in traced.components.items()}


def test_several_first_uses_are_traced_side_by_side(tmp_path, monkeypatch):
    """`fit -m a,b` / `estimate_all` on a table family with no profiles yet: each missing profile is
    traced in its own Python process, two at a time here, into the cache the estimates then read."""
    from memplan import pipeline
    from memplan.api import estimate_config
    from memplan.tracing import trace

    monkeypatch.setenv("MEMPLAN_TRACE", "auto")
    fields = {"model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 64}
    cfgs = [Config(model=write(tmp_path, fields), method=m, dtype="bf16", batch=1, seq=20) for m in ("zo-sgd", "fo-sgd")]
    assert pipeline.missing_profiles(cfgs) == cfgs
    assert pipeline.prefetch_profiles(cfgs, workers=2) == 2
    assert pipeline.missing_profiles(cfgs) == []
    import memplan.symbolic

    monkeypatch.setattr(memplan.symbolic, "build_profile", lambda *a, **k: pytest.fail("traced again"))
    for cfg in cfgs:  # batch 1 and, for a max-batch search, batch 2 were traced
        for b in (1, 2):
            c = cfg.replace(batch=b)
            assert estimate_config(c, search=False).peak_allocated_bytes == trace(c).peak_allocated_bytes
    assert pipeline.prefetch_profiles(cfgs, workers=2) == 0  # nothing left to trace


def test_a_hand_family_outside_the_catalog_is_traced_on_first_use(tmp_path, monkeypatch):
    """A llama config.json that is not a catalog model: its hand formulas answer while tracing is off;
    with tracing on (the default), its first estimate traces the profile and gives the trace's bytes.
    Catalog models keep their hand formulas (checked at real widths: calibration/HAND-VS-PROFILE.md)."""
    from memplan import pipeline
    from memplan.api import estimate_config
    from memplan.tracing import trace

    cfg = Config(model=write(tmp_path, TINY_LLAMA), method="fo-adam", dtype="bf16", attention="eager",
                 batch=3, seq=50)
    hand = estimate_config(cfg, search=False)  # the suite's MEMPLAN_TRACE=never
    monkeypatch.setenv("MEMPLAN_TRACE", "auto")
    assert pipeline.traced_first(pipeline.model_of(cfg.model))
    assert not pipeline.traced_first(pipeline.model_of("llama-2-7b"))
    exact, traced = estimate_config(cfg, search=False), trace(cfg)
    assert exact.peak_allocated_bytes == traced.peak_allocated_bytes != hand.peak_allocated_bytes
    assert len(list(profile.cache_dir().glob("*.json"))) == 1


def test_every_catalog_table_family_ships_its_default_profiles():
    """tools/ship_profiles.py: zo-sgd and fo-adam at fit's defaults for every catalog model of a table
    family, found by the key fit looks up, covering one-token sequences and both batch regimes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import ship_profiles

    wanted = ship_profiles.wanted()
    assert len(wanted) >= 70
    for model, method in wanted:
        path = ship_profiles.path_of(model, method)
        prof = profile.Profile.from_json(path.read_text(), str(path))
        assert all(prof.peak(b, s) is not None for b, s in [(1, 1), (1, 512), (4, 512), (64, 2)]), (model, method)


def test_a_shipped_profile_gives_the_whole_model_trace():
    """A sample of the shipped profiles (traced from shallow copies where deep): Qwen3-0.6B zo-sgd, fp16,
    sdpa, against a concrete trace of all 28 layers at a point no trace of the profile ran at."""
    from memplan import pipeline
    from memplan.tracing import trace_step

    cfg = Config(model="Qwen/Qwen3-0.6B", method="zo-sgd", batch=3, seq=333)
    prof = profile.find(pipeline.model_of(cfg.model).config, cfg)
    assert prof is not None
    assert prof.peak(3, 333).allocated == trace_step(cfg).peak.allocated
