"""`memplan chart grid|breakdown|sweep`: PNG or SVG charts (by the output's suffix) of analytic estimates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memplan.cli._common import guarded

chart_app = typer.Typer(help="Charts of fit and memory: PNG or SVG, by the output file's suffix.",
                        no_args_is_help=True)

GpuOpt = Annotated[str, typer.Option("--gpu", help="GPU name (memplan gpus).")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Chart file: .png or .svg.")]
MethodsOpt = Annotated[str, typer.Option("--methods", help="Comma-separated methods, or 'all'.")]
MarginOpt = Annotated[str, typer.Option(help="Memory kept free: a share (5%) or an amount (2GiB).")]
SchemeOpt = Annotated[str, typer.Option(help="ft | lora | prefix | prompt")]
DtypeOpt = Annotated[str, typer.Option(help="fp32 | fp16 | bf16 | amp-fp16 | amp-bf16")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per step.")]
SeqOpt = Annotated[int, typer.Option(help="Tokens per sequence.")]
AttentionOpt = Annotated[str, typer.Option(help="eager | sdpa")]
LoraRankOpt = Annotated[int, typer.Option(help="LoRA rank.")]
CheckpointingOpt = Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute layers (FO).")]
HfVersionOpt = Annotated[str, typer.Option(help="transformers behaviour: current | 4.28 (MeZO / ZO-Bench)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Also print the plotted numbers as JSON.")]


def _options(scheme, dtype, batch, seq, attention, lora_rank, grad_checkpointing, hf_version) -> dict:
    from memplan.cli.fit import config_options

    opts = config_options("", scheme, dtype, batch, seq, attention, lora_rank, 5, 10, grad_checkpointing,
                          hf_version=hf_version)
    del opts["model"]
    return opts


def _finish(chart, output: Path, as_json: bool) -> None:
    from memplan import charts
    from memplan.cli._common import print_json

    charts.save(chart, output)
    if as_json:
        print_json(charts.to_json_dict(chart))
    else:
        typer.echo(f"wrote {output}")


@chart_app.command("grid")
@guarded
def grid(gpu: GpuOpt, output: OutputOpt,
         models: Annotated[str, typer.Option("--models", help="Comma-separated models (rows).")],
         methods: MethodsOpt = "all", margin: MarginOpt = "5%", scheme: SchemeOpt = "ft", dtype: DtypeOpt = "fp16",
         batch: BatchOpt = 1, seq: SeqOpt = 512, attention: AttentionOpt = "sdpa", lora_rank: LoraRankOpt = 8,
         grad_checkpointing: CheckpointingOpt = False, hf_version: HfVersionOpt = "current",
         as_json: JsonOpt = False) -> None:
    """Fit / tight / no-fit grid on one GPU: models as rows, methods as columns, each cell with its GiB."""
    from memplan import charts
    from memplan.cli.fit import methods_from

    names = [m.strip() for m in models.split(",") if m.strip()]
    opts = _options(scheme, dtype, batch, seq, attention, lora_rank, grad_checkpointing, hf_version)
    _finish(charts.grid(names, methods_from([methods]), gpu, margin=margin, **opts), output, as_json)


@chart_app.command("breakdown")
@guarded
def breakdown(model: Annotated[str, typer.Argument(help="Catalog id or alias, or a config.json.")], gpu: GpuOpt,
              output: OutputOpt, methods: MethodsOpt = "all", margin: MarginOpt = "5%", scheme: SchemeOpt = "ft",
              dtype: DtypeOpt = "fp16", batch: BatchOpt = 1, seq: SeqOpt = 512, attention: AttentionOpt = "sdpa",
              lora_rank: LoraRankOpt = 8, grad_checkpointing: CheckpointingOpt = False,
              hf_version: HfVersionOpt = "current", as_json: JsonOpt = False) -> None:
    """Stacked bars by memory category, one per method, with the GPU's capacity as a line."""
    from memplan import charts
    from memplan.cli.fit import methods_from

    opts = _options(scheme, dtype, batch, seq, attention, lora_rank, grad_checkpointing, hf_version)
    _finish(charts.breakdown(model, methods_from([methods]), gpu, margin=margin, **opts), output, as_json)


@chart_app.command("sweep")
@guarded
def sweep(model: Annotated[str, typer.Argument(help="Catalog id or alias, or a config.json.")], gpu: GpuOpt,
          output: OutputOpt,
          values: Annotated[str, typer.Option("--values", help="Comma-separated values, e.g. 128,256,512.")],
          over: Annotated[str, typer.Option("--over", help="seq | batch")] = "seq",
          methods: MethodsOpt = "all", margin: MarginOpt = "5%", scheme: SchemeOpt = "ft", dtype: DtypeOpt = "fp16",
          batch: BatchOpt = 1, seq: SeqOpt = 512, attention: AttentionOpt = "sdpa", lora_rank: LoraRankOpt = 8,
          grad_checkpointing: CheckpointingOpt = False, hf_version: HfVersionOpt = "current",
          as_json: JsonOpt = False) -> None:
    """Peak memory against sequence length (or batch), one line per method, with the GPU's capacity."""
    from memplan import charts
    from memplan.cli.fit import methods_from
    from memplan.errors import MemplanError

    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise MemplanError(f"--values: comma-separated integers, got {values!r}") from None
    opts = _options(scheme, dtype, batch, seq, attention, lora_rank, grad_checkpointing, hf_version)
    _finish(charts.sweep(model, methods_from([methods]), gpu, over=over, values=numbers, margin=margin, **opts),
            output, as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(chart_app, name="chart")
