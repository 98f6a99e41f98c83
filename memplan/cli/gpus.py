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
        out.print(_table("catalog", known))
        out.print(_table("detected", found) if found else "No NVIDIA GPU found (NVML not available); name one with --gpu.")


def _table(title: str, rows: list[dict]):
    from rich.table import Table

    table = Table("name", "GPU", "memory (GiB)", "family", title=title)
    for r in rows:
        table.add_row(r["name"], r["display"], f"{r['total_bytes'] / GIB:.2f}", r["family"])
    return table
