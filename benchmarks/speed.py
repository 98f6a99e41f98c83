"""Speed of the analytic tier: a 10,000-config sweep through the API, and `memplan fit` start-up.

Targets: the sweep in at most 1 s on a 2-core machine; `memplan fit opt-13b --method all` at most
1.2x a bare typer app with as many options that prints one rich table of the same shape.
Run: python benchmarks/speed.py   (results are recorded in benchmarks/RESULTS.md by hand)

Children run with bytecode, as an installed package runs: memplan is byte-compiled first and
PYTHONDONTWRITEBYTECODE is removed from their environment (without .pyc files every start would
compile memplan's sources, which no installed copy does). Each command's wall time and CPU time
(user + system, less sensitive to other load) are medians over interleaved runs.
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


def timings(cmds: dict[str, list[str]], repeat: int = 31) -> dict[str, tuple[float, float]]:
    """(median wall, median CPU) seconds of each command, run interleaved so load drifts hit all alike."""
    import compileall
    import os

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "memplan"), quiet=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    cpus: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            start = time.perf_counter()
            child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            _, _, usage = os.wait4(child.pid, 0)
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(usage.ru_utime + usage.ru_stime)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in cmds}


# A bare typer app with one command of as many options as `fit` (17 written out, the rest added to
# match) that prints one rich table of the fit table's shape (one row per method, 12 columns): what
# typer and rich themselves cost to answer.
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
        o15: str = "current", o16: bool = typer.Option(False, "--o16"), o17: bool = typer.Option(False, "--json")EXTRA):
    table = Table(title=f"{model} · ft · fp16 · batch 1 x seq 512")
    for c in range(12):
        table.add_column(f"col {c}", justify="right")
    for r in range(ROWS):
        table.add_row(*(f"{r * c / 3:.2f}" for c in range(12)))
    Console().print(table)
app(["fit", "opt-13b", "--method", "all"], standalone_mode=False)
"""


def main() -> None:
    n, seconds = sweep()
    print(f"sweep: {n} configs in {seconds:.3f} s = {n / seconds:,.0f} estimates/s (target: <= 1 s)")
    fit_cmd = [sys.executable, "-m", "memplan", "fit", "opt-13b", "--method", "all"]
    from memplan.options import Config, Method

    # As many options as fit has: Config's fields other than model and method, plus --gpu and --json.
    extra = len(Config.model_fields) - 2 + 2 - 17
    bare = BARE_TYPER.replace("ROWS", str(len(Method))).replace(
        "EXTRA", "".join(f", x{i}: int = {i}" for i in range(max(0, extra))))
    t = timings({"base": [sys.executable, "-c", "import typer, rich, pydantic"], "bare": [sys.executable, "-c", bare],
                 "fit": fit_cmd, "fit_gpu": fit_cmd + ["--gpu", "h100"]})
    (bw, bc) = t["bare"]
    print(f"{'command':58} {'wall s':>7} {'x bare':>7} {'CPU s':>7} {'x bare':>7}")
    for name, label in (("base", "import typer, rich, pydantic"),
                        ("bare", f"bare typer app printing one rich table ({len(Method)} x 12)"),
                        ("fit", "memplan fit opt-13b --method all (target: <= 1.2x bare)"),
                        ("fit_gpu", "  ... --gpu h100 (verdicts, max batch and seq searches)")):
        w, c = t[name]
        print(f"{label:58} {w:7.3f} {w / bw:7.2f} {c:7.3f} {c / bc:7.2f}")


if __name__ == "__main__":
    main()
