"""`memplan models`: the shipped model catalog, with the shape facts that drive memory."""

from __future__ import annotations

import typer

from memplan.cli._common import console, guarded, print_json


def _row(entry: dict) -> dict:
    from memplan.spec import resolve

    s = resolve(entry["id"])
    return {"id": s.name, "aliases": entry.get("aliases", []), "model_type": s.model_type, "params": s.param_count,
            "layers": s.num_layers, "hidden_size": s.hidden_size, "heads": s.num_heads, "kv_heads": s.num_kv_heads,
            "vocab_size": s.vocab_size, "tie_word_embeddings": s.tie_word_embeddings, "source": s.source}


def register(app: typer.Typer) -> None:
    @app.command("models")
    @guarded
    def models(json_out: bool = typer.Option(False, "--json", help="Print {\"models\": [...]} as JSON.")) -> None:
        """List the model catalog: ids, aliases, parameters and shapes."""
        from memplan.spec import catalog_entries

        rows = [_row(e) for e in catalog_entries()]
        if json_out:
            print_json({"models": rows})
            return
        from rich.table import Table

        table = Table("model", "aliases", "params (B)", "layers", "hidden", "heads/kv", "type")
        table.columns[0].no_wrap = True  # ids are what users copy; let aliases wrap instead
        for r in rows:
            table.add_row(r["id"], ", ".join(r["aliases"]), f"{r['params'] / 1e9:.2f}", str(r["layers"]),
                          str(r["hidden_size"]), f"{r['heads']} / {r['kv_heads']}", r["model_type"])
        console().print(table)
