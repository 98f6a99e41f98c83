"""Reports of a plan check for CI: JUnit XML (one testcase per run x GPU x method) and GitHub annotations."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import TYPE_CHECKING

from memplan.files import write_atomic  # noqa: F401  (the writer `check --junit` uses)

if TYPE_CHECKING:
    from memplan.plan import Result


def testcase_name(r: Result) -> str:
    return f"{r.run} on {r.gpu} [{r.method}]"


def junit_xml(results: list[Result]) -> bytes:
    """JUnit XML: a testsuite per plan file, a testcase per run x GPU x method; misfits are failures."""
    root = ET.Element("testsuites", name="memplan check", tests=str(len(results)),
                      failures=str(sum(not r.fits for r in results)))
    for plan in dict.fromkeys(r.plan for r in results):
        mine = [r for r in results if r.plan == plan]
        suite = ET.SubElement(root, "testsuite", name=plan, tests=str(len(mine)),
                              failures=str(sum(not r.fits for r in mine)), errors="0", skipped="0")
        for r in mine:
            case = ET.SubElement(suite, "testcase", name=testcase_name(r), classname=f"memplan.{r.run}",
                                 file=plan, **({"line": str(r.line)} if r.line else {}))
            verdict = f"{r.estimate.model} {r.method}: {r.summary()}"
            if r.fits:
                ET.SubElement(case, "system-out").text = verdict
            else:
                failure = ET.SubElement(case, "failure", type="DoesNotFit", message=verdict)
                failure.text = f"{verdict}\n{r.advice()}\n"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _escape(text: str, *, prop: bool = False) -> str:
    """GitHub workflow-command escaping (data: % CR LF; properties also : and ,)."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def github_annotations(results: Iterable[Result]) -> list[str]:
    """`::error file=...,line=...,title=...::message` for each run that does not fit."""
    lines = []
    for r in results:
        if r.fits:
            continue
        props = f"file={_escape(r.plan, prop=True)}"
        if r.line:
            props += f",line={r.line}"
        props += f",title={_escape(f'memplan: {testcase_name(r)} does not fit', prop=True)}"
        lines.append(f"::error {props}::{_escape(f'{r.estimate.model} {r.method}: {r.summary()}; {r.advice()}')}")
    return lines
