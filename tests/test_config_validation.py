"""Config files, margins and sweep values that are not what they claim: one line and exit 2, never a crash.

Each case is a defect found in review (F2-F10, C5, C8, H1): before the fix it crashed with a
traceback, hung, or gave a confident estimate of a model that cannot exist.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from memplan import charts, configs
from memplan.errors import MemplanError
from memplan.margin import Margin
from memplan.spec import catalog_entries, resolve, spec_from_config

OPT_125M = next(e for e in catalog_entries() if e["id"] == "facebook/opt-125m")["config"]
LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 768, "num_hidden_layers": 2,
         "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 40,
         "max_position_embeddings": 32}


def one_line(code: int, out: str, err: str) -> str:
    """The error line of a refused input, after checking it is the only thing printed."""
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("memplan: error: "), err
    assert "Traceback" not in err
    return err.strip()


def write(tmp_path: Path, name: str, body: str | bytes | dict) -> Path:
    path = tmp_path / name
    if isinstance(body, dict):
        body = json.dumps(body)
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


# ---- the file itself (F3, F4, F5, size, F10, F2) ---------------------------------------------

FILES = {
    # F3: `head -c 300 /dev/urandom`; 0xff never occurs in UTF-8.
    "binary": (b"\xff\xfe\x00\x01" + bytes(range(256)), r"not UTF-8 text \(byte 0xff at offset 0\)"),
    "latin-1": ('{"model_type": "opt", "name": "caf\xe9"}'.encode("latin-1"), r"not UTF-8 text \(byte 0xe9"),
    # F4: the JSON reader recurses once per bracket.
    "deep": ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    "deep-in-a-key": ('{"model_type": "opt", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    # F5: Python refuses to convert integers of more than 4300 digits.
    "huge-int": (json.dumps(OPT_125M)[:-1] + ', "hidden_size_x": ' + "9" * 5000 + "}",
                 r"key 'hidden_size_x' is an integer of 5000 digits; memplan reads integers of at most 100"),
    "huge-int-nested": ('{"a": {"b": [1, -' + "7" * 4400 + "]}}", r"key 'a\.b\[1\]' is an integer of 4400 digits"),
    "array": ("[1, 2]", "expected a JSON object of config fields, got an array"),
    "null": ("null", "expected a JSON object of config fields, got null"),
    "bom": ("\ufeff" + json.dumps(OPT_125M), "Unexpected UTF-8 BOM"),
}


@pytest.mark.parametrize("case", FILES)
def test_bad_file_is_one_line(run_cli, tmp_path, case):
    body, message = FILES[case]
    path = write(tmp_path, "config.json", body)
    line = one_line(*run_cli("fit", str(path)))
    assert str(path) in line
    with pytest.raises(MemplanError, match=message):
        resolve(str(path))


def test_file_over_the_size_cap_is_refused_unread(run_cli, tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:  # sparse: 65 MiB of nothing, costs no disk
        f.truncate(configs.MAX_FILE_BYTES + (1 << 20))
    start = time.perf_counter()
    line = one_line(*run_cli("fit", str(path)))
    assert "larger than 64 MiB" in line and time.perf_counter() - start < 2


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_file_says_not_a_regular_file(run_cli):
    # F10: it said "/dev/zero: no such file".
    line = one_line(*run_cli("fit", "/dev/zero"))
    assert line == ("memplan: error: /dev/zero: not a regular file (a character device); "
                    "give a config.json or a folder holding one")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            configs.read_config(fifo)
        except MemplanError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and "not a regular file (a FIFO)" in outcome[0]
    with pytest.raises(MemplanError, match=r"not a regular file \(a FIFO\)"):
        resolve(str(fifo))


def test_empty_model_name_says_so(run_cli):
    # F2: '' resolved to the current folder: "memplan: error: : folder holds no config.json".
    for name in ("", "  "):
        line = one_line(*run_cli("fit", name))
        assert "the model name is empty" in line
    with pytest.raises(MemplanError, match="the model name is empty"):
        resolve("")


@pytest.mark.parametrize("name,message", [
    ("a" * 5000, "File name too long"),
    ("~no-such-user-memplan/config.json", "home directory"),
])
def test_paths_that_cannot_be_looked_at(run_cli, name, message):
    line = one_line(*run_cli("fit", name))
    assert message in line and len(line) < 400


def test_folder_without_config_is_still_named(tmp_path):
    with pytest.raises(MemplanError, match="folder holds no config.json"):
        resolve(str(tmp_path))


# ---- the fields (F6, F7, F8, F9) -------------------------------------------------------------

FIELDS = {
    # F6: wrong-typed optional fields went straight into the spec and crashed later.
    "wepd-string": (OPT_125M, {"word_embed_proj_dim": "abc"}, r"'word_embed_proj_dim' must be a positive integer, got 'abc'"),
    "head-dim-string": (LLAMA, {"head_dim": "x"}, r"'head_dim' must be a positive integer, got 'x'"),
    "n-inner-float": ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 10,
                       "n_positions": 16}, {"n_inner": 256.0}, r"'n_inner' must be a positive integer, got 256\.0"),
    # F7: shapes that cannot exist got a confident estimate and exit 0.
    "wepd-negative": (OPT_125M, {"word_embed_proj_dim": -5}, r"'word_embed_proj_dim' must be a positive integer, got -5"),
    "wepd-zero": (OPT_125M, {"word_embed_proj_dim": 0}, r"'word_embed_proj_dim' must be a positive integer, got 0"),
    "kv-heads-zero": (LLAMA, {"num_key_value_heads": 0}, r"'num_key_value_heads' must be a positive integer, got 0"),
    "kv-heads-negative": (LLAMA, {"num_key_value_heads": -4}, r"'num_key_value_heads' must be a positive integer, got -4"),
    "head-dim-negative": (LLAMA, {"head_dim": -64}, r"'head_dim' must be a positive integer, got -64"),
    "heads-exceed-hidden": (OPT_125M, {"num_attention_heads": 1024},
                            r"'num_attention_heads' \(1024\) exceeds 'hidden_size' \(768\)"),
    "heads-do-not-divide": (OPT_125M, {"num_attention_heads": 7},
                            r"'hidden_size' \(768\) is not a multiple of 'num_attention_heads' \(7\), and there is no head_dim"),
    "gpt2-heads-do-not-divide": ({"model_type": "gpt2", "n_embd": 64, "n_head": 5, "n_layer": 2, "vocab_size": 10,
                                  "n_positions": 16}, {}, r"'n_embd' \(64\) is not a multiple of 'n_head' \(5\)"),
    # F8: a string "false" counted as true; a string dropout was accepted.
    "tie-string": (OPT_125M, {"tie_word_embeddings": "false"},
                   r"'tie_word_embeddings' must be true or false \(a JSON boolean\), got 'false'"),
    "bias-int": (LLAMA, {"attention_bias": 1}, r"'attention_bias' must be true or false"),
    "dropout-string": (OPT_125M, {"dropout": "high"}, r"'dropout' is a dropout probability: a number in \[0, 1\), got 'high'"),
    "dropout-one": (OPT_125M, {"attention_dropout": 1.0}, r"'attention_dropout' is a dropout probability"),
    "pdrop-negative": ({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 10,
                        "n_positions": 16}, {"resid_pdrop": -0.1}, r"'resid_pdrop' is a dropout probability"),
    "prob-nan": ({"model_type": "roberta"}, {"hidden_dropout_prob": float("nan")}, r"'hidden_dropout_prob' is a dropout"),
    "activation-number": (LLAMA, {"hidden_act": 3}, r"'hidden_act' must be a string, got 3"),
    # F9: 10^6 layers took 70 s and 5.6 GB; 10^9 never finished.
    "layers-million": (OPT_125M, {"num_hidden_layers": 10**6},
                       r"'num_hidden_layers' is 1000000; memplan reads a layer count of at most 10000"),
    "layers-billion": (LLAMA, {"num_hidden_layers": 10**9}, r"'num_hidden_layers' is 1000000000; .* at most 10000"),
    "hidden-huge": (LLAMA, {"hidden_size": 10**30}, r"'hidden_size' is 10{30}; memplan reads a width of at most 1048576"),
    "vocab-huge": (OPT_125M, {"vocab_size": 10**12}, r"'vocab_size' is 1000000000000; .* at most 16777216"),
    "ffn-huge": (OPT_125M, {"ffn_dim": 1 << 21}, r"'ffn_dim' is 2097152; .* at most 1048576"),
}


@pytest.mark.parametrize("case", FIELDS)
def test_bad_field_is_one_line_naming_file_and_key(run_cli, tmp_path, case):
    base, change, message = FIELDS[case]
    path = write(tmp_path, "config.json", {**base, **change})
    start = time.perf_counter()
    line = one_line(*run_cli("fit", str(path), "--gpu", "h100"))
    assert time.perf_counter() - start < 5  # F9: answered at once
    assert line.startswith(f"memplan: error: {path}: ")
    with pytest.raises(MemplanError, match=message):
        spec_from_config({**base, **change}, "x", where="cfg.json")
    with pytest.raises(MemplanError, match="^cfg.json: " + message):
        configs.check_config({**base, **change}, "cfg.json")


def test_null_optional_fields_mean_absent_and_extra_fields_are_fine():
    plain = spec_from_config(LLAMA, "x")
    nulls = spec_from_config({**LLAMA, "head_dim": None, "word_embed_proj_dim": None, "tie_word_embeddings": None,
                              "classifier_dropout": None, "some_future_field": {"a": [1, "b"]}, "dropout": 0}, "x")
    assert nulls.param_count == plain.param_count and nulls.tensors == plain.tensors
    # OPT ties by default and has dropout 0.1: null must mean that default, not False / a crash.
    opt_nulls = {**OPT_125M, "tie_word_embeddings": None, "enable_bias": None, "dropout": None,
                 "attention_dropout": None, "layer_norm_elementwise_affine": None}
    spec, plain = spec_from_config(opt_nulls, "x"), spec_from_config(OPT_125M, "x")
    assert spec.tensors == plain.tensors and spec.hidden_dropout == plain.hidden_dropout
    assert resolve_peak(opt_nulls) == resolve_peak(OPT_125M)


def resolve_peak(cfg: dict) -> int:
    from memplan.api import estimate_config
    from memplan.options import Config

    spec = spec_from_config(cfg, "x")
    return estimate_config(Config(model="opt-125m", method="fo-adam"), None, spec=spec).peak_device_bytes


def test_explicit_head_dim_lets_heads_not_divide_hidden():
    # Gemma-style: q_dim = heads * head_dim need not equal hidden.
    spec = spec_from_config({**LLAMA, "num_attention_heads": 10, "num_key_value_heads": 5, "head_dim": 64}, "x")
    assert spec.q_dim == 640 and spec.kv_dim == 320


@pytest.mark.parametrize("entry", catalog_entries(), ids=[e["id"] for e in catalog_entries()])
def test_every_catalog_config_passes_the_checks(entry):
    configs.check_config(entry["config"], entry["id"])


def test_a_valid_config_file_gives_the_catalog_numbers(tmp_path):
    path = write(tmp_path, "config.json", OPT_125M)
    assert resolve(str(path)).param_count == resolve("opt-125m").param_count
    assert configs.read_config(path) == OPT_125M


def test_untraceable_fallback_reads_through_the_same_checks(tmp_path):
    # steps.model_config_dict reads configs memplan's catalog does not cover (for the trace tier).
    from memplan.steps import model_config_dict

    bert = {"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4, "hidden_dropout_prob": 0.1}
    assert model_config_dict(str(write(tmp_path, "config.json", bert)))[1] == bert
    with pytest.raises(MemplanError, match="not UTF-8 text"):
        model_config_dict(str(write(tmp_path, "config.json", b"\xff{}")))
    with pytest.raises(MemplanError, match="'hidden_dropout_prob' is a dropout probability"):
        model_config_dict(str(write(tmp_path, "config.json", {**bert, "hidden_dropout_prob": "high"})))
    with pytest.raises(MemplanError, match="at most 10000"):
        model_config_dict(str(write(tmp_path, "config.json", {**bert, "num_hidden_layers": 10**6})))


# ---- margins (C5, C8) ------------------------------------------------------------------------

PLAN = "gpus: [h100-80gb]\nmargin: {margin}\nruns:\n  - model: opt-125m\n"


@pytest.mark.parametrize("text", ["99.99999%", "5%", "2.5%", "1e-20%", "0.1%", "2GiB", "512 MiB", "1.5GB", "0"])
def test_margin_prints_what_parses_back(text):
    m = Margin.parse(text)
    assert Margin.parse(str(m)) == m
    assert str(Margin.parse("5%")) == "5%" and str(Margin.parse("2GiB")) == "2GiB"


def test_margin_just_under_100_percent_checks_without_crashing(run_cli, tmp_path):
    # C5: 99.99999% was stored as "100%", which plan.check then refused with a traceback.
    path = write(tmp_path, "m.yaml", PLAN.format(margin="99.99999%"))
    code, out, err = run_cli("check", str(path), "--json")
    assert code == 1 and "Traceback" not in err
    (result,) = json.loads(out)["results"]
    assert result["margin_bytes"] == Margin.parse("99.99999%").bytes_of(result["total_bytes"])


@pytest.mark.parametrize("text,message", [
    ("9" * 400 + "GiB", "an amount must be at most 1024TiB"),  # float overflowed: OverflowError
    ("1025TiB", "an amount must be at most 1024TiB"),
    ("100%", r"a share must be in \[0%, 100%\)"),
    ("99.9999999999999999999%", r"a share must be in \[0%, 100%\)"),  # rounds to 100.0
    ("nan%", r"a share must be in \[0%, 100%\)"),
])
def test_margin_out_of_range_is_refused_at_parse(text, message):
    with pytest.raises(ValueError, match=message):
        Margin.parse(text)


def test_margin_error_is_short_for_a_huge_value():
    # A YAML alias bomb expands to gigabytes; the message must not carry it.
    bomb = [["lol"] * 9] * 9
    for _ in range(5):
        bomb = [bomb] * 9
    with pytest.raises(ValueError) as info:
        Margin.parse(bomb)
    assert len(str(info.value)) < 200


def test_margin_larger_than_the_gpu_is_bad_input():
    # C8: `margin: 100TiB` gave budget -102320 GiB and "no fit".
    total = 80 << 30
    Margin.parse("79GiB").check_against(total, "a100-80gb")
    Margin.parse("99.9%").check_against(total, "a100-80gb")
    for text in ("80GiB", "100TiB"):
        with pytest.raises(MemplanError, match=r"is not less than a100-80gb's 80\.00 GiB; a margin must leave room"):
            Margin.parse(text).check_against(total, "a100-80gb")


def test_plan_margin_larger_than_the_gpu_exits_2(run_cli, tmp_path):
    # C8 end to end: needs plan.check to call Margin.check_against for each GPU.
    path = write(tmp_path, "m.yaml", PLAN.format(margin="100TiB"))
    line = one_line(*run_cli("check", str(path)))
    assert "margin" in line and "h100-80gb" in line


# ---- sweep values (H1) -----------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ("1,100000000000000000000", "--values: each at most 1073741824 (2^30), got 1,100000000000000000000"),
    ("1,1073741825", "each at most 1073741824"),
    ("0,8", "--values: positive integers, got 0,8"),
    (",".join(str(v) for v in range(1, 300)), "--values: at most 256 values, got 299"),
])
def test_sweep_values_out_of_range_are_one_line(run_cli, tmp_path, values, message):
    out = tmp_path / "s.png"
    line = one_line(*run_cli("chart", "sweep", "opt-125m", "--gpu", "a100-80gb", "--over", "batch",
                             "--values", values, "-o", str(out)))
    assert message in line
    assert not out.exists()


@pytest.mark.parametrize("values", [[1, 10**20], [True, 2], [1, 2.5], []])
def test_sweep_library_refuses_bad_values(values):
    with pytest.raises(MemplanError, match="--values"):
        charts.sweep("opt-125m", ["zo-sgd"], "a100-80gb", over="batch", values=values)


def test_sweep_at_the_bound_still_works():
    c = charts.sweep("opt-125m", ["zo-sgd"], "a100-80gb", over="seq", values=[1, 1 << 30])
    assert c.values == [1, 1 << 30] and all(isinstance(n, int) and n > 0 for n in c.peak_bytes["zo-sgd"])


def test_chart_margin_larger_than_the_gpu_exits_2(run_cli, tmp_path):
    # C8 for charts: a margin that keeps the whole GPU free is bad input, not a chart of misfits.
    line = one_line(*run_cli("chart", "grid", "--gpu", "a100-80gb", "--models", "opt-125m", "--margin", "100TiB",
                             "-o", str(tmp_path / "g.png")))
    assert "--margin" in line and "a100-80gb" in line
    assert not (tmp_path / "g.png").exists()
