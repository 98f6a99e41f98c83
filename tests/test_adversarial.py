"""Generated and hostile input for the whole command line: configs, plans, `fit` arguments, output targets.

The invariant, for every input: exit 0 or 1 with a valid estimate (the JSON parses, byte counts are
non-negative integers, the peak is the sum of its components), or exit 2 with exactly one line on
stderr that starts `memplan: error:`. Never another exit code, never a traceback.

Everything runs in-process through the real entry point (`memplan.cli.main`, which is what turns
usage errors into one line), inside typer's CliRunner isolation; no subprocesses. The example counts
keep the file under a minute on a slow two-core machine.
"""

from __future__ import annotations

import json
import os
import select
import stat
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memplan import configs
from memplan.cli import main
from memplan.errors import MemplanError
from memplan.hardware import gpu_names
from memplan.margin import Margin
from memplan.options import Attention, Dtype, Method, Scheme
from memplan.spec import catalog_entries, spec_from_config

_runner = CliRunner()


def examples(n: int) -> settings:
    """`n` examples, no per-example deadline (a shared CI machine is slow at times)."""
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_SCRATCH = tempfile.TemporaryDirectory(prefix="memplan-adversarial-")
SCRATCH = Path(_SCRATCH.name)


# ---- running the command line and judging what it did ------------------------------------------

def memplan(*argv: str) -> tuple[int, str, str]:
    """Run `memplan ARGV...` in-process through the console entry point: (exit code, stdout, stderr).

    An exception that escapes `main` is what a user sees as a traceback: it fails the caller.
    """
    with _runner.isolation() as (out, err, _):
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            pytest.fail(f"memplan {_argv(argv)} raised:\n{traceback.format_exc()}")
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")


def _argv(argv) -> str:
    return " ".join(repr(a) if len(a) < 80 else repr(a[:77] + "...") for a in argv)


def assert_one_line_error(argv, code: int, out: str, err: str) -> None:
    assert code == 2, (argv, code, err)
    assert err.startswith("memplan: error: ") and err.endswith("\n") and err.count("\n") == 1, (argv, err[:2000])
    assert "Traceback" not in err


def assert_estimate(e: dict) -> None:
    """One estimate's JSON: byte counts are non-negative ints and the peak is the sum of its parts."""
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes"):
        assert type(e[key]) is int and e[key] >= 0, (key, e[key])
    assert e["components"], e
    for category, n in e["components"].items():
        assert type(n) is int and n >= 0, (category, n)
    assert sum(e["components"].values()) == e["peak_device_bytes"]
    assert e["peak_allocated_bytes"] <= e["peak_reserved_bytes"] <= e["peak_device_bytes"]
    if e.get("gpu"):
        assert type(e["gpu"]["total_bytes"]) is int and e["gpu"]["total_bytes"] > 0
        assert e["headroom_bytes"] == e["gpu"]["total_bytes"] - e["peak_device_bytes"]
    for key in ("max_batch", "max_seq"):
        assert e.get(key) is None or (type(e[key]) is int and e[key] >= 0), (key, e[key])


def assert_outcome(argv, code: int, out: str, err: str, *, kind: str) -> None:
    """The invariant: a verdict with valid numbers (0/1), or one line of bad input (2)."""
    assert code in (0, 1, 2), (argv, code, out[-500:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out, (argv, err[-2000:])
    if code == 2:
        assert_one_line_error(argv, code, out, err)
        return
    if "--json" not in argv:
        return
    doc = json.loads(out)
    if kind == "fit":
        assert doc["estimates"]
        for e in doc["estimates"]:
            assert_estimate(e)
        assert code == (1 if any(e["fits"] is False for e in doc["estimates"]) else 0)
    else:  # check
        assert doc["results"] and doc["fits"] == (code == 0)
        for r in doc["results"]:
            assert_estimate(r["estimate"])
            for key in ("total_bytes", "margin_bytes"):
                assert type(r[key]) is int and r[key] >= 0, (key, r[key])
            assert r["fits"] == (r["peak_device_bytes"] <= r["budget_bytes"])


# ---- config.json files -------------------------------------------------------------------------

_CATALOG = {e["id"]: e["config"] for e in catalog_entries()}
BASES = [
    _CATALOG["facebook/opt-125m"], _CATALOG["facebook/opt-350m"], _CATALOG["gpt2"], _CATALOG["roberta-base"],
    {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 40, "max_position_embeddings": 32},
    {"model_type": "qwen2", "vocab_size": 151, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
     "num_key_value_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": True},
]
FIELDS = sorted({*configs.INT_FIELDS, *configs.BOOL_FIELDS, *configs.STR_FIELDS, "dropout", "attention_dropout",
                 "resid_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob", "model_type",
                 "layer_norm_eps", "rope_scaling", "auto_map"})
JUNK = st.sampled_from([
    -(2**63), -64, -1, 0, 1, 2, 3, 4, 7, 8, 12, 64, 768, 10**6, 2**31, 2**70, 10**30, 0.0, 0.5, 0.999, 1.0, 64.0,
    float("nan"), float("inf"), -float("inf"), True, False, None, "", "8", "abc", "false", "true", "0.1", "opt",
    "llama", "bert", [], [8], {}, {"a": 1}, "\x00", "é" * 3,
])
config_dict = st.builds(
    lambda base, changes, dropped: {**{k: v for k, v in base.items() if k not in dropped}, **changes},
    st.sampled_from(BASES),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JUNK, max_size=3),
    st.sets(st.sampled_from(FIELDS), max_size=2),
)


@st.composite
def config_bytes(draw) -> bytes:
    """A config file's bytes: mostly mutated real configs, some raw junk, deep nesting or huge integers."""
    mode = draw(st.sampled_from(["dict"] * 6 + ["bytes", "truncated", "deep", "huge-int", "not-an-object"]))
    if mode == "bytes":
        return draw(st.binary(max_size=300))
    if mode == "deep":
        depth = draw(st.sampled_from([1, 10, 500, 5_000, 100_000]))
        return ('{"model_type": "opt", "x": ' + "[" * depth + "]" * depth + "}").encode()
    if mode == "huge-int":
        digits = draw(st.sampled_from([50, 101, 4301, 6000]))
        key = draw(st.sampled_from(["hidden_size", "num_hidden_layers", "whatever"]))
        base = json.dumps(draw(st.sampled_from(BASES)))
        return (base[:-1] + f', "{key}": ' + "9" * digits + "}").encode()
    if mode == "not-an-object":
        return json.dumps(draw(JUNK)).encode()
    text = json.dumps(draw(config_dict))
    if mode == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@examples(250)
@given(body=config_bytes(), methods=st.sampled_from(["all", "zo-sgd", "fo-adam,forward-grad"]))
def test_generated_config_files_give_a_verdict_or_one_line(body, methods):
    path = SCRATCH / "config.json"
    path.write_bytes(body)
    argv = ("fit", str(path), "--json", "--gpu", "h100", "-m", methods)
    assert_outcome(argv, *memplan(*argv), kind="fit")


@examples(600)
@given(cfg=config_dict)
def test_generated_config_dicts_give_a_spec_that_can_exist_or_memplan_error(cfg):
    try:
        spec = spec_from_config(cfg, "x", where="gen.json")
    except MemplanError as e:
        assert "\n" not in str(e) and str(e).startswith("gen.json")
        return
    for t in spec.tensors:  # F7: no negative or fractional dimension reaches an estimate
        assert all(type(d) is int and d >= 0 for d in t.shape), (t.name, t.shape)
    assert spec.num_layers <= configs.MAX_LAYERS and spec.num_heads % spec.num_kv_heads == 0
    assert isinstance(spec.tie_word_embeddings, bool)
    assert 0 <= spec.hidden_dropout < 1 and 0 <= spec.attention_dropout < 1


@examples(300)
@given(body=st.binary(max_size=200) | config_bytes())
def test_read_config_returns_an_object_or_memplan_error(body):
    path = SCRATCH / "read.json"
    path.write_bytes(body)
    try:
        cfg = configs.read_config(path)
    except MemplanError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert isinstance(cfg, dict)


# ---- plan files --------------------------------------------------------------------------------

GOOD_CONFIG = SCRATCH / "good" / "config.json"
GOOD_CONFIG.parent.mkdir()
GOOD_CONFIG.write_text(json.dumps(_CATALOG["facebook/opt-125m"]))
BAD_CONFIG = SCRATCH / "bad.json"
BAD_CONFIG.write_bytes(b"\xff\xfe binary")
MODELS = ["opt-125m", "gpt2", "roberta-base", "qwen2.5-0.5b", "OPT-350M", str(GOOD_CONFIG), str(BAD_CONFIG),
          "opt-14b", "", 7, None, ["opt-125m"]]
MARGINS = ["5%", "0", 0, "2GiB", "512 MiB", "99.9%", "99.99999%", "99.9999999999999999%", "100%", "150%",
           "100TiB", "1025TiB", "80GiB", "-5GiB", 5, 5.0, "nan%", "inf%", "1e-300%", "9" * 400 + "GiB", "5 %",
           None, [1, 2], {"a": 1}, True]
RUN_VALUES = {
    "model": st.sampled_from(MODELS),
    "method": st.sampled_from(["zo-sgd", "all", "fo-adam", ["zo-sgd", "fo-sgd"], "zo-sdg", "", [], 3]),
    "batch": st.sampled_from([1, 4, 16, 0, -1, 10**6, 10**30, "4", 1.5, None, True]),
    "seq": st.sampled_from([1, 128, 512, 0, -5, 10**7, "x"]),
    "scheme": st.sampled_from([s.value for s in Scheme] + ["LoRA", "full"]),
    "dtype": st.sampled_from([d.value for d in Dtype] + ["fp8"]),
    "attention": st.sampled_from([a.value for a in Attention] + ["flash"]),
    "lora_rank": st.sampled_from([8, 0, -1, 10**6]),
    "grad_checkpointing": st.sampled_from([True, False, "yes", 1]),
    "name": st.text(max_size=8) | st.just("runs[0]"),
    "momentum": st.sampled_from([0.0, 0.9, 1.0, -1, "x"]),
    "batchh": st.just(4),
}
plan_run = st.fixed_dictionaries({"model": RUN_VALUES["model"]},
                                 optional={k: v for k, v in RUN_VALUES.items() if k != "model"})
plan_doc = st.fixed_dictionaries(
    {"gpus": st.lists(st.sampled_from([*gpu_names()[:6], "h100", "A100", "h200-999gb", "", 3]), max_size=3)
             | st.sampled_from(["h100-80gb", None]),
     "runs": st.lists(plan_run, min_size=1, max_size=3) | st.sampled_from([[], None, "opt-125m"])},
    optional={"margin": st.sampled_from(MARGINS), "tier": st.sampled_from(["analytic", "fast", 3]),
              "extra": st.just(1)},
)
BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcde", "bcdef"))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB  # 9^6 leaves at *f


@st.composite
def plan_text(draw) -> str:
    """YAML of a plan: plausible ones, then the same broken in the ways people and attackers break them."""
    doc = draw(plan_doc)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    mode = draw(st.sampled_from(["as is"] * 4 + ["duplicate key", "alias bomb", "huge literal", "truncated",
                                                 "not a mapping", "tabs", "json"]))
    if mode == "duplicate key":
        key = draw(st.sampled_from(["gpus: [rtx-4090]", "margin: 50%", "tier: analytic", "runs: []"]))
        text = text + key + "\n" if draw(st.booleans()) else key + "\n" + text
    elif mode == "alias bomb":  # 397 bytes of this took 2.8 GB and 74 s in review (C4)
        target = draw(st.sampled_from(["margin", "gpus", "runs", "tier", "extra"]))
        rest = yaml.safe_dump({k: v for k, v in doc.items() if k != target}, sort_keys=False)
        text = BOMB + rest + f"{target}: *{draw(st.sampled_from('cdef'))}\n"
    elif mode == "huge literal":
        digits = "9" * draw(st.sampled_from([25, 400, 5000]))
        key = draw(st.sampled_from(["batch", "seq", "lora_rank"]))
        runs = yaml.safe_dump({"runs": [{"model": "opt-125m", key: "HUGE"}]}, sort_keys=False)
        rest = yaml.safe_dump({k: v for k, v in doc.items() if k != "runs"}, sort_keys=False)
        text = rest + runs.replace("HUGE", digits)
    elif mode == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    elif mode == "not a mapping":
        text = draw(st.sampled_from(["- a\n- b\n", "42\n", "'x'\n", "", "~\n", "[1, {a: 2}]\n", "!!python/name:os.system\n"]))
    elif mode == "tabs":
        text = text.replace("  ", "\t")
    elif mode == "json":
        text = json.dumps(doc, default=str)
    return text


@examples(200)
@given(text=plan_text())
def test_generated_plans_give_a_verdict_or_one_line(text):
    path = SCRATCH / "plan.yaml"
    path.write_text(text)
    argv = ("check", str(path), "--json")
    assert_outcome(argv, *memplan(*argv), kind="check")


@pytest.mark.parametrize("text,key", [
    ("gpus: [h100-80gb]\ngpus: [rtx-4090]\nruns:\n  - model: opt-125m\n", "gpus"),
    ("gpus: [h100-80gb]\nmargin: 5%\nmargin: 50%\nruns:\n  - model: opt-125m\n", "margin"),
    ("gpus: [h100-80gb]\nruns:\n  - {name: a, model: opt-125m, batch: 4, batch: 4000}\n", "batch"),
], ids=["gpus", "margin", "run-batch"])
def test_duplicate_plan_keys_are_refused(tmp_path, text, key):
    # C6: the last key won, silently; a CI gate then checks something nobody wrote down.
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    argv = ("check", str(path))
    code, out, err = memplan(*argv)
    assert_one_line_error(argv, code, out, err)
    assert key in err


@examples(1000)
@given(value=st.text(max_size=12) | st.sampled_from(MARGINS) | st.integers() | st.floats()
       | st.from_regex(r"\A\s?[0-9]{0,3}(\.[0-9]{0,12})?\s?(%|[kKmMgGtT]i?[bB]|[bB])?\Z"))
def test_margin_parses_to_a_margin_that_prints_back_or_value_error(value):
    try:
        m = Margin.parse(value)
    except ValueError as e:
        assert len(str(e)) < 300 and "\n" not in str(e)
        return
    assert Margin.parse(str(m)) == m  # C5: what a plan stores must parse back to the same margin
    assert 0 <= m.percent < 100 and 0 <= m.fixed_bytes <= 1 << 50
    for total in (24 << 30, 80 << 30):
        kept = m.bytes_of(total)
        assert type(kept) is int and 0 <= kept
        if kept >= total:
            with pytest.raises(MemplanError):
                m.check_against(total, "gpu")
        else:
            m.check_against(total, "gpu")


# ---- `memplan fit` arguments -------------------------------------------------------------------

NUMBERS = (st.integers(-3, 64).map(str)
           | st.sampled_from(["0", "-1", "1000000000000", str(10**30), str(2**63), str(2**64), "1e3", "abc", "",
                              "1.5", " 4", "+4", "0x10", "\u0663", "nan", "4 4"]))
FIT_OPTIONS = {
    "--method": st.lists(st.sampled_from([m.value for m in Method] + ["all", "ALL", "zo-sdg", " zo-sgd ",
                                                                      "fo-adam,zo-sgd", "zo-sgd,,fo-sgd"]),
                         min_size=1, max_size=3).map(",".join),
    "--dtype": st.sampled_from([d.value for d in Dtype] + ["FP16", "fp8", "", "x"]),
    "--scheme": st.sampled_from([s.value for s in Scheme] + ["LORA", "", "full"]),
    "--attention": st.sampled_from([a.value for a in Attention] + ["flash", ""]),
    "--batch": NUMBERS, "--seq": NUMBERS, "--lora-rank": NUMBERS, "--prefix-tokens": NUMBERS,
    "--prompt-tokens": NUMBERS, "--zo-queries": st.sampled_from(["1", "2", "0", "-1", "x"]),
    "--gpu": st.sampled_from([*gpu_names(), "auto", "", "a100", "h10", "H100", "a100-80g", "rtx-4090"]),
    "--lora-targets": st.sampled_from(["q_proj", "q_proj,v_proj", ",", "", "nope", "c_attn"]),
    "--hf-version": st.sampled_from(["current", "4.28", "4.29", ""]),
    "--perturbation": st.sampled_from(["mezo", "inplace", "x"]),
}
FIT_FLAGS = ["--grad-checkpointing", "--use-cache"]
FIT_MODELS = st.sampled_from(["opt-125m", "gpt2", "roberta-base", "qwen2.5-0.5b", "facebook/opt-350m", "OPT-125M",
                              " opt-125m ", "opt-14b", "\u00f3pt-13b", str(GOOD_CONFIG), str(BAD_CONFIG), "-", "--"])


@st.composite
def fit_argv(draw, methods=None) -> tuple[str, ...]:
    argv = ["fit", draw(FIT_MODELS)]
    chosen = draw(st.lists(st.sampled_from(sorted(FIT_OPTIONS)), max_size=5, unique=True))
    for option in chosen:
        if option != "--method" or methods is None:
            argv += [option, draw(FIT_OPTIONS[option])]
    if methods is not None:
        argv += ["--method", draw(methods)]
    argv += draw(st.lists(st.sampled_from(FIT_FLAGS), max_size=2, unique=True))
    if draw(st.integers(0, 4)):  # mostly JSON, so the numbers can be checked
        argv.append("--json")
    return tuple(argv)


@examples(400)
@given(argv=fit_argv())
def test_generated_fit_arguments_give_a_verdict_or_one_line(argv):
    assert_outcome(argv, *memplan(*argv), kind="fit")


@examples(40)
@given(argv=fit_argv(methods=st.sampled_from(["", ",", " , ", ",,", " "])))
def test_fit_with_an_empty_method_list_is_one_line(argv):
    # F1: `--method ''` and `--method ','` crashed with IndexError and exit 1.
    assert_outcome(argv, *memplan(*argv), kind="fit")


# ---- where output goes: `check --junit TARGET` and `chart -o TARGET` ----------------------------

PLAN = "gpus: [h100-80gb]\nruns:\n  - model: opt-125m\n"


def _plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    return path


def write_report(kind: str, tmp_path: Path, target: Path | str) -> tuple[int, str, str, tuple]:
    if kind == "junit":
        argv = ("check", str(_plan(tmp_path)), "--junit", str(target))
    else:
        argv = ("chart", "sweep", "opt-125m", "--gpu", "h100", "--over", "batch", "--values", "1,2", "-o", str(target))
    return (*memplan(*argv), argv)


MAGIC = {"junit": b"<?xml", "chart": b"<?xml"}  # JUnit XML, and the chart as SVG
KINDS = ["junit", "chart"]


def _name(kind: str, stem: str) -> str:
    return f"{stem}.xml" if kind == "junit" else f"{stem}.svg"


@pytest.mark.parametrize("kind", KINDS)
def test_output_to_a_regular_file(tmp_path, kind):
    target = tmp_path / _name(kind, "out")
    target.write_bytes(b"old")
    code, out, err, argv = write_report(kind, tmp_path, target)
    assert code == 0, (argv, err)
    assert stat.S_ISREG(target.lstat().st_mode) and target.read_bytes().startswith(MAGIC[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_output_through_a_symlink_keeps_the_link(tmp_path, kind):
    real = tmp_path / _name(kind, "real")
    real.write_bytes(b"old")
    link = tmp_path / _name(kind, "link")
    link.symlink_to(real)
    code, out, err, argv = write_report(kind, tmp_path, link)
    assert code == 0, (argv, err)
    assert link.is_symlink() and os.readlink(link) == str(real)  # C1: the link was replaced by a file
    assert real.read_bytes().startswith(MAGIC[kind])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind", KINDS)
def test_output_into_a_fifo_reaches_its_reader(tmp_path, kind):
    fifo = tmp_path / _name(kind, "pipe")
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there before the writer, as with `cat`
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:  # drains the FIFO while memplan writes; never blocks the test
        while True:
            select.select([fd], [], [], 0.05)
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                got.append(chunk)
            elif done.is_set():
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code, out, err, argv = write_report(kind, tmp_path, fifo)
    finally:
        done.set()
        reader.join(10)
        os.close(fd)
    assert code == 0, (argv, err)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # C1: the FIFO was replaced by a regular file
    assert b"".join(got).startswith(MAGIC[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_output_into_a_missing_folder_is_one_line(tmp_path, kind):
    target = tmp_path / "no" / "such" / _name(kind, "out")
    code, out, err, argv = write_report(kind, tmp_path, target)
    assert_one_line_error(argv, code, out, err)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_output_into_a_read_only_folder_is_one_line(tmp_path, kind):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) can write into a read-only folder")
        code, out, err, argv = write_report(kind, tmp_path, folder / _name(kind, "out"))
        assert_one_line_error(argv, code, out, err)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def _null_device(path: Path) -> Path:
    """A character device that discards writes, like /dev/null.

    As root, memplan 0.1 replaced the device it was asked to write to with a regular file (C1), so a
    root run gets a private copy made with mknod; other users cannot replace /dev/null and use it.
    """
    if os.geteuid() != 0:
        return Path("/dev/null")
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (OSError, AttributeError) as e:
        pytest.skip(f"cannot make a private null device to test safely as root ({e})")
    return path


@pytest.mark.skipif(not os.path.exists("/dev/null") or sys.platform == "win32", reason="needs /dev/null")
@pytest.mark.parametrize("kind", KINDS)
def test_output_to_dev_null_keeps_the_device(tmp_path, kind):
    if kind == "chart" and os.geteuid() != 0:
        target = tmp_path / "null.svg"  # a chart needs a suffix: reach /dev/null through a link
        target.symlink_to("/dev/null")
        device = Path("/dev/null")
    else:
        device = target = _null_device(tmp_path / _name(kind, "null"))
    code, out, err, argv = write_report(kind, tmp_path, target)
    assert code == 0, (argv, err)
    assert stat.S_ISCHR(device.lstat().st_mode) and stat.S_ISCHR(os.stat(target).st_mode)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
