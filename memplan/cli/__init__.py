"""The `memplan` command: one module per command, each parsing, calling the library and rendering.

Nothing here imports torch, transformers or matplotlib; the commands that need them import them
inside their functions, so `memplan fit` starts fast.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_exc

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


def _register(argv: list[str]) -> None:
    """Import the command modules: only the one being run when the command line names it."""
    import importlib

    asked = next((a for a in argv if not a.startswith("-")), None)
    names = [asked] if asked in _COMMANDS and "--help" not in argv else _COMMANDS
    for name in names:
        module = importlib.import_module(f"memplan.cli.{name}")
        module.register(app)


_register(sys.argv[1:])


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    print(f"memplan: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input gets one line on stderr and exit code 2, never a traceback."""
    try:
        rc = app(args=argv, standalone_mode=False)  # returns the code of typer.Exit
    except MemplanError as e:  # raised outside a command body
        fail(str(e))
    except click_exc.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "memplan --help")
        raise SystemExit(0) from None
    except click_exc.UsageError as e:  # unknown option, missing argument, bad integer...
        fail(e.format_message().replace("\n", " "))
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as e:
        if type(e).__name__ == "Abort":
            fail("aborted")
        raise
    raise SystemExit(rc or 0)
