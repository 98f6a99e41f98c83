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


_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_count(text: str, flag: str) -> int:
    """A parameter count as people write it: 7B, 0.5B, 350M, 1.5e9."""
    from memplan.errors import MemplanError

    t = text.strip().upper()
    unit = t[-1] if t and t[-1] in _SCALE else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise MemplanError(f"{flag}: {text!r} is not a parameter count; write it as 7B, 350M or 1.5e9") from None
    return int(value * _SCALE[unit])


def _in_family(model_type: str, family: str) -> bool:
    """qwen3 holds qwen3 and qwen3_moe; deepseek holds deepseek_v2 and deepseek_v3."""
    f = family.strip().lower().replace("-", "_")
    return model_type == f or model_type.startswith(f + "_")


def register(app: typer.Typer) -> None:
    @app.command("models")
    @guarded
    def models(json_out: bool = typer.Option(False, "--json", help="Print {\"models\": [...]} as JSON."),
               family: str = typer.Option("", "--family", help="Only this model_type (qwen3 includes qwen3_moe)."),
               max_params: str = typer.Option("", "--max-params", help="Only models of at most this many parameters "
                                              "(7B, 350M)."),
               min_params: str = typer.Option("", "--min-params", help="Only models of at least this many "
                                              "parameters.")) -> None:
        """List the model catalog: ids, aliases, parameters and shapes."""
        from memplan.errors import MemplanError
        from memplan.spec import catalog_entries

        rows = [_row(e) for e in catalog_entries()]
        if family:
            known = sorted({r["model_type"] for r in rows})
            if not any(_in_family(t, family) for t in known):
                raise MemplanError(f"--family: no catalog model of family {family!r}; families: {', '.join(known)}")
            rows = [r for r in rows if _in_family(r["model_type"], family)]
        if max_params:
            rows = [r for r in rows if r["params"] <= parse_count(max_params, "--max-params")]
        if min_params:
            rows = [r for r in rows if r["params"] >= parse_count(min_params, "--min-params")]
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
