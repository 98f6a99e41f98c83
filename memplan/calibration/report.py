"""The published error: every record's estimates (analytic raw, analytic corrected, trace) against the
measurement, the error per method and tier, the out-of-memory boundary, and a chart.

Views. A CUDA record is compared in the device view (what NVML shows; what the fit verdict uses) and
in the allocated view (`max_memory_allocated`: the tensor model alone). A CPU-meter record has only
the allocated view, and its estimates use a family with no cuBLAS workspace, slack or context,
since the CPU has none of them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from memplan import corrections, hardware
from memplan.errors import MemplanError
from memplan.pipeline import estimate_config
from memplan.result import Estimate, Tier
from memplan.units import MIB, fmt_size
from memplan.options import Config, Method
from memplan.spec import spec_from_config

TIERS = (Tier.ANALYTIC.value, "corrected", Tier.TRACE.value)  # "corrected": analytic with fitted overheads
CPU_FAMILY = hardware.Family(name="cpu", context_bytes=0, cublas_workspace_bytes=0, allocator_slack=0.0,
                             source="CPU live-bytes meter: no cuBLAS workspace, allocator or CUDA context")


@dataclass
class Row:
    """One measured configuration and its estimates; bytes are None where a tier has no number."""

    key: str
    config: Config
    model: str
    status: str  # ok | oom | error | timeout
    meter: str
    view: str  # device | allocated: the view errors are taken in
    family: str
    capacity_bytes: int | None  # the card (or the CPU meter's cap) the OOM boundary is judged against
    measured: dict[str, int | None] = field(default_factory=dict)  # allocated, reserved, device
    results: dict[str, Estimate] = field(default_factory=dict)  # tier -> the pipeline's Estimate
    recorded: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> view -> bytes of a trace record
    error: str = ""

    @property
    def estimates(self) -> dict[str, dict[str, int]]:
        """tier -> view -> bytes, for every tier that has a number."""
        out = {tier: {"allocated": e.peak_allocated_bytes, "reserved": e.peak_reserved_bytes,
                      "device": e.peak_device_bytes} for tier, e in self.results.items()}
        return {**out, **self.recorded}

    def err(self, tier: str, view: str | None = None) -> float | None:
        """(estimate - measured) / measured in a view (default: the row's own)."""
        view = view or self.view
        est = self.estimates.get(tier, {}).get(view)
        meas = self.measured.get(view)
        if self.status != "ok" or est is None or not meas:
            return None
        return (est - meas) / meas


def row_of(rec: dict, fitted: dict, traces: dict[str, dict]) -> Row:
    """Estimates of one measured record: analytic with the catalog's constants, with the fitted
    correction of its family, and the trace record of the same configuration where there is one."""
    cfg = Config(**rec["config"])
    spec = spec_from_config(rec["model_config"], rec.get("model_name") or cfg.model, where=rec.get("model_name", "?"))
    env = rec.get("env") or {}
    cuda = rec.get("meter") == "cuda"
    family = env.get("family") or ("cpu" if not cuda else "default")
    fam = hardware.family(family) if cuda else CPU_FAMILY
    capacity = env.get("gpu_total_bytes") if cuda else (rec.get("settings") or {}).get("cpu_cap_bytes")
    row = Row(key=rec.get("key", ""), config=cfg, model=spec.name, status=rec.get("status", "?"),
              meter=rec.get("meter", "?"), view="device" if cuda else "allocated", family=family,
              capacity_bytes=capacity, error=rec.get("error", ""),
              measured={"allocated": rec.get("peak_allocated_bytes"), "reserved": rec.get("peak_reserved_bytes"),
                        "device": rec.get("peak_device_bytes")})
    # The same pipeline as `memplan fit`, on the record's family: its catalog constants, then its fitted ones.
    row.results[Tier.ANALYTIC.value] = estimate_config(cfg, None, search=False, spec=spec, family=fam)
    correction = fitted.get(family)
    if correction:
        row.results["corrected"] = estimate_config(cfg, None, search=False, spec=spec,
                                                   family=corrections.apply(fam, correction))
    trace = traces.get(rec.get("config_key", ""))
    if trace and trace.get("peak_allocated_bytes"):
        t = {"allocated": trace["peak_allocated_bytes"]}
        if trace.get("peak_device_bytes"):
            t["device"] = trace["peak_device_bytes"]
        row.recorded[Tier.TRACE.value] = t
    return row


def rows(recs: list[dict], fitted: dict) -> list[Row]:
    """Rows of every measured record (the latest per key), in a stable order."""
    traces = {r["config_key"]: r for r in recs if r.get("tier") == "trace" and r.get("config_key")}
    measured = [r for r in recs if r.get("tier", "measured") == "measured" and r.get("config")]
    out = [row_of(r, fitted, traces) for r in measured]
    order = {m.value: i for i, m in enumerate(Method)}  # the order the CLI and tables use
    out.sort(key=lambda r: (r.meter, r.model, order.get(r.config.method.value, 99), r.config.scheme.value,
                            r.config.dtype.value, r.config.attention.value, r.config.batch, r.config.seq, r.key))
    return out


@dataclass(frozen=True)
class ErrorStat:
    meter: str
    method: str
    tier: str
    view: str
    n: int
    median_abs: float
    worst: float  # signed error of the largest magnitude


def error_stats(rs: list[Row]) -> list[ErrorStat]:
    """Median |error| and the worst error per meter, method, tier and view, over the rows that ran."""
    cells: dict[tuple[str, str, str, str], list[float]] = {}
    for r in rs:
        views = ("device", "allocated") if r.view == "device" else ("allocated",)
        for tier in TIERS:
            for view in views:
                e = r.err(tier, view)
                if e is not None:
                    cells.setdefault((r.meter, r.config.method.value, tier, view), []).append(e)
    out = []
    for (meter, method, tier, view), errs in cells.items():
        out.append(ErrorStat(meter, method, tier, view, len(errs), statistics.median(abs(e) for e in errs),
                             max(errs, key=abs)))
    keys = [(r.meter, r.config.method.value) for r in rs]
    out.sort(key=lambda s: (keys.index((s.meter, s.method)), TIERS.index(s.tier), s.view != "device"))
    return out


@dataclass(frozen=True)
class Boundary:
    """Predicted fit against what ran, for the rows with a capacity to judge against."""

    tier: str
    both_fit: list[Row]
    false_fit: list[Row]  # predicted to fit, ran out of memory: the dangerous mistake
    false_no_fit: list[Row]  # predicted not to fit, ran
    both_no_fit: list[Row]


def boundary(rs: list[Row]) -> Boundary:
    tier = "corrected" if any("corrected" in r.estimates for r in rs) else "analytic"
    cells: dict[tuple[bool, bool], list[Row]] = {(a, b): [] for a in (True, False) for b in (True, False)}
    for r in rs:
        if r.status not in ("ok", "oom") or not r.capacity_bytes:
            continue
        est = r.estimates.get(tier) or r.estimates["analytic"]
        predicted = est[r.view] <= r.capacity_bytes
        cells[(predicted, r.status == "ok")].append(r)
    return Boundary(tier, cells[(True, True)], cells[(True, False)], cells[(False, True)], cells[(False, False)])


# ---- rendering ------------------------------------------------------------------------------


_b = fmt_size


def _pct(e: float | None) -> str:
    return "-" if e is None else f"{e * 100:+.1f}%"


def _cfg(r: Row) -> str:
    c = r.config
    return f"{r.model} {c.method.value} {c.scheme.value} {c.dtype.value} b{c.batch} s{c.seq} {c.attention.value}"


def markdown(recs: list[dict], fitted: dict, *, chart: str | None = None, sources: str = "") -> str:
    """REPORT.md: generated, deterministic (no timestamps), every record listed."""
    rs = rows(recs, fitted)
    lines = ["# memplan calibration report", "",
             "Generated by `memplan calibrate report`; do not edit by hand. "
             f"Records: {sources or 'calibration/data/*.jsonl'}.", ""]
    if not rs:
        lines += ["No measured records yet. Run `memplan calibrate --grid calibration/grids/NAME.yaml`, then",
                  "`memplan calibrate fit` and `memplan calibrate report`.", ""]
        return "\n".join(lines)
    lines += ["Error = (estimate - measured) / measured. Tiers: **analytic** (catalog overhead constants), "
              "**corrected** (the fitted correction of the record's GPU family), **trace** (a trace record of the "
              "same configuration, where one exists). CUDA records are judged in the device view (NVML: reserved + "
              "context), which the fit verdict uses, and in the allocated view (`max_memory_allocated`); CPU-meter "
              "records in the allocated view only.", ""]
    envs = sorted({(r.meter, r.family) for r in rs})
    lines += ["## Where", "", "| meter | family | records | ok | out of memory | failed |", "|---|---|---|---|---|---|"]
    for meter, fam in envs:
        sub = [r for r in rs if (r.meter, r.family) == (meter, fam)]
        lines.append(f"| {meter} | {fam} | {len(sub)} | {sum(r.status == 'ok' for r in sub)} | "
                     f"{sum(r.status == 'oom' for r in sub)} | {sum(r.status not in ('ok', 'oom') for r in sub)} |")
    env_lines = sorted({_env_line(rec) for rec in recs if rec.get("tier", "measured") == "measured" and rec.get("env")})
    lines += [""] + [f"- {e}" for e in env_lines] + [""]
    lines += ["## Corrections", ""]
    if fitted:
        lines += ["| family | context | allocator slack | cuBLAS workspace | source |", "|---|---|---|---|---|"]
        for fam, c in sorted(fitted.items()):
            lines.append(f"| {fam} | {_b(c.get('context_bytes'))} | {c.get('allocator_slack', 0):.4f} | "
                         f"{_b(c.get('cublas_workspace_bytes'))} | {c.get('source', '')} |")
    else:
        lines.append("None fitted yet: the corrected tier is empty (run `memplan calibrate fit`).")
    lines += ["", "## Error per method and tier", "",
              "| meter | method | tier | view | n | median abs. error | worst error |", "|---|---|---|---|---|---|---|"]
    for s in error_stats(rs):
        lines.append(f"| {s.meter} | {s.method} | {s.tier} | {s.view} | {s.n} | {s.median_abs * 100:.1f}% | "
                     f"{_pct(s.worst)} |")
    b = boundary(rs)
    judged = len(b.both_fit) + len(b.false_fit) + len(b.false_no_fit) + len(b.both_no_fit)
    lines += ["", "## Out-of-memory boundary", "",
              f"Predicted fit ({b.tier} tier, against the card's total memory, or the CPU meter's cap) against "
              f"what happened, over {judged} configurations:", "",
              "| | ran | ran out of memory |", "|---|---|---|",
              f"| predicted to fit | {len(b.both_fit)} | {len(b.false_fit)} |",
              f"| predicted not to fit | {len(b.false_no_fit)} | {len(b.both_no_fit)} |", ""]
    for title, bad in (("Predicted to fit but ran out of memory", b.false_fit),
                       ("Predicted not to fit but ran", b.false_no_fit)):
        if bad:
            lines.append(f"{title}:")
            for r in bad:
                est = (r.estimates.get(b.tier) or r.estimates["analytic"])[r.view]
                lines.append(f"- {_cfg(r)}: estimate {_b(est)} vs capacity {_b(r.capacity_bytes)}")
            lines.append("")
    lines += ["## Every record", "",
              "| configuration | status | view | measured | analytic | err | corrected | err | trace | err | "
              "measured allocated | analytic allocated | err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        v = r.view
        cells = [_cfg(r), r.status if r.status == "ok" else f"**{r.status}**", v, _b(r.measured.get(v))]
        for tier in TIERS:
            cells += [_b(r.estimates.get(tier, {}).get(v)), _pct(r.err(tier))]
        cells += [_b(r.measured.get("allocated")), _b(r.estimates["analytic"]["allocated"]),
                  _pct(r.err("analytic", "allocated"))]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rs if r.status not in ("ok", "oom")]
    if failed:
        lines += ["", "## Not measured", ""]
        lines += [f"- {_cfg(r)}: {r.status}: {r.error}" for r in failed]
    if chart:
        lines += ["", "## Estimate against measurement", "", f"![estimate against measurement]({chart})"]
    return "\n".join(lines) + "\n"


def _env_line(rec: dict) -> str:
    e = rec["env"]
    if e.get("device") != "cuda":
        return f"CPU meter: torch {e.get('torch')}, transformers {e.get('transformers')}, peft {e.get('peft')}"
    alloc = ", ".join(f"{k}={v}" for k, v in sorted((e.get("alloc_env") or {}).items())) or "allocator defaults"
    return (f"{e.get('gpu')} ({_b(e.get('gpu_total_bytes'))}), driver {e.get('driver')}, CUDA {e.get('cuda')}, "
            f"torch {e.get('torch')}, transformers {e.get('transformers')}, peft {e.get('peft')}; {alloc}")


def chart(recs: list[dict], fitted: dict, path: str | Path) -> Path:
    """estimate-vs-measured.png: every tier's estimate against the measurement, log-log, with y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rs = [r for r in rows(recs, fitted) if r.status == "ok" and r.measured.get(r.view)]
    if not rs:
        raise MemplanError("no measured record ran to completion: nothing to chart")
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    style = {"analytic": ("o", "tab:blue"), "corrected": ("s", "tab:green"), "trace": ("^", "tab:orange")}
    lo, hi = float("inf"), 0.0
    for tier in TIERS:
        pts = [(r.measured[r.view] / MIB, r.estimates[tier][r.view] / MIB) for r in rs
               if r.estimates.get(tier, {}).get(r.view)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
        marker, color = style[tier]
        ax.scatter(xs, ys, marker=marker, color=color, label=f"{tier} ({len(pts)})", alpha=0.75, s=28)
    ax.plot([lo * 0.8, hi * 1.25], [lo * 0.8, hi * 1.25], color="gray", linewidth=1, linestyle="--", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel("measured peak (MiB; device view on CUDA, allocated on the CPU meter)")
    ax.set_ylabel("estimated peak (MiB)")
    ax.set_title("memplan: estimate against measurement")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    import io

    from memplan.files import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return Path(path)
