"""Grid YAML: expansion, stable keys, and one-line errors that name the key."""

import pytest

from memplan.calibration import grid
from memplan.errors import MemplanError


def test_tiny_grid_expands_lists_into_configs(tiny_grid):
    g = grid.load(tiny_grid)
    jobs = grid.jobs(g)
    assert g.name == "tiny" and g.cpu_cap_bytes == 4_000_000
    # configs[0] has method: [zo-sgd, fo-adam] -> 2; then 3 single entries -> 5 in all
    assert [(j.config.method.value, j.config.batch) for j in jobs] == [
        ("zo-sgd", 2), ("fo-adam", 2), ("forward-grad", 2), ("fo-sgd", 2), ("fo-adam", 64)]
    assert jobs[0].model_name == "tiny-opt" and jobs[0].model_config["hidden_size"] == 64
    assert jobs[2].config.attention.value == "eager"  # the entry overrides defaults
    assert len({j.config_key for j in jobs}) == 5


def test_config_key_is_stable_across_runs(tiny_grid):
    a = [j.config_key for j in grid.jobs(grid.load(tiny_grid))]
    b = [j.config_key for j in grid.jobs(grid.load(tiny_grid))]
    assert a == b and all(len(k) == 16 for k in a)
    assert grid.stable_hash({"b": 1, "a": [1, 2]}) == grid.stable_hash({"a": [1, 2], "b": 1})


def test_duplicates_collapse(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("configs:\n  - {model: opt-125m, method: zo-sgd}\n  - {model: opt-125m, method: [zo-sgd, fo-sgd]}\n")
    assert [j.config.method.value for j in grid.jobs(grid.load(p))] == ["zo-sgd", "fo-sgd"]


def test_lora_targets_list_is_not_expanded(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("configs:\n  - {model: opt-125m, scheme: lora, lora_targets: [q_proj, k_proj, v_proj]}\n")
    (job,) = grid.jobs(grid.load(p))
    assert job.config.lora_targets == ("q_proj", "k_proj", "v_proj")


def test_model_path_relative_to_the_grid(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        '{"model_type": "opt", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "ffn_dim": 64, "max_position_embeddings": 64}')
    p = tmp_path / "g.yaml"
    p.write_text("models: {small: m/config.json}\nconfigs:\n  - {model: small}\n  - {model: m}\n")
    jobs = grid.jobs(grid.load(p))
    assert [j.model_name for j in jobs] == ["small", "m"]
    assert all(j.model_config["hidden_size"] == 32 for j in jobs)


@pytest.mark.parametrize("text, match", [
    ("configs: [{model: opt-125m}]\nwarmup: 2\n", r"g.yaml: warmup: unknown key"),
    ("configs: [{model: opt-125m, methd: zo-sgd}]\n", r"configs\[0\]: methd: unknown key"),
    ("configs: [{model: opt-125m, method: zo-foo}]\n", r"configs\[0\]: unknown method 'zo-foo'"),
    ("configs: [{model: opt-125m, batch: 0}]\n", r"configs\[0\]: batch: must be >= 1, got 0"),
    ("configs: [{model: opt-9000}]\n", r"configs\[0\]: unknown model 'opt-9000'"),
    ("configs: [{method: zo-sgd}]\n", r"configs\[0\]: no `model`"),
    ("configs: []\n", r"configs: List should have at least 1 item"),
    ("configs: [{model: opt-125m}\n", r"line \d+, column \d+: invalid YAML"),
    ("- 1\n- 2\n", r"a grid is a mapping"),
    ("device: gpu\nconfigs: [{model: opt-125m}]\n", r"device: input should be 'auto', 'cuda' or 'cpu', got 'gpu' \(line 1\)"),
    ("models: {m: {model_type: opt}}\nconfigs: [{model: m}]\n", r"configs\[0\]: models.m lacks 'hidden_size'"),
])
def test_bad_grids_fail_with_one_line_naming_the_key(tmp_path, text, match):
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(MemplanError, match=match) as e:
        grid.jobs(grid.load(p))
    assert "\n" not in str(e.value)


def test_missing_grid_file(tmp_path):
    with pytest.raises(MemplanError, match=r"nope.yaml: no such grid file"):
        grid.load(tmp_path / "nope.yaml")


def test_h100_grid_covers_what_the_gpu_run_must_measure():
    from pathlib import Path

    from memplan.api import estimate_config
    from memplan.hardware import get_gpu
    from memplan.options import Attention, Dtype, Method, Scheme
    from memplan.spec import spec_from_config

    g = grid.load(Path(__file__).resolve().parents[1] / "calibration" / "grids" / "h100.yaml")
    jobs = grid.jobs(g)
    assert len(jobs) >= 40 and g.device == "cuda"
    assert {j.config.method for j in jobs} == set(Method)
    assert {Scheme.FT, Scheme.LORA} <= {j.config.scheme for j in jobs}
    assert {Dtype.FP16, Dtype.BF16, Dtype.AMP_BF16} <= {j.config.dtype for j in jobs}
    assert {j.config.attention for j in jobs} == set(Attention)
    assert {j.model_name for j in jobs} == {"facebook/opt-125m", "facebook/opt-350m", "facebook/opt-1.3b",
                                            "facebook/opt-2.7b"}
    gpu = get_gpu("h100-80gb")
    peaks = [estimate_config(j.config, gpu, search=False, spec=spec_from_config(j.model_config, j.model_name))
             .peak_device_bytes for j in jobs]
    near = [p for p in peaks if 0.8 * gpu.total_bytes <= p <= 1.1 * gpu.total_bytes]
    assert near, "no configuration near the card's 80 GB"
