"""Rendering of estimates: one rich table for `fit`, `trace` and `check`; JSON for --json."""

from __future__ import annotations

from memplan.estimate import GIB, Category, Estimate

# Columns of the table: each sums some categories.
COLUMNS = {
    "weights": (Category.WEIGHTS,),
    "grads": (Category.GRADIENTS,),
    "optim": (Category.OPTIMIZER_STATE,),
    "activ": (Category.ACTIVATIONS,),
    "logits": (Category.LOGITS,),
    "z / tangent": (Category.PERTURBATION, Category.TANGENTS),
    "overhead": (Category.WORKSPACE, Category.CONTEXT, Category.ALLOCATOR),
}


def fmt_gib(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.2f}"


def verdict(est: Estimate) -> str:
    if est.fits is None:
        return "[dim]no GPU[/dim]"
    return "[green]fits[/green]" if est.fits else "[red]does not fit[/red]"


def estimates_table(estimates: list[Estimate], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption="GiB = 2^30 bytes; peak = device view",
                  caption_justify="left")
    for name in ("method", "peak", "phase", *COLUMNS, "verdict", "headroom", "max batch", "max seq"):
        table.add_column(name, justify="left" if name in ("method", "phase", "verdict") else "right",
                         no_wrap=name in ("method", "verdict"))
    for e in estimates:
        parts = (sum(e.components.get(c, 0) for c in cats) for cats in COLUMNS.values())
        table.add_row(
            e.method.value, fmt_gib(e.peak_device_bytes), e.peak_phase.value, *map(fmt_gib, parts), verdict(e),
            fmt_gib(e.headroom_bytes), "-" if e.max_batch is None else str(e.max_batch),
            "-" if e.max_seq is None else str(e.max_seq),
        )
    return table


def title_of(est: Estimate) -> str:
    gpu = f" on {est.gpu.name} ({fmt_gib(est.gpu.total_bytes)} GiB)" if est.gpu else " (no GPU: no verdict)"
    return (f"{est.model} | {est.scheme.value} | {est.dtype.value} | batch {est.batch} x seq {est.seq} | "
            f"{est.attention.value} attention | {est.tier.value}{gpu}")


def render(estimates: list[Estimate], *, as_json: bool, notes: list[str] = ()) -> None:
    """Print estimates as a table (with notes) or as `{"estimates": [...]}`."""
    from memplan.cli._common import console, print_json

    if as_json:
        print_json({"estimates": [e.to_json_dict() for e in estimates]})
        return
    out = console()
    out.print(estimates_table(estimates, title_of(estimates[0])))
    for source in sorted({e.correction for e in estimates if e.correction}):
        out.print(f"overheads corrected by calibration: {source}", markup=False)
    for line in notes:
        out.print(line)
    for w in sorted({w for e in estimates for w in e.warnings}):
        out.print(f"[yellow]warning:[/yellow] {w}")


def exit_code(estimates: list[Estimate]) -> int:
    """0: all fit (or nothing to judge against); 1: some does not fit."""
    return 1 if any(e.fits is False for e in estimates) else 0
