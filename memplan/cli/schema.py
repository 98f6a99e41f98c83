"""`memplan schema`: the JSON Schema of plan files, for editors and CI linters."""

from __future__ import annotations

import typer


def schema() -> None:
    """Print the JSON Schema of plan files (`memplan check`)."""
    from memplan.cli._common import print_json
    from memplan.plan import schema as plan_schema

    print_json(plan_schema())


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)
