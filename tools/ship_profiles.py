"""Profiles shipped with memplan for the catalog's table families, so that `memplan fit` on them answers
exactly without torch for the configurations asked most: `fit MODEL` as it stands (zo-sgd) and its
first-order baseline (`-m fo-adam`), every other option at its default (ft, fp16, sdpa). Any other
configuration is traced on first use and cached (torch), or answered by the borrowed formulas.

    python tools/ship_profiles.py                 # trace what is missing into memplan/data/profiles/
    python tools/ship_profiles.py --list          # what would be shipped, and what is there

Each profile covers the whole (batch, seq) grid, one-token sequences included (every regime a
verdict's max batch and max seq searches can reach), from shallow copies where the model is deep
(`memplan.depth`). Resumable: a profile already shipped is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("zo-sgd", "fo-adam")


def wanted() -> list[tuple[str, str]]:
    """(catalog id, method) of every profile to ship: catalog models whose family has no hand formulas."""
    from memplan import arch
    from memplan.spec import catalog_entries

    out = []
    for e in catalog_entries():
        a = arch.find(e["config"]["model_type"])
        if a is not None and a.activations_note:
            out += [(e["id"], m) for m in METHODS]
    return out


def path_of(model: str, method: str) -> Path:
    from memplan import profile
    from memplan.options import Config
    from memplan.spec import resolve

    spec = resolve(model)
    return profile.SHIPPED / f"{profile.key(spec.config, Config(model=model, method=method))}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list, trace nothing")
    args = ap.parse_args()
    from memplan.files import write_atomic
    from memplan.options import Config
    from memplan.symbolic import build_profile

    for model, method in wanted():
        path = path_of(model, method)
        if args.list or path.exists():
            print(f"{'shipped' if path.exists() else 'missing'}  {model} {method}  {path.name}")
            continue
        start = time.perf_counter()
        prof = build_profile(Config(model=model, method=method), min_seq=1)  # a max-seq search starts at 1
        write_atomic(path, prof.to_json())
        print(f"traced   {model} {method} in {time.perf_counter() - start:.0f} s: {len(prof.regimes)} regimes, "
              f"{path.stat().st_size} B", flush=True)


if __name__ == "__main__":
    main()
