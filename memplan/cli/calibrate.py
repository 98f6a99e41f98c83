"""`memplan calibrate`: measure a grid on this machine (`--grid` or `run`), `fit` the corrections, `report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memplan.cli._common import console, guarded


def _warn(lines: list[str]) -> None:
    for line in lines:
        typer.echo(f"memplan: warning: {line}", err=True)

DATA = Path("calibration/data")
CORRECTIONS = Path("calibration/corrections.json")

app = typer.Typer(help="Measure real steps, fit the overhead corrections, publish the error.",
                  invoke_without_command=True, no_args_is_help=False)

GRID = typer.Option(None, "--grid", help="Grid YAML, e.g. calibration/grids/h100.yaml.")
OUT = typer.Option(None, "--out", help="Records file (default calibration/data/<grid name>.jsonl).")
DEVICE = typer.Option(None, "--device", help="auto | cuda | cpu (default: the grid's).")
CAP = typer.Option(None, "--cpu-cap-bytes", help="CPU meter: simulated card size; past it, out of memory.")
TIMEOUT = typer.Option(None, "--timeout-s", help="Per-configuration limit (default: the grid's).")
BUDGET = typer.Option(None, "--budget-s", help="Start no configuration after this many seconds; rerun to resume.")
ISOLATION = typer.Option("fork", "--isolation", help="fork (from a preloaded server) | spawn (new python each).")


def _run(grid, out, device, cpu_cap_bytes, timeout_s, budget_s, isolation) -> int:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from memplan.calibration import grid as grid_mod
    from memplan.calibration import runner

    if device not in (None, "auto", "cuda", "cpu"):
        from memplan.errors import unknown

        raise unknown("device", device, ["auto", "cuda", "cpu"])
    from rich.console import Console
    from rich.markup import escape

    # Every option is checked before the progress bar draws.
    runner.check_limits(cpu_cap_bytes=cpu_cap_bytes, timeout_s=timeout_s, budget_s=budget_s, isolation=isolation)
    g = grid_mod.load(grid)
    grid_mod.jobs(g)  # bad configs and devices fail here, before the progress bar draws
    runner.resolve_device(device or g.device)
    if out is not None:
        runner.check_out(Path(out))
    out_console = console()
    # The bar and the configurations that did not run go to stderr; stdout gets the summary.
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=False) as progress:
        task = progress.add_task(f"calibrate {g.name}", total=None)

        def on_event(e: runner.Event) -> None:
            c = e.job.config
            what = f"{e.job.model_name} {c.method.value} {c.scheme.value} {c.dtype.value} b{c.batch} s{c.seq}"
            if e.kind == "start":
                progress.update(task, total=e.total, description=f"[{e.index}/{e.total}] {what}")
            else:
                progress.advance(task)
                status = e.record["status"]
                if status != "ok":
                    progress.console.print(f"{what}: [yellow]{escape(str(status))}[/yellow] "
                                           f"{escape(str(e.record.get('error', '')))}")

        s = runner.run(g, out=out, device=device, cpu_cap_bytes=cpu_cap_bytes, timeout_s=timeout_s,
                       budget_s=budget_s, isolation=isolation, on_event=on_event)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s.statuses.items())) or "nothing new"
    out_console.print(f"{s.out}: {s.total} configurations on {s.device}; {s.skipped} already recorded; {counts}"
                      + (f"; {s.busy} being measured by another run" if s.busy else "")
                      + (f"; {s.left} left for the next run (time budget)" if s.left else ""))
    return 1 if s.errors else 0


@app.callback()
@guarded
def calibrate(ctx: typer.Context, grid: Optional[Path] = GRID, out: Optional[Path] = OUT,
              device: Optional[str] = DEVICE, cpu_cap_bytes: Optional[int] = CAP,
              timeout_s: Optional[float] = TIMEOUT, budget_s: Optional[float] = BUDGET,
              isolation: str = ISOLATION) -> None:
    """Measure a grid of configurations on this machine (CUDA, else the CPU live-bytes meter)."""
    if ctx.invoked_subcommand is not None:
        return
    if grid is None:
        from memplan.errors import MemplanError

        raise MemplanError("calibrate needs --grid FILE (or a subcommand: run, fit, report)")
    raise typer.Exit(_run(grid, out, device, cpu_cap_bytes, timeout_s, budget_s, isolation))


@app.command("run")
@guarded
def run(grid: Path = typer.Option(..., "--grid", help="Grid YAML, e.g. calibration/grids/h100.yaml."),
        out: Optional[Path] = OUT, device: Optional[str] = DEVICE, cpu_cap_bytes: Optional[int] = CAP,
        timeout_s: Optional[float] = TIMEOUT, budget_s: Optional[float] = BUDGET, isolation: str = ISOLATION) -> None:
    """Measure every configuration of a grid not yet recorded; one fresh process each."""
    raise typer.Exit(_run(grid, out, device, cpu_cap_bytes, timeout_s, budget_s, isolation))


@app.command("fit")
@guarded
def fit(data: list[Path] = typer.Option([DATA], "--data", help="Records: JSONL files or folders (repeatable)."),
        out: Path = typer.Option(CORRECTIONS, "--out", help="Corrections file to write."),
        activate: bool = typer.Option(False, "--activate", help=(
            "Also write the file memplan reads: $MEMPLAN_CORRECTIONS, else "
            "$XDG_CONFIG_HOME/memplan/corrections.json.")),
        package_copy: Optional[Path] = typer.Option(
            None, "--package-copy", help="Also write a copy here (e.g. memplan/data/corrections.json in a "
                                         "source checkout, to ship it with a release)."),
        include_cpu: bool = typer.Option(False, "--include-cpu", help="Fit CPU-meter records as family 'cpu'."),
        as_json: bool = typer.Option(False, "--json", help="Print the corrections as JSON.")) -> None:
    """Fit context, workspace and allocator slack per GPU family from the records; write corrections.json."""
    import os

    from memplan import corrections
    from memplan.calibration import fitting, records
    from memplan.cli._common import print_json
    from memplan.errors import MemplanError

    warnings: list[str] = []
    recs = records.read_all(_existing(data), warnings)
    doc, notes = fitting.fit(recs, include_cpu=include_cpu, warnings=warnings)
    _warn(warnings)
    if not doc["families"]:
        raise MemplanError(f"no valid measured records that ran in {', '.join(map(str, data))}: nothing to fit "
                           "(run `memplan calibrate --grid ...` first" + ("" if include_cpu else
                                                                          "; CPU-meter records need --include-cpu") + ")")
    targets = [out] + ([package_copy] if package_copy else [])
    if activate:
        user = corrections.user_path()
        if not os.environ.get(corrections.ENV):
            user.parent.mkdir(parents=True, exist_ok=True)  # memplan's own config folder
        targets.append(user)
    fitting.write(doc, targets)
    corrections.reload()
    if as_json:
        print_json(doc)
        return
    c = console()
    for line in notes:
        c.print(line)
    c.print(f"wrote {' and '.join(map(str, targets))}")


@app.command("report")
@guarded
def report(data: list[Path] = typer.Option([DATA], "--data", help="Records: JSONL files or folders (repeatable)."),
           corrections_path: Path = typer.Option(CORRECTIONS, "--corrections", help="Fitted corrections to apply."),
           out: Path = typer.Option(Path("calibration/REPORT.md"), "--out", help="Report to write."),
           chart: Optional[Path] = typer.Option(None, "--chart", help=(
               "Chart to write (default: estimate-vs-measured.png next to the report).")),
           no_chart: bool = typer.Option(False, "--no-chart", help="Skip the chart.")) -> None:
    """Write REPORT.md: every record's estimates against the measurement, errors per method and tier."""
    import json
    import os

    from memplan.calibration import records, report as rep
    from memplan.files import write_atomic
    from memplan.errors import MemplanError

    from memplan.corrections import invalid

    warnings: list[str] = []
    recs = records.read_all(_existing(data), warnings)
    _warn(warnings)
    fitted = {}
    if corrections_path.is_file():
        try:
            doc = json.loads(corrections_path.read_text())
        except ValueError as e:
            raise MemplanError(f"{corrections_path}: not valid JSON ({e})") from None
        why = invalid(doc)
        if why:
            raise MemplanError(f"{corrections_path}: {why}")
        fitted = doc.get("families", {})
    if chart is None:
        chart = out.parent / "estimate-vs-measured.png"  # beside the report, which links to it
    link = None
    if not no_chart and any(r.get("status") == "ok" for r in recs):
        rep.chart(recs, fitted, chart)
        link = os.path.relpath(chart, out.parent)
    write_atomic(out, rep.markdown(recs, fitted, chart=link, sources=", ".join(map(str, data))), label=f"--out {out}")
    console().print(f"wrote {out}" + (f" and {chart}" if link else ""))


def _existing(paths: list[Path]) -> list[Path]:
    from memplan.errors import MemplanError

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MemplanError(f"no such records file or folder: {', '.join(missing)}")
    return paths


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="calibrate")
