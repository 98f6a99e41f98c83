"""Rendering of estimates: one rich table for `fit`, `trace` and `check`; JSON for --json."""

from __future__ import annotations

from memplan.result import Category, Estimate, Phase
from memplan.units import fmt_gib

# Columns of the table: each sums some categories.
COLUMNS = {
    "weight": (Category.WEIGHTS,),
    "grads\n+optim": (Category.GRADIENTS, Category.OPTIMIZER_STATE),
    "activ\n+logit": (Category.ACTIVATIONS, Category.LOGITS),
    "z /\ntangent": (Category.PERTURBATION, Category.TANGENTS),
    "over-\nhead": (Category.WORKSPACE, Category.CONTEXT, Category.ALLOCATOR),
}


PHASE_LABEL = {Phase.LOAD: "load", Phase.FORWARD: "fwd", Phase.BACKWARD: "bwd", Phase.OPTIMIZER_STEP: "step",
               Phase.PERTURB: "perturb"}


def verdict(est: Estimate) -> str:
    if est.fits is None:
        return "[dim]no GPU[/dim]"
    return "[green]fits[/green]" if est.fits else "[red]no fit[/red]"


def estimates_table(estimates: list[Estimate], title: str):
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption="all sizes in GiB (2^30 bytes); peak = device "
                  "view (reserved + CUDA context)", caption_justify="left", padding=(0, 1), collapse_padding=True, pad_edge=False,
                  box=box.SIMPLE_HEAD)
    rows = []
    for e in estimates:
        parts = (sum(e.components.get(c, 0) for c in cats) for cats in COLUMNS.values())
        rows.append((
            e.method.value, fmt_gib(e.peak_device_bytes), PHASE_LABEL[e.peak_phase], *map(fmt_gib, parts), verdict(e),
            fmt_gib(e.headroom_bytes), "-" if e.max_batch is None else str(e.max_batch),
            "-" if e.max_seq is None else str(e.max_seq),
        ))
    names = ("method", "peak\nGiB", "phase", *COLUMNS, "verdict", "head-\nroom", "max\nbatch", "max\nseq")
    for i, name in enumerate(names):
        width = max(len(r[i]) for r in rows) if name != "verdict" else 6  # cells never get cut
        table.add_column(name, justify="left" if name in ("method", "phase", "verdict") else "right",
                         no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def title_of(est: Estimate) -> str:
    gpu = f" · {est.gpu.name} {fmt_gib(est.gpu.total_bytes)} GiB" if est.gpu else " · no GPU, no verdict"
    return (f"{est.model} · {est.scheme.value} · {est.dtype.value} · batch {est.batch} x seq {est.seq} · "
            f"{est.attention.value} · {est.tier.value}{gpu}")


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


def check_table(results: list):
    """One row per run x GPU x method of `memplan check` (plan.Result)."""
    from pathlib import Path

    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="memplan check", title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True, pad_edge=False,
                  caption="sizes in GiB (2^30 bytes); peak = device view; budget = GPU total - margin")
    rows = [(escape(Path(r.plan).name), escape(r.run), r.gpu, r.method, fmt_gib(r.estimate.peak_device_bytes),
             fmt_gib(r.budget_bytes), fmt_gib(r.budget_bytes - r.estimate.peak_device_bytes),
             PHASE_LABEL[r.estimate.peak_phase], "[green]fits[/green]" if r.fits else "[red]no fit[/red]")
            for r in results]
    names = ("plan", "run", "gpu", "method", "peak", "budget", "head-\nroom", "phase", "verdict")
    for i, name in enumerate(names):
        numeric = name in ("peak", "budget", "head-\nroom")
        # Numbers and short names never wrap; plan and run names fold rather than lose their ends.
        table.add_column(name, justify="right" if numeric else "left",
                         no_wrap=name not in ("plan", "run"), overflow="fold",
                         min_width=(max(len(r[i]) for r in rows) if name not in ("plan", "run", "verdict") else 6))
    for row in rows:
        table.add_row(*row)
    return table
