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
# Shown only when some estimate holds collective buffers (several GPUs, sharding).
COMM_COLUMN = {"comm": (Category.COMMUNICATION,)}


def columns_of(estimates: list[Estimate]) -> dict:
    """COLUMNS, with the communication column before the overheads when some estimate has one."""
    if not any(e.components.get(Category.COMMUNICATION, 0) for e in estimates):
        return COLUMNS
    items = list(COLUMNS.items())
    return dict(items[:-1] + list(COMM_COLUMN.items()) + items[-1:])


PHASE_LABEL = {Phase.LOAD: "load", Phase.FORWARD: "fwd", Phase.BACKWARD: "bwd", Phase.OPTIMIZER_STEP: "step",
               Phase.PERTURB: "perturb"}


def verdict(est: Estimate) -> str:
    if est.fits is None:
        return "[dim]no GPU[/dim]"
    return "[green]fits[/green]" if est.fits else "[red]no fit[/red]"


def compact_table(**kwargs):
    """The tables' one style: a rule under the header, one space between columns, no frame."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, show_edge=False,
                 **kwargs)


def add_columns(table, names: tuple[str, ...], rows: list[tuple], left: tuple[str, ...] = ()) -> None:
    """Columns that never wrap nor cut a cell: each is as wide as its widest cell or header line.

    Cells are parsed once into `Text` (markup only where a cell has some: most are numbers), so rich
    neither parses nor measures a cell twice.
    """
    from rich.text import Text

    def text(cell: str) -> Text:
        return Text.from_markup(cell, emoji=False) if "[" in cell else Text(cell)

    def width(t: Text) -> int:
        return max(Text(line).cell_len for line in t.plain.split("\n")) if "\n" in t.plain else t.cell_len

    cells = [[text(c) for c in row] for row in rows]
    for i, name in enumerate(names):
        head = text(name)
        table.add_column(head, justify="left" if name in left else "right", no_wrap=True,
                         min_width=max([width(r[i]) for r in cells] + [width(head)]))
    for row in cells:
        table.add_row(*row)


def print_fitting(out, *layouts) -> None:
    """Print the first layout whose tables all fit the console's width; the last one always prints.

    A layout is a function returning renderables. A table wider than the terminal would cut cells
    (`…`) or drop columns, so it gives way to a narrower layout instead; text parts wrap at spaces,
    which keeps numbers whole.
    """
    from rich.table import Table

    for i, layout in enumerate(layouts):
        parts = layout()
        last = i == len(layouts) - 1
        if last or all(table_width(out, p) <= out.width for p in parts if isinstance(p, Table)):
            for part in parts:
                out.print(part)
            return


def table_width(out, table) -> int:
    """Columns a table needs. For the tables `add_columns` fills (every column as wide as its widest
    cell, no wrapping, one space of padding either side of each gap): the widths plus two per gap,
    which is what rich measures, without rendering every cell again (most of `fit`'s run time)."""
    widths = [c.min_width for c in table.columns]
    if widths and None not in widths and table.padding == (0, 1, 0, 1) and not table.show_edge:
        return sum(widths) + 2 * (len(widths) - 1)
    return out.measure(table, options=out.options.update_width(1 << 16)).maximum


def indented(text: str, by: int = 2):
    """Markup text indented by `by` columns, its wrapped lines too."""
    from rich.padding import Padding
    from rich.text import Text

    return Padding(Text.from_markup(text, emoji=False), (0, 0, 0, by))


def _estimate_cells(e: Estimate, columns: dict = COLUMNS) -> dict[str, str]:
    parts = (sum(e.components.get(c, 0) for c in cats) for cats in columns.values())
    return {"method": e.method.value, "peak\nGiB": fmt_gib(e.peak_device_bytes), "phase": PHASE_LABEL[e.peak_phase],
            **dict(zip(columns, map(fmt_gib, parts))), "verdict": verdict(e), "head-\nroom": fmt_gib(e.headroom_bytes),
            "max\nbatch": "-" if e.max_batch is None else str(e.max_batch),
            "max\nseq": "-" if e.max_seq is None else str(e.max_seq), "host\nGiB": fmt_gib(e.host_bytes)}


def _shown(names, estimates: list[Estimate]) -> tuple[str, ...]:
    """`names` without the host column when no estimate needs host memory."""
    return tuple(n for n in names if n != "host\nGiB" or any(e.host_bytes for e in estimates))


VERDICT_COLUMNS = ("method", "peak\nGiB", "phase", "verdict", "head-\nroom", "max\nbatch", "max\nseq", "host\nGiB")
_LEFT = ("method", "phase", "verdict")


def estimates_table(estimates: list[Estimate], names: tuple[str, ...] | None = None):
    """The `fit` / `trace` table: one row per method; `names` picks columns (default: all)."""
    columns = columns_of(estimates)
    cells = [_estimate_cells(e, columns) for e in estimates]
    names = _shown(names or tuple(cells[0]), estimates)
    table = compact_table()
    add_columns(table, names, [tuple(c[n] for n in names) for c in cells], left=_LEFT)
    return table


def _label(name: str) -> str:
    """A column header on one line: `head-\\nroom` -> `headroom`, `max\\nseq` -> `max seq`."""
    return name.replace("-\n", "").replace("\n", " ")


def estimate_blocks(estimates: list[Estimate]) -> list:
    """The narrow layout of `fit`: per method, its verdict line, then its numbers as `key value` pairs."""
    out = []
    columns = columns_of(estimates)
    for e in estimates:
        c = {_label(name): cell for name, cell in _estimate_cells(e, columns).items()}
        out.append(f"[bold]{c['method']}[/bold]: {c['verdict']}")
        out.append(indented(f"peak {c['peak GiB']} GiB at {c['phase']}, headroom {c['headroom']} GiB, "
                            f"max batch {c['max batch']}, max seq {c['max seq']}"))
        parts = (f"{_label(name).replace(' ', '')} {c[_label(name)]}" for name in COLUMNS)
        host = f", host memory {c['host GiB']}" if e.host_bytes else ""
        out.append(indented(", ".join(parts) + host + " (GiB)"))
    return out


CAPTION = "all sizes in GiB (2^30 bytes); peak = device view (reserved + CUDA context)"


def per_gpu(est: Estimate) -> bool:
    return est.config is not None and est.config.num_gpus > 1


def title_of(est: Estimate) -> str:
    gpu = f" · {est.gpu.name} {fmt_gib(est.gpu.total_bytes)} GiB" if est.gpu else " · no GPU, no verdict"
    layout = ""
    cfg = est.config
    if cfg is not None and (cfg.num_gpus > 1 or cfg.sharding.resolved(cfg.num_gpus).value != "none"
                            or cfg.offload.value != "none"):
        layout = f" · {cfg.num_gpus} GPUs, {cfg.sharding.resolved(cfg.num_gpus).value}"
        layout += f", offload {cfg.offload.value}" if cfg.offload.value != "none" else ""
    return (f"{est.model} · {est.scheme.value} · {est.dtype.value} · batch {est.batch} x seq {est.seq} · "
            f"{est.attention.value}{savers_label(est)} · {est.tier.value}{layout}{gpu}")


def savers_label(est: Estimate) -> str:
    """` · optim 8bit · activation offload · grad accum 4 (effective batch 8)`: the savers that are on."""
    cfg = est.config
    if cfg is None:
        return ""
    from memplan.savers import effective_batch

    parts = [f"optim {cfg.optim.value}"] if cfg.optim.value != "foreach" else []
    parts += [label for label, on in (("activation offload", cfg.activation_offload),
                                      ("optimizer in backward", cfg.optimizer_in_backward)) if on]
    if cfg.grad_accum > 1:
        parts.append(f"grad accum {cfg.grad_accum} (effective batch {effective_batch(cfg)})")
    return "".join(f" · {p}" for p in parts)


def caption_of(estimates: list[Estimate]) -> str:
    """CAPTION; with several GPUs it says the numbers are per GPU (the busiest rank)."""
    if any(per_gpu(e) for e in estimates):
        return CAPTION.replace("all sizes", "all sizes per GPU (the busiest rank)")
    return CAPTION


def render(estimates: list[Estimate], *, as_json: bool, notes: list[str] = ()) -> None:
    """Print estimates as a table (with notes) or as `{"estimates": [...]}`."""
    from memplan.cli._common import console, print_json

    if as_json:
        print_json({"estimates": [e.to_json_dict() for e in estimates]})
        return
    from rich.text import Text

    # stdout holds the table; what is said about it goes to stderr, so `> file` keeps the table alone.
    out, err = console(), console(stderr=True)
    caption = Text(caption_of(estimates), style="dim")
    head = [Text(title_of(estimates[0])), ""]
    print_fitting(
        out,
        lambda: [*head, estimates_table(estimates), "", caption],
        lambda: [*head, estimates_table(estimates, VERDICT_COLUMNS), "",
                 estimates_table(estimates, ("method", *columns_of(estimates))), "", caption],
        lambda: [*head, *estimate_blocks(estimates), "", caption],
    )
    for source in sorted({e.correction for e in estimates if e.correction}):
        err.print(f"overheads corrected by calibration: {source}", markup=False)
    from rich.markup import escape  # notes and warnings are plain text: `memplan[torch]` is no markup tag

    for line in notes:
        err.print(escape(line))
    for w in sorted({w for e in estimates for w in e.warnings}):
        err.print(f"[yellow]warning:[/yellow] {escape(w)}")


def exit_code(estimates: list[Estimate]) -> int:
    """0: all fit (or nothing to judge against); 1: some does not fit."""
    return 1 if any(e.fits is False for e in estimates) else 0


CHECK_CAPTION = "sizes in GiB (2^30 bytes); peak = device view; budget = GPU total - margin"
_CHECK_COLUMNS = ("gpu", "method", "peak", "budget", "head-\nroom", "phase", "verdict")


def _check_cells(r) -> tuple[str, ...]:
    return (r.gpu, r.method, fmt_gib(r.estimate.peak_device_bytes), fmt_gib(r.budget_bytes),
            fmt_gib(r.budget_bytes - r.estimate.peak_device_bytes), PHASE_LABEL[r.estimate.peak_phase],
            "[green]fits[/green]" if r.fits else "[red]no fit[/red]")


def _names(r) -> tuple[str, str]:
    from pathlib import Path

    from rich.markup import escape

    return escape(Path(r.plan).name), escape(r.run)


def check_table(results: list):
    """One row per run x GPU x method of `memplan check` (plan.Result), every name and number whole."""
    table = compact_table()
    rows = [(*_names(r), *_check_cells(r)) for r in results]
    add_columns(table, ("plan", "run", *_CHECK_COLUMNS), rows, left=("plan", "run", "gpu", "method", "phase", "verdict"))
    return table


def check_groups(results: list) -> list:
    """The middle layout of `check`: a `plan · run` line above each run's rows, one header for all."""
    import itertools

    from rich.text import Text

    left = ("gpu", "method", "phase", "verdict")
    rows = [_check_cells(r) for r in results]
    widths = [max([Text.from_markup(row[i], emoji=False).cell_len for row in rows] + [len(x) for x in name.split("\n")])
              for i, name in enumerate(_CHECK_COLUMNS)]

    def table(show_header: bool):
        t = compact_table(show_header=show_header)
        for name, width in zip(_CHECK_COLUMNS, widths):
            t.add_column(name, justify="left" if name in left else "right", no_wrap=True, width=width)
        return t

    out = [table(True)]
    for (plan, run), group in itertools.groupby(zip(results, rows), key=lambda rr: _names(rr[0])):
        body = table(False)
        for _, row in group:
            body.add_row(*row)
        out += [f"[bold]{plan}[/bold] · {run}", body]
    return out


def check_blocks(results: list) -> list:
    """The narrow layout of `check`: a `plan · run` line, then one wrapped line per GPU x method."""
    import itertools

    out = []
    for (plan, run), group in itertools.groupby(results, key=_names):
        out.append(f"[bold]{plan}[/bold] · {run}")
        for r in group:
            gpu, method, peak, budget, headroom, phase, verdict_ = _check_cells(r)
            out.append(indented(f"{gpu} {method}: {verdict_}, peak {peak}, budget {budget}, "
                                f"headroom {headroom} GiB, at {phase}"))
    return out


def print_check(out, results: list) -> None:
    """The `check` table, in the widest layout the console holds."""
    from rich.text import Text

    caption = Text(CHECK_CAPTION, style="dim")
    print_fitting(
        out,
        lambda: ["memplan check", "", check_table(results), "", caption],
        lambda: ["memplan check", "", *check_groups(results), "", caption],
        lambda: ["memplan check", "", *check_blocks(results), "", caption],
    )
