"""`memplan fit MODEL`: will it fit? Analytic estimates, one row per method."""

from __future__ import annotations

from typing import Optional

import typer

from memplan.cli._common import guarded
from memplan.cli._options import with_config_options


def estimates_command(tier: str):
    """The `fit` (analytic) or `trace` command: the same options, the same table and JSON."""

    @with_config_options
    @guarded
    def command(
        model: str = typer.Argument(..., help="Catalog id or alias (opt-13b), config.json or a folder with one, "
                                   "or a hub id (Qwen/Qwen3-8B[@revision]: local HF cache, else downloaded)."),
        method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Method (repeatable, "
                                                   "comma-separated) or 'all'; default zo-sgd."),
        *,
        gpu: Optional[str] = typer.Option(None, help="GPU name (memplan gpus) or 'auto'; default: local GPU if any."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        **options,
    ) -> None:
        from memplan.api import resolve_gpu
        from memplan.cli._options import make_config
        from memplan.cli.render import exit_code, render
        from memplan.options import parse_methods

        configs = [make_config(model, m, options) for m in parse_methods(method or None)]
        the_gpu = resolve_gpu(gpu)
        # `--method all` means every method that can take these options: one that cannot is left out
        # with a line on stderr; a method named on its own that cannot is an error.
        asked_all = any(name.strip().lower() == "all" for chunk in method or () for name in chunk.split(","))
        run = _traced if tier == "trace" else _analytic
        (estimates, left_out), notes = run(configs, the_gpu, as_json, leave_out_refused=asked_all)
        for line in left_out:  # on stderr in both modes: a JSON reader must learn a method is missing
            typer.echo(f"memplan: note: {line}", err=True)
        render(estimates, as_json=as_json, notes=notes)
        raise typer.Exit(exit_code(estimates))

    command.__doc__ = {
        "analytic": "Peak GPU memory of each method, its parts, and whether it fits.",
        "trace": "Trace one training step on fake tensors: exact tensor bytes per category and phase, no GPU.",
    }[tier]
    return command


def _analytic(configs: list, gpu, as_json: bool, *, leave_out_refused: bool = False):
    """((estimates, methods left out), what would make each non-fitting one fit)."""
    from memplan.api import estimate_config
    from memplan.pipeline import each, model_of
    from memplan.spec import ModelSpec

    spec = model_of(configs[0].model)
    if len(configs) > 1:
        from memplan.pipeline import prefetch_profiles

        prefetch_profiles(configs)  # several first uses of a table family: traced side by side
    done = each(configs, lambda c: estimate_config(c, gpu, spec=spec), leave_out_refused=leave_out_refused)
    misfits = [e for e in done[0] if e.fits is False]
    if not misfits or not isinstance(spec, ModelSpec):  # suggestions read the tensor table
        return done, []
    from memplan.suggest import suggestions  # only a misfit needs it (and the margin module it brings)

    return done, [line for e in misfits for line in suggestions(e, spec, gpu)]


def _traced(configs: list, gpu, as_json: bool, *, leave_out_refused: bool = False):
    """((trace estimates, methods left out), no notes), with a live status line on a terminal."""
    import sys

    from memplan.errors import MemplanError
    from memplan.options import HfVersion
    from memplan.pipeline import each
    from memplan.tracing import trace

    if configs[0].hf_version is not HfVersion.CURRENT:
        raise MemplanError("--hf-version: the trace runs the installed transformers; only 'current' applies")
    if as_json or not sys.stderr.isatty():
        return each(configs, lambda c: trace(c, gpu=gpu), leave_out_refused=leave_out_refused), []
    from rich.console import Console

    def traced(c):
        with Console(stderr=True).status(f"tracing {c.method.value}") as status:
            return trace(c, gpu=gpu, on_phase=lambda label, ph: status.update(
                f"tracing {c.method.value}: {label} step, {ph.value}"))

    return each(configs, traced, leave_out_refused=leave_out_refused), []


fit = estimates_command("analytic")


def register(app: typer.Typer) -> None:
    app.command("fit")(fit)
