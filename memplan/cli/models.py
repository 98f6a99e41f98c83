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
        from memplan.cli.render import add_columns, compact_table, indented, print_fitting

        cells = [(r["id"], f"{r['params'] / 1e9:.2f}", str(r["layers"]), str(r["hidden_size"]),
                  f"{r['heads']} / {r['kv_heads']}", r["model_type"]) for r in rows]
        shape = ("params\n(B)", "layers", "hidden", "heads\n/ kv", "type")

        def wide():  # aliases in their own column, one a line
            table = compact_table()
            add_columns(table, ("model", "aliases", *shape),
                        [(c[0], "\n".join(r["aliases"]), *c[1:]) for c, r in zip(cells, rows)],
                        left=("model", "aliases", "type"))
            return [table]

        def stacked():  # aliases under the id: what users copy stays whole
            table = compact_table()
            add_columns(table, ("model\n  aliases", *shape),
                        [("\n".join([c[0], *("  " + a for a in r["aliases"])]), *c[1:]) for c, r in zip(cells, rows)],
                        left=("model\n  aliases", "type"))
            return [table]

        def blocks():
            out = []
            for (mid, params, layers, hidden, heads, kind), r in zip(cells, rows):
                out += [f"[bold]{mid}[/bold]", indented(f"aliases {', '.join(r['aliases']) or '-'}; {kind}, {params} B "
                                                         f"params, {layers} layers, hidden {hidden}, heads {heads}")]
            return out

        print_fitting(console(), wide, stacked, blocks)
