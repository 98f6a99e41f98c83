"""Shared pieces of the commands: error guard, console, option parsing."""

from __future__ import annotations

import functools
import json
import sys

import typer

from memplan.errors import MemplanError


def guarded(fn):
    """Turn bad input (MemplanError) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from memplan import profile

        profile.announce = lambda line: typer.echo(f"memplan: {line}", err=True)
        try:
            return fn(*args, **kwargs)
        except MemplanError as e:
            typer.echo(f"memplan: error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def console(*, stderr: bool = False):
    """memplan's console: no emoji codes (`:name:` in a model or run name stays as typed)."""
    from rich.console import Console

    return Console(stderr=stderr, emoji=False)
