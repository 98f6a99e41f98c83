"""The `memplan` command: one module per command, each parsing, calling the library and rendering.

Exit codes: 0 every estimate fits (or there is no GPU to judge against); 1 some estimate does not
fit; 2 bad input (one line on stderr, no traceback); 3 an internal error, a bug in memplan (one line
on stderr naming the exception; please report it). A CI gate can tell a crash (3) from a misfit (1).

Nothing here imports torch, transformers or matplotlib; the commands that need them import them
inside their functions, so `memplan fit` starts fast: `main` imports only the command it runs.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as click_exc

from memplan.errors import MemplanError

HELP = "GPU-memory planner for fine-tuning LLMs: first-order, zeroth-order and forward-gradient."
COMMANDS = ("fit", "models", "gpus", "trace", "profile", "calibrate", "chart", "check", "schema")
INTERNAL_ERROR = 3


def _root() -> None:
    """GPU-memory planner for fine-tuning LLMs: first-order, zeroth-order and forward-gradient."""


def build(names: tuple[str, ...] | list[str] = COMMANDS) -> typer.Typer:
    """The `memplan` app with the named commands registered (importing only their modules)."""
    import importlib

    app = typer.Typer(name="memplan", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False, rich_markup_mode=None)
    app.callback()(_root)
    for name in names:
        importlib.import_module(f"memplan.cli.{name}").register(app)
    return app


def _commands_for(argv: list[str]) -> tuple[str, ...]:
    """Only the command the command line names; every command for help or an unknown name."""
    asked = next((a for a in argv if not a.startswith("-")), None)
    return (asked,) if asked in COMMANDS and "--help" not in argv else COMMANDS


def __getattr__(name: str):
    if name == "app":  # every command, built on first use (tests, docs)
        globals()["app"] = built = build()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    print(f"memplan: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input gets one line on stderr and exit code 2, a bug one line and exit
    code 3, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    app = build(_commands_for(args))
    try:
        rc = app(args=args, standalone_mode=False)  # returns the code of typer.Exit
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
        message = " ".join(str(e).split()) or "(no message)"
        print(f"memplan: internal error: {type(e).__name__}: {message} (a bug in memplan: please report it "
              "with the command line that caused it)", file=sys.stderr)
        raise SystemExit(INTERNAL_ERROR) from None
    raise SystemExit(rc or 0)
