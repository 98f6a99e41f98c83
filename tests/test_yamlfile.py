"""The shared reader of plan and grid files: calibration grids get the same guards and messages as plans."""

from __future__ import annotations

import pytest

from memplan import yamlfile
from memplan.calibration import grid
from memplan.errors import MemplanError


def test_grid_lists_every_error_with_its_line(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("configs: [{model: opt-125m}]\nwarmup_steps: 0\nmeasured_steps: 0\ndevice: gpu\nseeed: 1\n")
    with pytest.raises(MemplanError) as e:
        grid.load(p)
    message = str(e.value)
    assert message == (f"{p}: device: input should be 'auto', 'cuda' or 'cpu', got 'gpu' (line 4); "
                       "warmup_steps: must be >= 1, got 0 (line 2); measured_steps: must be >= 1, got 0 (line 3) "
                       "(and 1 more)")


def test_grid_config_errors_are_all_listed_with_config_keys(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("configs: [{model: opt-125m, batch: 0, seq: 0, methd: zo-sgd}]\n")
    with pytest.raises(MemplanError, match=r"g: configs\[0\]: batch: must be >= 1, got 0; seq: must be >= 1, got 0; "
                                           r"methd: unknown key 'methd' \(did you mean method\?\)"):
        grid.jobs(grid.load(p))


@pytest.mark.parametrize("text, message", [
    ("configs: [{model: opt-125m}]\nconfigs: [{model: opt-350m}]\n", r"duplicate key 'configs' on lines 1 and 2"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nconfigs: [{model: *e}]\n", r"YAML aliases expand this file"),
    ("- 1\n", r"a grid is a mapping with at least `configs:`, got a list$"),
])
def test_grid_refuses_what_plans_refuse(tmp_path, text, message):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(MemplanError, match=message):
        grid.load(p)


def test_show_is_bounded_for_shared_structures():
    value: list = ["lol"] * 9
    for _ in range(9):
        value = [value] * 9  # 9^10 strings if written out
    assert len(yamlfile.show(value)) <= 60


def test_one_line_keeps_the_first_messages_and_counts_the_rest():
    assert yamlfile.one_line(["a", "b\nc", "d", "e", "f"]) == "a; b c; d (and 2 more)"
    assert len(yamlfile.one_line(["x" * 10_000])) == 300
