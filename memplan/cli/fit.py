"""`memplan fit MODEL`: will it fit? Analytic estimates, one row per method."""

from __future__ import annotations

from typing import Optional

import typer

from memplan.cli._common import guarded


def methods_from(names: list[str] | None) -> list:
    """`--method` values (repeatable, comma-separated, or `all`) as Method members."""
    from memplan.options import Method

    if not names:
        return [Method.ZO_SGD]
    out = []
    for chunk in names:
        for name in filter(None, (n.strip() for n in chunk.split(","))):
            out.extend(Method) if name.lower() == "all" else out.append(Method.parse(name))
    return list(dict.fromkeys(out))


def config_options(model, scheme, dtype, batch, seq, attention, lora_rank, prefix_tokens, prompt_tokens,
                   grad_checkpointing, perturbation="mezo", zo_queries=1, hf_version="current",
                   use_cache=False, lora_alpha=16, lora_targets=None) -> dict:
    """The shared options of `fit` and `trace` as Config fields (validated by Config)."""
    from memplan.errors import MemplanError

    for flag, value in (("--batch", batch), ("--seq", seq), ("--lora-rank", lora_rank),
                        ("--prefix-tokens", prefix_tokens), ("--prompt-tokens", prompt_tokens),
                        ("--zo-queries", zo_queries)):
        if value < 1:
            raise MemplanError(f"{flag} must be a positive integer, got {value}")
    opts = dict(model=model, scheme=scheme, dtype=dtype, batch=batch, seq=seq, attention=attention,
                lora_rank=lora_rank, lora_alpha=lora_alpha, prefix_tokens=prefix_tokens,
                prompt_tokens=prompt_tokens, grad_checkpointing=grad_checkpointing, perturbation=perturbation,
                zo_queries=zo_queries, hf_version=hf_version, use_cache=use_cache)
    if lora_targets:
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        if not targets:
            raise MemplanError("--lora-targets needs module names, e.g. q_proj,v_proj")
        opts["lora_targets"] = targets
    return opts


def estimates_command(tier: str):
    """The `fit` (analytic) or `trace` command: the same options, the same table and JSON."""

    @guarded
    def command(
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
        lora_targets: Optional[str] = typer.Option(None, help="LoRA target modules, comma-separated "
                                                   "(default: peft's for the architecture, e.g. q_proj,v_proj)."),
        prefix_tokens: int = typer.Option(5, help="Prefix-tuning tokens."),
        prompt_tokens: int = typer.Option(10, help="Prompt-tuning virtual tokens."),
        grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute layers (FO)."),
        perturbation: str = typer.Option("mezo", help="ZO perturbation: mezo (out of place) | inplace"),
        zo_queries: int = typer.Option(1, help="ZO queries per step."),
        hf_version: str = typer.Option("current", help="transformers behaviour: current | 4.28 (MeZO / ZO-Bench)"),
        use_cache: bool = typer.Option(False, "--use-cache", help="Keep the KV cache in forward passes."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        from memplan.api import resolve_gpu
        from memplan.cli.render import exit_code, render
        from memplan.options import Config

        opts = config_options(model, scheme, dtype, batch, seq, attention, lora_rank, prefix_tokens, prompt_tokens,
                              grad_checkpointing, perturbation, zo_queries, hf_version, use_cache, lora_alpha,
                              lora_targets)
        the_gpu = resolve_gpu(gpu)
        configs = [Config(method=m, **opts) for m in methods_from(method)]
        run = _traced if tier == "trace" else _analytic
        estimates, notes = run(configs, the_gpu, as_json)
        render(estimates, as_json=as_json, notes=notes)
        raise typer.Exit(exit_code(estimates))

    command.__doc__ = {
        "analytic": "Peak GPU memory of each method, its parts, and whether it fits.",
        "trace": "Trace one training step on fake tensors: exact tensor bytes per category and phase, no GPU.",
    }[tier]
    return command


def _analytic(configs: list, gpu, as_json: bool) -> tuple[list, list[str]]:
    """Analytic estimates, and what would make each non-fitting one fit."""
    from memplan.api import estimate_config
    from memplan.spec import resolve
    from memplan.suggest import suggestions

    spec = resolve(configs[0].model)
    estimates = [estimate_config(c, gpu, spec=spec) for c in configs]
    return estimates, [line for e in estimates if e.fits is False for line in suggestions(e, spec, gpu)]


def _traced(configs: list, gpu, as_json: bool) -> tuple[list, list[str]]:
    """Trace estimates, with a live status line on a terminal."""
    import sys

    from memplan.errors import MemplanError
    from memplan.options import HfVersion
    from memplan.tracing import trace

    if configs[0].hf_version is not HfVersion.CURRENT:
        raise MemplanError("--hf-version: the trace runs the installed transformers; only 'current' applies")
    if as_json or not sys.stderr.isatty():
        return [trace(c, gpu=gpu) for c in configs], []
    from rich.console import Console

    out = []
    for c in configs:
        with Console(stderr=True).status(f"tracing {c.method.value}") as status:
            out.append(trace(c, gpu=gpu, on_phase=lambda label, ph, m=c.method.value: status.update(
                f"tracing {m}: {label} step, {ph.value}")))
    return out, []


fit = estimates_command("analytic")


def register(app: typer.Typer) -> None:
    app.command("fit")(fit)
