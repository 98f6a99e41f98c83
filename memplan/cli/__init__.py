"""The `memplan` command: one module per command, each parsing, calling the library and rendering.

Nothing here imports torch, transformers or matplotlib; the commands that need them import them
inside their functions, so `memplan fit` starts fast.
"""

from __future__ import annotations

import sys

import click
import typer

from memplan.errors import MemplanError

app = typer.Typer(
    name="memplan",
    help="GPU-memory planner for fine-tuning LLMs: first-order, zeroth-order and forward-gradient.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

@app.callback()
def _root() -> None:
    """GPU-memory planner for fine-tuning LLMs: first-order, zeroth-order and forward-gradient."""


_COMMANDS = ("fit", "models", "gpus", "trace", "calibrate", "chart", "check", "schema")


def _register() -> None:
    import importlib

    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"memplan.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"memplan.cli.{name}":
                continue  # command not built yet
            raise
        module.register(app)


_register()


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    print(f"memplan: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input gets one line on stderr and exit code 2, never a traceback."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except MemplanError as e:  # raised outside a command body (e.g. while parsing)
        fail(str(e))
    except click.exceptions.NoArgsIsHelpError:
        raise SystemExit(0)
    except click.UsageError as e:
        fail(e.format_message().replace("\n", " "))
    except click.exceptions.Abort:
        fail("aborted")
    except click.exceptions.Exit as e:
        raise SystemExit(e.exit_code)
    raise SystemExit(rc or 0)
