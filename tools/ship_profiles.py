"""Profiles shipped with memplan for the catalog's table families, so that `memplan fit` on them answers
exactly without torch for the configurations asked most: `fit MODEL` as it stands (zo-sgd) and its
first-order baseline (`-m fo-adam`), every other option at its default (ft, fp16, sdpa). Any other
configuration is traced on first use and cached (torch), or answered by the borrowed formulas.

    python tools/ship_profiles.py                 # trace what is missing into memplan/data/profiles/
    python tools/ship_profiles.py --list          # what would be shipped, and what is there
    python tools/ship_profiles.py --from-end      # the same, last first: two processes share the work

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


def config_of(model: str, method: str):
    """The Config `fit MODEL -m METHOD` estimates (sdpa becomes eager where the type has no SDPA)."""
    from memplan.options import Config
    from memplan.pipeline import eager_without_sdpa
    from memplan.spec import resolve

    return eager_without_sdpa(Config(model=model, method=method), resolve(model))[0]


def path_of(model: str, method: str) -> Path:
    from memplan import profile
    from memplan.spec import resolve

    return profile.SHIPPED / f"{profile.key(resolve(model).config, config_of(model, method))}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list, trace nothing")
    ap.add_argument("--from-end", action="store_true", help="last first (a second process shares the work)")
    args = ap.parse_args()
    from memplan.errors import MemplanError
    from memplan.files import write_atomic
    from memplan.symbolic import build_profile

    for model, method in (reversed(wanted()) if args.from_end else wanted()):
        path = path_of(model, method)
        if args.list or path.exists():  # (re-checked per profile: another process may have made it)
            print(f"{'shipped' if path.exists() else 'missing'}  {model} {method}  {path.name}")
            continue
        start = time.perf_counter()
        try:
            prof = build_profile(config_of(model, method), min_seq=1)  # every regime a verdict's searches reach
        except MemplanError as e:
            print(f"FAILED   {model} {method}: {e}", flush=True)
            continue
        write_atomic(path, prof.to_json())
        print(f"traced   {model} {method} in {time.perf_counter() - start:.0f} s: {len(prof.regimes)} regimes, "
              f"{path.stat().st_size} B", flush=True)


if __name__ == "__main__":
    main()
