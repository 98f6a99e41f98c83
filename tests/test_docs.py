"""The documentation keeps up with the registries: every method has its row and its page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memplan.options import Method

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method", list(Method), ids=str)
def test_every_method_has_its_readme_row_and_methods_page_row(method):
    readme = (ROOT / "README.md").read_text()
    methods = (ROOT / "docs" / "methods.md").read_text()
    assert re.search(rf"^\| `{re.escape(method.value)}`", readme, re.M), f"README methods table lacks {method.value}"
    assert re.search(rf"^\| \[{re.escape(method.value)}\]", methods, re.M), f"docs/methods.md lacks {method.value}"


def test_links_of_the_methods_page_resolve():
    text = (ROOT / "docs" / "methods.md").read_text()
    for target in re.findall(r"\]\(([^)#]+\.md)\)", text):
        assert (ROOT / "docs" / target).is_file(), target
