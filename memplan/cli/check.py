"""`memplan check PLAN...`: the CI gate. Exit 0 when every run fits every GPU, 1 when some does not, 2 bad plan."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from memplan.cli._common import guarded


@guarded
def check(
    plans: list[Path] = typer.Argument(..., help="Plan files (YAML or JSON; `memplan schema` gives their schema)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    junit: Optional[str] = typer.Option(None, "--junit", help="Also write a JUnit XML report to this file."),
) -> None:
    """Check plan files: does every run fit every GPU, keeping the margin free?"""
    from memplan import plan, reports
    from memplan.cli._common import console, print_json
    from memplan.cli.render import print_check
    from memplan.errors import MemplanError

    if junit is not None and not junit.strip():
        raise MemplanError("--junit: the path is empty; name a file, e.g. --junit memplan-report.xml")
    files = [plan.load(p) for p in plans]  # every file is valid before any is checked
    notes: list[str] = []
    results = [r for pf in files for r in plan.check(pf, notes)]
    for line in notes:  # stderr in every mode: a JSON or JUnit reader must learn a method is missing
        typer.echo(f"memplan: note: {line}", err=True)
    misfits = [r for r in results if not r.fits]
    if junit is not None:
        try:
            reports.write_atomic(junit, reports.junit_xml(results), label=f"--junit {junit}")
        except OSError as e:
            raise MemplanError(f"--junit {junit}: cannot write ({e.strerror or e})") from None
    if as_json:
        print_json({"fits": not misfits, "results": [r.to_json_dict() for r in results]})
    else:
        from rich.markup import escape

        # stdout holds the table; the verdicts in words and the warnings go to stderr.
        out, err = console(), console(stderr=True)
        print_check(out, results)
        for r in misfits:
            err.print(f"[red]does not fit:[/red] {escape(reports.testcase_name(r))}: {r.summary()}; "
                      f"{escape(r.advice())}", highlight=False)
        for w in sorted({f"{r.run}: {w}" for r in results for w in r.estimate.warnings}):
            err.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        stream = sys.stderr if as_json else sys.stdout  # keep --json output parseable
        for line in reports.github_annotations(results):
            print(line, file=stream)
    raise typer.Exit(1 if misfits else 0)


def register(app: typer.Typer) -> None:
    app.command("check")(check)
