"""`memplan fit` in-process: the JSON contract, exit codes, and one line for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memplan.cli import main
from memplan.result import Category

CONTRACT_KEYS = {"model", "method", "scheme", "dtype", "batch", "seq", "attention", "peak_phase", "components",
                 "peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes", "gpu", "fits",
                 "headroom_bytes", "max_batch", "max_seq"}


def test_json_contract_with_gpu(fit_json):
    code, ests = fit_json("opt-13b", "--method", "all", "--gpu", "h100", "--batch", "16")
    assert [e["method"] for e in ests][:8] == ["fo-sgd", "fo-adam", "forward-grad", "zo-sgd", "zo-sgd-mmt",
                                            "zo-sgd-cons", "zo-sgd-sign", "zo-adam"]
    for e in ests:
        assert CONTRACT_KEYS <= e.keys()
        assert set(e["components"]) == {c.value for c in Category}
        assert sum(e["components"].values()) == e["peak_device_bytes"]
        assert e["gpu"]["name"] == "h100-80gb" and e["gpu"]["total_bytes"] == 85_520_809_984
        assert e["headroom_bytes"] == e["gpu"]["total_bytes"] - e["peak_device_bytes"]
        assert e["fits"] == (e["headroom_bytes"] >= 0)
    # fo-adam of a 13B model in fp16 (weights + grads + 2 states = 8 B/param = 96 GiB) cannot fit 80 GB.
    assert code == 1 and not ests[1]["fits"] and ests[1]["max_batch"] == 0


def test_without_gpu_no_verdict_exit_0(fit_json, monkeypatch):
    monkeypatch.setattr("memplan.hardware.detect", lambda: [])
    code, ests = fit_json("opt-125m", "-m", "fo-adam,zo-sgd")
    assert code == 0 and len(ests) == 2
    assert all(e["gpu"] is None and e["fits"] is None and e["max_batch"] is None for e in ests)


def test_seq_beyond_positions_warns_but_estimates(fit_json):
    code, (est,) = fit_json("opt-125m", "--seq", "4096", "--gpu", "h100")
    assert est["peak_device_bytes"] > 0 and "beyond" in est["warnings"][0]


def test_config_json_path(fit_json, tmp_path):
    cfg = {"model_type": "opt", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _, (by_file,) = fit_json(str(tmp_path / "config.json"))
    _, (by_dir,) = fit_json(str(tmp_path))
    assert by_file["peak_allocated_bytes"] == by_dir["peak_allocated_bytes"] > 0


@pytest.mark.parametrize("args,message", [
    (["opt-14b"], "unknown model 'opt-14b' (did you mean"),
    (["opt-13b", "--gpu", "h1000"], "unknown GPU 'h1000'"),
    (["opt-13b", "--method", "zo"], "unknown method 'zo' (did you mean lozo?); valid: fo-adam"),
    (["opt-13b", "--scheme", "qlora"], "unknown scheme 'qlora' (did you mean lora?); valid: ft, lora, prefix, prompt"),
    (["opt-13b", "--dtype", "fp8"], "unknown dtype 'fp8'; valid: amp-bf16"),
    (["opt-13b", "--attention", "flash"], "unknown attention 'flash'; valid: eager, sdpa"),
    (["opt-13b", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["opt-13b", "--seq", "-5"], "--seq must be a positive integer, got -5"),
    (["opt-13b", "--scheme", "lora", "--lora-targets", "foo"], "LoRA targets foo match no module of facebook/opt-13b"),
])
def test_bad_input_one_line_exit_2(run_cli, args, message):
    code, out, err = run_cli("fit", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON (line 1, column 2"),
    ('{"model_type": "opt", "vocab_size": 10}', "lacks 'hidden_size'"),
    # a type without hand formulas is traced (with torch): one transformers does not know fails there
    ('{"model_type": "no-such-type"}', "transformers cannot build a 'no-such-type' config"),
    ('{"model_type": "opt", "vocab_size": 10, "hidden_size": -1}', "'hidden_size' must be a positive integer"),
])
def test_malformed_config_json(run_cli, tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    code, _, err = run_cli("fit", str(path))
    assert code == 2 and message in err and err.count("\n") == 1


def test_usage_errors_from_the_console_entry_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "opt-13b", "--batch", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memplan: error:") and "--batch" in err


def test_fit_imports_no_torch_transformers_matplotlib():
    code = ("import sys; from memplan.cli import main\n"
            "try:\n    main(['fit', 'opt-13b', '--method', 'all', '--gpu', 'h100', '--json'])\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'huggingface_hub') if m in sys.modules]\n"
            "sys.stderr.write(repr(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip().endswith("[]"), done.stderr


@pytest.mark.parametrize("method", ["zo-sgd", "fo-adam"])
def test_fit_on_a_catalog_table_family_reads_its_shipped_profile(method):
    """Qwen3-8B has no hand formulas; the profiles shipped for fit's defaults (zo-sgd, fo-adam) answer
    exactly with no torch import and no trace, max batch and max seq searches included (their regimes,
    one-token sequences too, are in the shipped file), even with tracing on (MEMPLAN_TRACE=auto)."""
    code = ("import sys, json, io, contextlib; from memplan.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            f"        main(['fit', 'qwen3-8b', '--method', '{method}', '--gpu', 'h100', '--json'])\n"
            "    except SystemExit:\n        pass\n"
            "est = json.loads(out.getvalue())['estimates'][0]\n"
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'huggingface_hub') if m in sys.modules]\n"
            "sys.stderr.write(repr([heavy, est['max_batch'] > 0, [w for w in est['warnings'] if 'approximate' in w]]))")
    env = {**os.environ, "MEMPLAN_TRACE": "auto"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.stderr.strip().endswith("[[], True, []]"), done.stderr
    assert "memplan: tracing" not in done.stderr
