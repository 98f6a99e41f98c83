"""`memplan gpus`: the GPU catalog, then the GPUs NVML finds on this machine."""

from __future__ import annotations

import typer

from memplan.cli._common import console, guarded, print_json

from memplan.units import GIB


def _row(g) -> dict:
    return {"name": g.name, "display": g.display, "total_bytes": g.total_bytes, "family": g.family,
            "aliases": list(g.aliases), "source": g.source}


def register(app: typer.Typer) -> None:
    @app.command("gpus")
    @guarded
    def gpus(json_out: bool = typer.Option(False, "--json", help="Print {\"gpus\": [...], \"detected\": [...]}.")) -> None:
        """List the GPU catalog (memory as the driver reports it) and the GPUs found locally."""
        from memplan import hardware

        known = [_row(g) for g in hardware.catalog()]
        found = [_row(g) for g in hardware.detect()]
        if json_out:
            print_json({"gpus": known, "detected": found})
            return
        out = console()
        _print(out, "catalog", known)
        if found:
            out.print()
            _print(out, "detected", found)
        else:
            out.print("No NVIDIA GPU found (NVML not available); name one with --gpu.")


def _print(out, title: str, rows: list[dict]) -> None:
    """A table of GPUs, or one line per GPU where the console is too narrow for it."""
    from memplan.cli.render import add_columns, compact_table, indented, print_fitting

    cells = [(r["name"], r["display"], f"{r['total_bytes'] / GIB:.2f}", r["family"]) for r in rows]

    def table():
        t = compact_table()
        add_columns(t, ("name", "GPU", "memory\n(GiB)", "family"), cells, left=("name", "GPU", "family"))
        return [f"[bold]{title}[/bold]", t]

    def lines():
        return [f"[bold]{title}[/bold]",
                *(indented(f"{name}: {display}, {gib} GiB, {family}") for name, display, gib, family in cells)]

    print_fitting(out, table, lines)
