"""`memplan profile MODEL`: trace a configuration's profile now (its peak as formulas of batch and seq)
and cache it, so `fit`, sweeps, max batch and max seq answer from the trace without torch later."""

from __future__ import annotations

from typing import Optional

import typer

from memplan.cli._common import guarded
from memplan.cli._options import with_config_options


@with_config_options(exclude=("model", "method", "batch", "seq"))
@guarded
def command(
    model: str = typer.Argument(..., help="Catalog id or alias, config.json, or a folder with one."),
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Method (repeatable, "
                                               "comma-separated) or 'all'; default zo-sgd."),
    *,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    **options,
) -> None:
    """Trace profiles (bytes as formulas of batch and seq) into the user cache; needs torch."""
    import sys
    import time

    from memplan.build import model_config_dict
    from memplan.cli._common import print_json
    from memplan.cli._options import make_config
    from memplan.options import parse_methods
    from memplan.pipeline import make_profile
    from memplan.profile import cache_dir, key

    done = []
    for m in parse_methods(method or None):
        cfg = make_config(model, m, options)
        start = time.perf_counter()
        prof = make_profile(cfg, _Named(*model_config_dict(cfg.model)))
        seconds = time.perf_counter() - start
        path = cache_dir() / f"{key(model_config_dict(cfg.model)[1], cfg)}.json"
        done.append({"method": cfg.method.value, "source": prof.source, "seconds": round(seconds, 1),
                     "regimes": [r.when for r in prof.regimes], "rows": sum(len(r.rows) for r in prof.regimes),
                     "bytes": len(prof.to_json()), "path": str(path)})
        if not as_json:
            print(f"{cfg.method.value}: {prof.source} profile, {done[-1]['rows']} rows in "
                  f"{len(prof.regimes)} regimes, {seconds:.1f} s -> {path}", file=sys.stdout)
    if as_json:
        print_json({"profiles": done})


class _Named:
    """What `make_profile` reads of a model: its name, config dict and type."""

    def __init__(self, name: str, config: dict):
        self.name, self.config, self.model_type = name, config, config.get("model_type")


def register(app: typer.Typer) -> None:
    app.command("profile")(command)
