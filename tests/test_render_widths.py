"""Tables at any terminal width: every number and name whole, no column lost, no `…`; notes on stderr.

Piped output (no COLUMNS) is rendered 80 columns wide. Each test takes the numbers from the JSON of
the same command and looks for each one as a whole token in the text, as often as the data holds it.
The layout itself (one table, two, or one block per row) is free.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.cli import app
from memplan.cli.render import COLUMNS
from memplan.result import GIB

runner = CliRunner()
WIDTHS = [60, 80, 100, 120, None]  # None: piped, no COLUMNS
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plans"


def invoke(args: list[str], width: int | None):
    return runner.invoke(app, args, env={"COLUMNS": None if width is None else str(width)})


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def assert_whole(text: str, expected: Counter, width: int | None) -> None:
    """Each expected string occurs as a whole token at least as often as expected; no line is too wide."""
    assert "…" not in text
    for line in text.splitlines():
        assert len(line.rstrip()) <= (width or 80), line
    for token, n in expected.items():
        found = re.findall(rf"(?<![\w.\-/]){re.escape(token)}(?![\w.\-/])", text)
        assert len(found) >= n, f"{token!r}: {len(found)} whole of {n}\n{text}"


@pytest.mark.parametrize("width", [40, *WIDTHS])  # 40: one block per method
@pytest.mark.parametrize("batch", ["16", "1"])
def test_fit_table_keeps_every_number_whole(width, batch):
    args = ["fit", "facebook/opt-13b", "--method", "all", "--gpu", "a100-80gb", "--batch", batch]
    estimates = json.loads(invoke([*args, "--json"], width).stdout)["estimates"]
    res = invoke(args, width)
    assert res.exit_code == 1  # fo-adam does not fit
    expected = Counter(["a100-80gb", "80.00"])
    for e in estimates:
        expected.update([e["method"], gib(e["peak_device_bytes"]), gib(e["headroom_bytes"]),
                         str(e["max_batch"]), str(e["max_seq"])])
        expected.update(gib(sum(e["components"].get(c.value, 0) for c in cats)) for cats in COLUMNS.values())
    assert_whole(res.stdout, expected, width)
    assert "80.00 GiB" in " ".join(res.stdout.split())  # the GPU's size stays in the title


def test_fit_notes_and_warnings_go_to_stderr():
    res = runner.invoke(app, ["fit", "opt-13b", "--seq", "4096", "--grad-checkpointing", "-m", "zo-sgd", "-m", "fo-adam",
                              "--gpu", "h100"], env={"COLUMNS": "200"})
    assert res.exit_code == 1
    assert "fo-adam would fit with: " in res.stderr
    assert "warning: --grad-checkpointing has no effect on zo-sgd" in res.stderr
    assert "warning: seq 4096 is beyond facebook/opt-13b's 2048 positions" in res.stderr
    assert "warning" not in res.stdout and "would fit" not in res.stdout
    assert "fo-adam" in res.stdout and "zo-sgd" in res.stdout  # the table itself


def test_json_mode_stdout_is_json_only():
    res = runner.invoke(app, ["fit", "opt-13b", "--seq", "4096", "-m", "all", "--gpu", "h100", "--json"])
    assert res.exit_code == 1 and res.stderr == ""
    assert json.loads(res.stdout)["estimates"][0]["warnings"]


@pytest.mark.parametrize("width", WIDTHS)
def test_check_table_keeps_names_and_numbers(width):
    plans = [str(EXAMPLES / "h100.yaml"), str(EXAMPLES / "workstation-24gb.yaml")]
    results = json.loads(invoke(["check", *plans, "--json"], width).stdout)["results"]
    res = invoke(["check", *plans], width)
    expected = Counter()
    for r in results:
        expected.update([Path(r["plan"]).name, r["run"], r["gpu"], r["method"], gib(r["peak_device_bytes"]),
                         gib(r["budget_bytes"]), gib(r["headroom_bytes"])])
    # Names may be grouped (one line per run): each still appears at least once.
    names = {Path(r["plan"]).name for r in results} | {r["run"] for r in results}
    expected.update({n: 1 - expected[n] for n in names})
    assert_whole(res.stdout, expected, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_models_table_keeps_ids_and_aliases_whole(width):
    models = json.loads(invoke(["models", "--json"], width).stdout)["models"]
    res = invoke(["models"], width)
    assert res.exit_code == 0
    expected = Counter()
    for m in models:
        expected.update([m["id"], *m["aliases"], f"{m['params'] / 1e9:.2f}", str(m["hidden_size"])])
    assert_whole(res.stdout, expected, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_gpus_table_keeps_names_and_sizes_whole(width):
    gpus = json.loads(invoke(["gpus", "--json"], width).stdout)["gpus"]
    res = invoke(["gpus"], width)
    assert res.exit_code == 0
    expected = Counter()
    for g in gpus:
        expected.update([g["name"], gib(g["total_bytes"]), g["family"]])
    assert_whole(res.stdout, expected, width)


def test_calibration_note_goes_to_stderr(capsys, monkeypatch):
    from memplan.api import estimate_config
    from memplan.cli.render import render
    from memplan.hardware import get_gpu
    from memplan.options import Config

    monkeypatch.setenv("COLUMNS", "120")
    est = estimate_config(Config(model="opt-125m"), get_gpu("h100")).model_copy(update={"correction": "h100 grid"})
    render([est], as_json=False, notes=["a note"])
    out, err = capsys.readouterr()
    assert "overheads corrected by calibration: h100 grid" in err and "a note" in err
    assert "calibration" not in out and "note" not in out and "zo-sgd" in out


def test_table_width_arithmetic_is_what_rich_measures():
    # print_fitting chooses a layout from widths it adds up itself (rendering each cell twice is most
    # of `fit`'s run time); the sum must be exactly rich's own measure of the same tables.
    from rich.console import Console

    from memplan import hardware
    from memplan.api import estimate_config
    from memplan.cli.render import VERDICT_COLUMNS, add_columns, compact_table, estimates_table, table_width
    from memplan.options import Config, Method

    gpu = hardware.get_gpu("a100-80gb")
    estimates = [estimate_config(Config(model="opt-13b", method=m, batch=16), gpu) for m in Method]
    out = Console(width=80)
    names = compact_table()
    add_columns(names, ("plan", "run", "peak"), [("a.yaml", "a [dim]run[/dim]", "1.00"), ("b", "b", "120.00")],
                left=("plan", "run"))
    for table in (estimates_table(estimates), estimates_table(estimates, VERDICT_COLUMNS), names):
        assert table_width(out, table) == out.measure(table, options=out.options.update_width(1 << 16)).maximum
