"""Charts: fit / no-fit grids, stacked breakdowns, peak-vs-seq sweeps. Data first, drawing apart.

`grid`, `breakdown` and `sweep` compute what a chart shows (plain numbers, from the analytic
estimator); `save` draws it to PNG or SVG by the file's suffix. Drawing is deterministic: fixed size
and dpi, a fixed SVG hash salt and no dates in the metadata, so the same input gives the same bytes.
Matplotlib is imported only inside `save`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from memplan import hardware
from memplan.errors import MemplanError
from memplan.result import Category
from memplan.units import gib as _gib
from memplan.margin import Margin
from memplan.options import Config, Method, Sharding

FITS, TIGHT, NO_FIT = "fits", "tight", "no fit"
STATUS_COLOURS = {FITS: "#5cb85c", TIGHT: "#f0ad4e", NO_FIT: "#d9534f"}
# Palettes are cycled over the enums, so a method or category added later gets a colour too.
_METHOD_PALETTE = ("#1f77b4", "#d62728", "#9467bd", "#2ca02c", "#17becf", "#bcbd22", "#8c564b", "#ff7f0e")
# Markers and dashes tell apart lines that coincide (zo-sgd, zo-sgd-cons and zo-sgd-sign often do).
_METHOD_MARKS = (("o", "-"), ("s", "-"), ("^", "-"), ("D", "--"), ("v", "-."), ("P", ":"), ("X", (0, (5, 1))),
                 ("*", "-"))
_CATEGORY_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                     "#9c755f", "#bab0ac")


def _cycled(names, palette) -> dict:
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


METHOD_COLOURS = _cycled((m.value for m in Method), _METHOD_PALETTE)
METHOD_STYLES = _cycled((m.value for m in Method), _METHOD_MARKS)
# Lines of a sweep over the number of GPUs are sharding modes (one method), or "method mode" pairs.
SHARDING_COLOURS = _cycled((m.value for m in Sharding), _METHOD_PALETTE)
SHARDING_STYLES = _cycled((m.value for m in Sharding), _METHOD_MARKS)
SWEEPS = ("seq", "batch", "num-gpus")
CATEGORY_COLOURS = _cycled((c.value for c in Category), _CATEGORY_PALETTE)
DPI = 100


@dataclass(frozen=True)
class Capacity:
    """The GPU a chart judges against and the margin it keeps free."""

    gpu: str
    display: str
    total_bytes: int
    margin: str
    margin_bytes: int

    @property
    def budget_bytes(self) -> int:
        return self.total_bytes - self.margin_bytes

    def status(self, peak_bytes: int) -> str:
        """fits (within total - margin), tight (within the margin), no fit (over the total)."""
        if peak_bytes <= self.budget_bytes:
            return FITS
        return TIGHT if peak_bytes <= self.total_bytes else NO_FIT


@dataclass(frozen=True)
class GridChart:
    capacity: Capacity
    models: list[str]
    methods: list[str]
    peak_bytes: list[list[int]]  # [model][method], device view
    status: list[list[str]]  # [model][method]: fits | tight | no fit
    subtitle: str
    kind: str = "grid"


@dataclass(frozen=True)
class BreakdownChart:
    capacity: Capacity
    model: str
    methods: list[str]
    components: dict[str, list[int]]  # category -> bytes at the peak, one per method
    peak_bytes: list[int]
    subtitle: str
    kind: str = "breakdown"


@dataclass(frozen=True)
class SweepChart:
    capacity: Capacity
    model: str
    over: str  # "seq", "batch" or "num-gpus"
    values: list[int]
    peak_bytes: dict[str, list[int | None]]  # line (a method, or a sharding mode) -> one per value (None: refused)
    subtitle: str
    kind: str = "sweep"
    warnings: list[str] = field(default_factory=list)


Chart = GridChart | BreakdownChart | SweepChart


def to_json_dict(chart: Chart) -> dict:
    return asdict(chart)


def _capacity(gpu: str | hardware.Gpu, margin: str | int | Margin) -> tuple[hardware.Gpu, Capacity]:
    g = gpu if isinstance(gpu, hardware.Gpu) else hardware.get_gpu(gpu)
    try:
        m = Margin.parse(margin)
    except ValueError as e:
        raise MemplanError(f"--margin: {e}") from None
    try:
        m.check_against(g.total_bytes, g.name)
    except MemplanError as e:
        raise MemplanError(f"--margin: {e}") from None
    return g, Capacity(g.name, g.display, g.total_bytes, str(m), m.bytes_of(g.total_bytes))


def _subtitle(cfg: Config, *, skip: str = "") -> str:
    parts = [cfg.scheme.value, cfg.dtype.value, f"batch {cfg.batch}" if skip != "batch" else "",
             f"seq {cfg.seq}" if skip != "seq" else "", f"{cfg.attention.value} attention"]
    if cfg.grad_checkpointing:
        parts.append("grad checkpointing")
    return ", ".join(p for p in parts if p)


def _peaks(model: str, methods: list[Method | str], gpu: hardware.Gpu, options: dict) -> list:
    from memplan.api import estimate_config
    from memplan.pipeline import model_of

    if not methods:
        raise MemplanError("--methods: name at least one method, or all")
    spec = model_of(model)
    return [estimate_config(Config(model=model, method=m, **options), gpu, search=False, spec=spec) for m in methods]


def grid(models: list[str], methods: list[Method | str], gpu: str | hardware.Gpu, *, margin: str | int = "5%",
         **options) -> GridChart:
    """Fit / tight / no fit of every model (rows) x method (columns) on one GPU; options are Config fields."""
    if not models:
        raise MemplanError("--models: name at least one model")
    g, cap = _capacity(gpu, margin)
    rows = [_peaks(model, methods, g, options) for model in models]
    peak = [[e.peak_device_bytes for e in row] for row in rows]
    return GridChart(cap, [row[0].model for row in rows], [e.method.value for e in rows[0]], peak,
                     [[cap.status(n) for n in row] for row in peak],
                     _subtitle(Config(model=models[0], **options)))


def breakdown(model: str, methods: list[Method | str], gpu: str | hardware.Gpu, *, margin: str | int = "5%",
              **options) -> BreakdownChart:
    """Bytes by category at each method's peak, for one configuration on one GPU."""
    g, cap = _capacity(gpu, margin)
    ests = _peaks(model, methods, g, options)
    used = [c for c in Category if any(e.components.get(c, 0) for e in ests)]
    return BreakdownChart(cap, ests[0].model, [e.method.value for e in ests],
                          {c.value: [e.components.get(c, 0) for e in ests] for c in used},
                          [e.peak_device_bytes for e in ests], _subtitle(Config(model=model, **options)))


def sweep(model: str, methods: list[Method | str], gpu: str | hardware.Gpu, *, over: str, values: list[int],
          margin: str | int = "5%", **options) -> SweepChart:
    """Peak device bytes against sequence length (or batch), one line per method; against the number of
    GPUs (`num-gpus`), per GPU, one line per sharding mode (the options' `sharding`, or every mode when
    it is `auto`), for each method.

    `values`: 1 to 256 integers, each from 1 to 2^30 (1073741824), far past any real batch or context.
    """
    if over not in SWEEPS:
        raise MemplanError(f"--over: sweep over seq, batch or num-gpus, got {over!r}")
    most, largest = 256, 1 << 30
    shown = ",".join(str(v) if isinstance(v, int) and abs(v) < 10**30 else "..." for v in values[:8])
    shown += ",..." if len(values) > 8 else ""
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise MemplanError(f"--values: positive integers, got {shown or 'none'}")
    if any(v > largest for v in values):
        raise MemplanError(f"--values: each at most {largest} (2^30), got {shown}")
    if len(set(values)) > most:
        raise MemplanError(f"--values: at most {most} values, got {len(set(values))}")
    if over == "num-gpus" and any(v > 4096 for v in values):
        raise MemplanError(f"--values: --num-gpus is at most 4096, got {shown}")
    g, cap = _capacity(gpu, margin)
    values = sorted(set(values))
    if over == "num-gpus":
        return _gpu_sweep(model, methods, g, cap, values, options)
    columns = [_peaks(model, methods, g, {**options, over: v}) for v in values]
    peak = {e.method.value: [col[i].peak_device_bytes for col in columns] for i, e in enumerate(columns[0])}
    warnings = sorted({w for col in columns for e in col for w in e.warnings})
    return SweepChart(cap, columns[0][0].model, over, values, peak,
                      _subtitle(Config(model=model, **options), skip=over), warnings=warnings)


SWEPT_SHARDINGS = (Sharding.DDP, Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP)


def _gpu_sweep(model: str, methods: list[Method | str], g: hardware.Gpu, cap: Capacity, values: list[int],
               options: dict) -> SweepChart:
    """Per-GPU peak against the number of GPUs: a line per sharding mode (and method, when several); a
    point a mode refuses (ZO with ZeRO offload of parameters, say) is left out (None)."""
    from memplan.api import estimate_config
    from memplan.pipeline import model_of

    if not methods:
        raise MemplanError("--methods: name at least one method, or all")
    asked = Sharding.parse(options.get("sharding", Sharding.AUTO))
    modes = SWEPT_SHARDINGS if asked is Sharding.AUTO else (asked,)
    spec = model_of(model)
    base = {k: v for k, v in options.items() if k not in ("num_gpus", "sharding", "nodes")}
    nodes = options.get("nodes", 1)
    peak: dict[str, list[int | None]] = {}
    warnings: set[str] = set()
    name = model
    for m in methods:
        for mode in modes:
            line = []
            for n in values:
                try:
                    e = estimate_config(Config(model=model, method=m, num_gpus=n, sharding=mode,
                                               nodes=min(nodes, n) if n % min(nodes, n) == 0 else 1, **base),
                                        g, search=False, spec=spec)
                except MemplanError:
                    line.append(None)
                    continue
                name = e.model
                warnings.update(e.warnings)
                line.append(e.peak_device_bytes)
            if any(v is not None for v in line):
                label = mode.value if len(methods) == 1 else f"{Method(m).value} {mode.value}"
                peak[label] = line
    if not peak:
        raise MemplanError("no sharding mode can run these options at any of --values")
    subtitle = f"{Method(methods[0]).value}, " * (len(methods) == 1) + _subtitle(Config(model=model, **base))
    return SweepChart(cap, name, "num-gpus", values, peak, subtitle + ", per GPU", warnings=sorted(warnings))


# ---- drawing ----------------------------------------------------------------------------------


def _capacity_lines(ax, cap: Capacity) -> None:
    ax.axhline(_gib(cap.total_bytes), color="black", linewidth=1.5,
               label=f"{cap.gpu} capacity: {_gib(cap.total_bytes):.1f} GiB")
    if cap.margin_bytes:
        ax.axhline(_gib(cap.budget_bytes), color="black", linewidth=1, linestyle=":",
                   label=f"capacity - {cap.margin} margin: {_gib(cap.budget_bytes):.1f} GiB")


def _draw_grid(fig, c: GridChart) -> None:
    from matplotlib.patches import Patch

    ax = fig.add_subplot()
    for i, row in enumerate(c.peak_bytes):
        for j, n in enumerate(row):
            status = c.status[i][j]
            ax.add_patch(_rect(j, i, STATUS_COLOURS[status]))
            ax.text(j + 0.5, i + 0.5, f"{_gib(n):.1f} GiB", ha="center", va="center", fontsize=9,
                    color="white" if status == NO_FIT else "black")
    ax.set_xlim(0, len(c.methods))
    ax.set_ylim(len(c.models), 0)
    ax.set_xticks([j + 0.5 for j in range(len(c.methods))], c.methods, rotation=30, ha="right")
    ax.set_yticks([i + 0.5 for i in range(len(c.models))], c.models)
    ax.tick_params(length=0)
    ax.set_title(f"Peak device memory (GiB) on {c.capacity.display} ({_gib(c.capacity.total_bytes):.1f} GiB)\n"
                 f"{c.subtitle}", fontsize=11)
    budget = _gib(c.capacity.budget_bytes)
    labels = {FITS: f"fits (<= {budget:.1f} GiB: capacity - {c.capacity.margin} margin)",
              TIGHT: "tight (within the margin)", NO_FIT: f"no fit (> {_gib(c.capacity.total_bytes):.1f} GiB)"}
    ax.legend(handles=[Patch(color=STATUS_COLOURS[s], label=labels[s]) for s in labels],
              loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=9)


def _rect(x: float, y: float, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white", linewidth=2)


def _draw_breakdown(fig, c: BreakdownChart) -> None:
    ax = fig.add_subplot()
    x = range(len(c.methods))
    bottom = [0.0] * len(c.methods)
    for cat, values in c.components.items():
        heights = [_gib(v) for v in values]
        ax.bar(x, heights, bottom=bottom, color=CATEGORY_COLOURS[cat], label=cat, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, n in enumerate(c.peak_bytes):
        ax.text(i, _gib(n), f"{_gib(n):.1f}", ha="center", va="bottom", fontsize=9)
    _capacity_lines(ax, c.capacity)
    ax.set_xticks(list(x), c.methods, rotation=30, ha="right")
    ax.set_ylabel("peak device memory (GiB = 2^30 bytes)")
    ax.set_title(f"{c.model} on {c.capacity.display}: memory at the peak, by category\n{c.subtitle}", fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    n = len(c.components)  # bars first, then the capacity lines; list the stack top-down
    order = list(range(n, len(handles))) + list(range(n - 1, -1, -1))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=9, frameon=False)


def _draw_sweep(fig, c: SweepChart) -> None:
    ax = fig.add_subplot()
    for i, (line, peaks) in enumerate(c.peak_bytes.items()):
        key = line.split()[-1]
        if key in METHOD_COLOURS:
            colour, (marker, dashes) = METHOD_COLOURS[key], METHOD_STYLES[key]
        elif len(line.split()) == 1:
            colour, (marker, dashes) = SHARDING_COLOURS[key], SHARDING_STYLES[key]
        else:  # "method mode": colour by method, marks by mode
            colour, (marker, dashes) = METHOD_COLOURS[line.split()[0]], SHARDING_STYLES[key]
        xs = [v for v, n in zip(c.values, peaks) if n is not None]
        ax.plot(xs, [_gib(n) for n in peaks if n is not None], marker=marker, linestyle=dashes, markersize=5,
                color=colour, label=line)
    _capacity_lines(ax, c.capacity)
    if len(c.values) > 1 and c.values[-1] / c.values[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(c.values, [str(v) for v in c.values])
    ax.minorticks_off()
    ax.set_xlabel({"seq": "sequence length (tokens)", "batch": "batch (sequences)",
                   "num-gpus": "GPUs (data-parallel ranks)"}[c.over])
    per = " per GPU" if c.over == "num-gpus" else ""
    ax.set_ylabel(f"peak device memory{per} (GiB = 2^30 bytes)")
    shown = [n for peaks in c.peak_bytes.values() for n in peaks if n] + [c.capacity.total_bytes]
    if c.over == "num-gpus" and max(shown) > 16 * min(shown):  # per-GPU peaks fall by orders of magnitude
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    else:
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    what = {"seq": "sequence length", "batch": "batch", "num-gpus": "the number of GPUs"}[c.over]
    ax.set_title(f"{c.model} on {c.capacity.display}: peak memory{per} against {what}\n{c.subtitle}", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, frameon=False)


def _size(c: Chart) -> tuple[float, float]:
    if isinstance(c, GridChart):
        return max(6.0, 0.95 * len(c.methods) + 1.5), max(2.8, 0.6 * len(c.models) + 2.0)
    return 10.0, 5.5


def save(chart: Chart, path: str | Path) -> Chart:
    """Draw `chart` to `path` (.png or .svg), atomically; returns the chart (the plotted data)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise MemplanError(f"{path}: charts are written as .png or .svg, got {path.suffix or 'no suffix'!r}")
    import io

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from memplan.files import write_atomic

    rc = {"svg.hashsalt": "memplan", "svg.fonttype": "none", "font.family": "DejaVu Sans", "font.size": 10}
    draw = {GridChart: _draw_grid, BreakdownChart: _draw_breakdown, SweepChart: _draw_sweep}[type(chart)]
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=_size(chart), dpi=DPI)
        FigureCanvasAgg(fig)
        draw(fig, chart)
        buf = io.BytesIO()
        metadata = {"Software": "memplan"} if fmt == "png" else {"Date": None, "Creator": "memplan"}
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata, bbox_inches="tight", facecolor="white")
    try:
        write_atomic(path, buf.getvalue())
    except OSError as e:
        raise MemplanError(f"{path}: cannot write ({e.strerror or e})") from None
    return chart
