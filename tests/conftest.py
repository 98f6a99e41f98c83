"""Shared test helpers."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path


def _hermetic_hub() -> None:
    """No test reaches the real Hugging Face hub nor reads the user's Hugging Face home.

    huggingface_hub reads HF_ENDPOINT and HF_HOME once, when first imported, so they are set before
    any test imports it: the hub is a free local port (tests/hub_server.py serves it when a test
    needs a hub; otherwise a connection there is refused at once), the home an empty folder.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="memplan-test-hf-")
    atexit.register(shutil.rmtree, home, True)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_TOKEN_PATH"):
        os.environ.pop(key, None)
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=home)


_hermetic_hub()

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from memplan.cli import app  # noqa: E402

DATA = Path(__file__).with_name("data")
sys.path.insert(0, str(Path(__file__).parent))  # tests import their shared helpers by module name


@pytest.fixture(autouse=True)
def _no_user_corrections(tmp_path_factory, monkeypatch):
    """Tests neither read nor write the user's calibration corrections (nor any shipped ones):
    MEMPLAN_CORRECTIONS names a file that does not exist, inherited by subprocesses too."""
    from memplan import corrections

    monkeypatch.setenv(corrections.ENV, str(tmp_path_factory.mktemp("config") / "no-corrections.json"))
    corrections.reload()
    yield
    corrections.reload()


@pytest.fixture(autouse=True)
def _no_user_profiles(tmp_path_factory, monkeypatch):
    """Tests neither read nor write the user's cached profiles: the cache folder is a fresh one
    (XDG_CACHE_HOME, inherited by subprocesses); profiles shipped with memplan are still read."""
    from memplan import profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    profile._LOADED.clear()
    yield
    profile._LOADED.clear()


@pytest.fixture(autouse=True)
def _formulas_unless_asked(monkeypatch):
    """A table family answers from its formulas (MEMPLAN_TRACE=never) unless a test sets
    MEMPLAN_TRACE=auto: the default, a trace on first use, costs seconds per configuration; the tests
    of that path ask for it."""
    monkeypatch.setenv("MEMPLAN_TRACE", "never")


@pytest.fixture
def package_corrections(tmp_path, monkeypatch):
    """Point the corrections memplan reads at a temporary file (the test writes it)."""
    from memplan import corrections

    path = tmp_path / "corrections.json"
    monkeypatch.setenv(corrections.ENV, str(path))
    corrections.reload()
    yield path
    corrections.reload()


@pytest.fixture
def run_cli():
    """Run `memplan ARGS...` in-process; returns (exit code, stdout, stderr)."""
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture
def fit_json(run_cli):
    """`memplan fit ... --json` parsed; returns (exit code, list of estimate dicts)."""

    def run(*args: str):
        code, out, err = run_cli("fit", *args, "--json")
        assert code in (0, 1), err
        return code, json.loads(out)["estimates"]

    return run


@pytest.fixture
def transformers_shapes():
    """{name: shape} of the model transformers builds from a config dict, on the meta device (tied weights once)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def build(cfg: dict) -> dict[str, tuple[int, ...]]:
        fields = {k: v for k, v in cfg.items() if k != "model_type"}
        config = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
        masked = cfg["model_type"] == "roberta"
        auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config)
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    return build


@pytest.fixture
def tiny_grid() -> Path:
    """2-layer OPT, hidden 64, vocab 1000, CPU meter with a 4 MB cap: 4 configs run, 1 runs out of memory."""
    return DATA / "tiny-grid.yaml"
