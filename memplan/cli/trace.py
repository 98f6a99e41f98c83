"""`memplan trace MODEL`: run the real step on fake tensors; exact tensor bytes, same output as `fit`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from memplan.cli.fit import estimates_command

    app.command("trace")(estimates_command("trace"))
