"""`memplan chart grid|breakdown|sweep`: PNG or SVG charts (by the output's suffix) of analytic estimates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memplan.cli._common import guarded
from memplan.cli._options import with_config_options

chart_app = typer.Typer(help="Charts of fit and memory: PNG or SVG, by the output file's suffix.",
                        no_args_is_help=True)

GpuOpt = Annotated[str, typer.Option("--gpu", help="GPU name (memplan gpus).")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Chart file: .png or .svg.")]
MethodsOpt = Annotated[str, typer.Option("--methods", help="Comma-separated methods, or 'all'.")]
MarginOpt = Annotated[str, typer.Option(help="Memory kept free: a share (5%) or an amount (2GiB).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Also print the plotted numbers as JSON.")]
ModelArg = Annotated[str, typer.Argument(help="Catalog id or alias, or a config.json.")]


def _finish(chart, output: Path, as_json: bool) -> None:
    from memplan import charts
    from memplan.cli._common import print_json

    charts.save(chart, output)
    if as_json:
        print_json(charts.to_json_dict(chart))
    else:
        typer.echo(f"wrote {output}")


@chart_app.command("grid")
@with_config_options(exclude=("model", "method"))
@guarded
def grid(gpu: GpuOpt, output: OutputOpt,
         models: Annotated[str, typer.Option("--models", help="Comma-separated models (rows).")],
         methods: MethodsOpt = "all", margin: MarginOpt = "5%", *, as_json: JsonOpt = False, **options) -> None:
    """Fit / tight / no-fit grid on one GPU: models as rows, methods as columns, each cell with its GiB."""
    from memplan import charts
    from memplan.cli._options import chart_options
    from memplan.options import parse_methods

    names = [m.strip() for m in models.split(",") if m.strip()]
    opts = chart_options(options)
    _finish(charts.grid(names, parse_methods([methods], where="--methods"), gpu, margin=margin, **opts), output,
            as_json)


@chart_app.command("breakdown")
@with_config_options(exclude=("model", "method"))
@guarded
def breakdown(model: ModelArg, gpu: GpuOpt, output: OutputOpt, methods: MethodsOpt = "all", margin: MarginOpt = "5%",
              *, as_json: JsonOpt = False, **options) -> None:
    """Stacked bars by memory category, one per method, with the GPU's capacity as a line."""
    from memplan import charts
    from memplan.cli._options import chart_options
    from memplan.options import parse_methods

    opts = chart_options(options)
    _finish(charts.breakdown(model, parse_methods([methods], where="--methods"), gpu, margin=margin, **opts),
            output, as_json)


@chart_app.command("sweep")
@with_config_options(exclude=("model", "method"))
@guarded
def sweep(model: ModelArg, gpu: GpuOpt, output: OutputOpt,
          values: Annotated[str, typer.Option("--values", help="Comma-separated values, e.g. 128,256,512.")],
          over: Annotated[str, typer.Option("--over", help="seq | batch | num-gpus (per-GPU peak, a line per "
                                            "sharding mode)")] = "seq",
          methods: MethodsOpt = "all", margin: MarginOpt = "5%", *, as_json: JsonOpt = False, **options) -> None:
    """Peak memory against sequence length or batch (a line per method), or per GPU against the number of
    GPUs (a line per sharding mode), with the GPU's capacity."""
    from memplan import charts
    from memplan.cli._options import chart_options
    from memplan.errors import MemplanError
    from memplan.options import parse_methods

    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise MemplanError(f"--values: comma-separated integers, got {values!r}") from None
    opts = chart_options(options)
    _finish(charts.sweep(model, parse_methods([methods], where="--methods"), gpu, over=over, values=numbers,
                         margin=margin, **opts), output, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(chart_app, name="chart")
