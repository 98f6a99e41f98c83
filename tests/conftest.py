from pathlib import Path

import pytest

DATA = Path(__file__).with_name("data")


@pytest.fixture
def tiny_grid() -> Path:
    """2-layer OPT, hidden 64, vocab 1000, CPU meter with a 4 MB cap: 4 configs run, 1 runs out of memory."""
    return DATA / "tiny-grid.yaml"
