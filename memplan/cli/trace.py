"""`memplan trace MODEL`: run the real step on fake tensors; exact tensor bytes, same output as `fit`."""

from __future__ import annotations

import sys

import typer

from memplan.cli._common import console, guarded, print_json
from memplan.errors import MemplanError
from memplan.options import Config, Method


def register(app: typer.Typer) -> None:
    app.command("trace", help="Trace one training step on fake tensors: exact bytes per category and phase.")(trace)


def _methods(names: list[str]) -> list[Method]:
    if not names:
        return [Method.ZO_SGD]
    if any(n.strip().lower() == "all" for n in names):
        return list(Method)
    return [Method.parse(n) for n in names]


def _gpu(name: str | None):
    from memplan import hardware

    if name:
        return hardware.get_gpu(name)
    found = hardware.detect()
    return found[0] if found else None


@guarded
def trace(
    model: str = typer.Argument(..., help="Catalog id, alias, or path to a config.json / folder holding one."),
    method: list[str] = typer.Option([], "--method", "-m", help="Method (repeatable), or 'all'."),
    scheme: str = typer.Option("ft", help="ft | lora | prefix | prompt."),
    dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | amp-fp16 | amp-bf16."),
    batch: int = typer.Option(1, help="Sequences per step."),
    seq: int = typer.Option(512, help="Tokens per sequence."),
    attention: str = typer.Option("sdpa", help="eager | sdpa."),
    gpu: str | None = typer.Option(None, help="GPU name from `memplan gpus`, or 'auto'."),
    lora_rank: int = typer.Option(8, help="LoRA rank r."),
    prefix_tokens: int = typer.Option(5, help="Prefix-tuning tokens per layer."),
    prompt_tokens: int = typer.Option(10, help="Prompt-tuning virtual tokens."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute layers in backward (FO)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> int:
    from pydantic import ValidationError

    from memplan.tracing import trace as run_trace

    target = _gpu(gpu)
    try:
        configs = [Config(model=model, method=m, scheme=scheme, dtype=dtype, batch=batch, seq=seq,
                          attention=attention, lora_rank=lora_rank, lora_targets=(), prefix_tokens=prefix_tokens,
                          prompt_tokens=prompt_tokens, grad_checkpointing=grad_checkpointing)
                   for m in _methods(method)]
    except ValidationError as e:
        err = e.errors()[0]
        raise MemplanError(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}") from None
    show = not as_json and sys.stderr.isatty()
    estimates = [_one(run_trace, c, target, show) for c in configs]
    if as_json:
        print_json({"estimates": [e.to_json_dict() for e in estimates]})
    else:
        _table(estimates)
    if any(e.fits is False for e in estimates):
        raise typer.Exit(1)
    return 0


def _one(run_trace, config: Config, target, show: bool):
    if not show:
        return run_trace(config, gpu=target)
    from rich.console import Console

    with Console(stderr=True).status(f"tracing {config.method.value}") as status:
        return run_trace(config, gpu=target,
                         on_phase=lambda label, ph: status.update(f"tracing {config.method.value}: {label} step, {ph.value}"))


def _table(estimates) -> None:
    """One column per method, one row per category (GiB), then the three views and the verdict."""
    from rich.table import Table

    from memplan.result import Category, gib

    e0 = estimates[0]
    table = Table(title=f"{e0.model} {e0.scheme.value} {e0.dtype.value} {e0.attention.value} "
                        f"batch {e0.batch} x seq {e0.seq} (trace, GiB)")
    table.add_column("")
    for e in estimates:
        table.add_column(e.method.value, justify="right")
    table.add_row("peak phase", *[e.peak_phase.value for e in estimates])
    for c in Category:
        if any(e.components.get(c) for e in estimates):
            table.add_row(c.value, *[f"{gib(e.components.get(c, 0)):.2f}" for e in estimates])
    for label, key in (("allocated", "peak_allocated_bytes"), ("reserved", "peak_reserved_bytes"),
                       ("device", "peak_device_bytes")):
        table.add_row(label, *[f"{gib(getattr(e, key)):.2f}" for e in estimates])
    if any(e.gpu for e in estimates):
        table.add_row(f"fits {e0.gpu.name}", *["yes" if e.fits else "NO" for e in estimates])
    out = console()
    out.print(table)
    for e in estimates:
        for w in e.warnings:
            out.print(f"warning: {e.method.value}: {w}")
