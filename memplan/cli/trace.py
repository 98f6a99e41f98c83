"""`memplan trace MODEL`: run the real step on fake tensors; exact tensor bytes, same output as `fit`."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from memplan.cli._common import guarded


@guarded
def trace(
    model: str = typer.Argument(..., help="Catalog id or alias (opt-13b), config.json, or a folder with one."),
    method: Optional[list[str]] = typer.Option(None, "--method", "-m", help="Method (repeatable) or 'all'."),
    scheme: str = typer.Option("ft", help="ft | lora | prefix | prompt"),
    dtype: str = typer.Option("fp16", help="fp32 | fp16 | bf16 | amp-fp16 | amp-bf16"),
    batch: int = typer.Option(1, help="Sequences per step."),
    seq: int = typer.Option(512, help="Tokens per sequence."),
    attention: str = typer.Option("sdpa", help="eager | sdpa"),
    gpu: Optional[str] = typer.Option(None, help="GPU name (memplan gpus) or 'auto'; default: local GPU if any."),
    lora_rank: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha (does not change memory)."),
    lora_targets: Optional[str] = typer.Option(None, help="LoRA target modules, comma-separated."),
    prefix_tokens: int = typer.Option(5, help="Prefix-tuning tokens."),
    prompt_tokens: int = typer.Option(10, help="Prompt-tuning virtual tokens."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute layers (FO)."),
    perturbation: str = typer.Option("mezo", help="ZO perturbation: mezo (out of place) | inplace"),
    zo_queries: int = typer.Option(1, help="ZO queries per step."),
    use_cache: bool = typer.Option(False, "--use-cache", help="Keep the KV cache in forward passes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Trace one training step on fake tensors: exact bytes per category and phase, no GPU needed."""
    from memplan.api import judge, resolve_gpu
    from memplan.cli.fit import config_options, methods_from
    from memplan.cli.render import exit_code, render
    from memplan.options import Config
    from memplan.tracing import trace as run_trace

    opts = config_options(model, scheme, dtype, batch, seq, attention, lora_rank, prefix_tokens, prompt_tokens,
                          grad_checkpointing, perturbation, zo_queries, "current", use_cache, lora_alpha,
                          lora_targets)
    the_gpu = resolve_gpu(gpu)
    show = not as_json and sys.stderr.isatty()
    estimates = [_one(run_trace, Config(method=m, **opts), the_gpu, show) for m in methods_from(method)]
    for est in estimates:
        if the_gpu is not None:
            judge(est, the_gpu)
    render(estimates, as_json=as_json)
    raise typer.Exit(exit_code(estimates))


def _one(run_trace, config, gpu, show: bool):
    """Trace one configuration, with a live status line on a terminal."""
    if not show:
        return run_trace(config, gpu=gpu)
    from rich.console import Console

    with Console(stderr=True).status(f"tracing {config.method.value}") as status:
        return run_trace(config, gpu=gpu, on_phase=lambda label, ph: status.update(
            f"tracing {config.method.value}: {label} step, {ph.value}"))


def register(app: typer.Typer) -> None:
    app.command("trace")(trace)
