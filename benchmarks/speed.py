"""Speed of the analytic tier: a 10,000-config sweep through the API, and `memplan fit` start-up.

Targets (issue "memplan fit"): the sweep in at most 1 s on a 2-core machine; `memplan fit opt-13b
--method all` at most 1.5x the time of `python -c "import typer, rich, pydantic"`.
Run: python benchmarks/speed.py   (results are recorded in benchmarks/RESULTS.md by hand)
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sweep(n_target: int = 10_000) -> tuple[int, float]:
    from memplan.api import estimate_config
    from memplan.options import Config, Method
    from memplan.spec import resolve

    models = ["opt-125m", "opt-13b"]
    specs = {m: resolve(m) for m in models}
    grid = itertools.product(models, [m.value for m in Method],
                             ["ft", "lora", "prefix"], ["fp16", "amp-bf16"], ["eager", "sdpa"], [1, 2, 4, 8, 16, 32],
                             [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
    configs = [Config(model=m, method=me, scheme=sc, dtype=dt, attention=at, batch=b, seq=s)
               for m, me, sc, dt, at, b, s in itertools.islice(grid, n_target)]
    start = time.perf_counter()
    for cfg in configs:
        estimate_config(cfg, search=False, spec=specs[cfg.model])
    return len(configs), time.perf_counter() - start


def walls(cmds: dict[str, list[str]], repeat: int = 9) -> dict[str, float]:
    """Median wall time of each command, run interleaved so load drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=False, capture_output=True)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# A bare typer app with one command of as many options, rendering nothing: what typer itself costs
# to run a command (typer >= 0.20 builds its click command through its adapters at call time).
BARE_TYPER = """
from typing import Optional
import typer, rich, pydantic
from rich.console import Console
from rich.table import Table
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
@app.callback()
def root(): pass
@app.command("fit")
def fit(model: str = typer.Argument(...), method: Optional[list[str]] = typer.Option(None, "--method"),
        o1: str = "ft", o2: str = "fp16", o3: int = 1, o4: int = 512, o5: str = "sdpa",
        o6: Optional[str] = None, o7: int = 8, o8: int = 16, o9: Optional[str] = None, o10: int = 5,
        o11: int = 10, o12: bool = typer.Option(False, "--o12"), o13: str = "mezo", o14: int = 1,
        o15: str = "current", o16: bool = typer.Option(False, "--o16"), o17: bool = typer.Option(False, "--json")):
    pass
app(["fit", "opt-13b", "--method", "all"], standalone_mode=False)
"""


def main() -> None:
    n, seconds = sweep()
    print(f"sweep: {n} configs in {seconds:.3f} s = {n / seconds:,.0f} estimates/s (target: <= 1 s)")
    fit_cmd = [sys.executable, "-m", "memplan", "fit", "opt-13b", "--method", "all"]
    t = walls({"base": [sys.executable, "-c", "import typer, rich, pydantic"], "fit": fit_cmd,
               "fit_gpu": fit_cmd + ["--gpu", "h100"], "bare": [sys.executable, "-c", BARE_TYPER]})
    base, fit, fit_gpu, bare = t["base"], t["fit"], t["fit_gpu"], t["bare"]
    print(f"import typer, rich, pydantic: {base:.3f} s (median of 9, interleaved)")
    print(f"memplan fit opt-13b --method all: {fit:.3f} s = {fit / base:.2f}x (target: <= 1.5x)")
    print(f"  ... with --gpu h100 (verdict, max batch and seq searches): {fit_gpu:.3f} s = {fit_gpu / base:.2f}x")
    print(f"a bare typer command with as many options, plus rich's console and table: {bare:.3f} s = "
          f"{bare / base:.2f}x; memplan's own share: {fit - bare:.3f} s")


if __name__ == "__main__":
    main()
