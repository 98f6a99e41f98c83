"""Which method should I train with on each GPU? Sweep models x GPUs x methods x schemes through the API.

Rule (a rule of thumb, edit PREFERENCE to taste): take the fastest-converging method that fits.
First-order methods converge in far fewer steps than zeroth-order ones (ZO-Bench, Zhang et al.
2024: ZO needs many more iterations); Adam before SGD for LLM fine-tuning; forward gradients next
(one dual pass, closer to first-order accuracy than ZO-SGD in ZO-Bench); then the ZO variants with
state (Adam, momentum), the conservative one (5 forwards a step), plain ZO-SGD, and ZO-SignSGD.
At equal method, full fine-tuning before LoRA. A run fits when its peak device memory is at most
the GPU's memory minus the margin.

    python examples/sweep_best_method.py --models opt-125m,opt-13b --batch 16 --seq 512 [--json]
"""

from __future__ import annotations

import argparse
import json

from memplan.api import estimate_config
from memplan.errors import MemplanError
from memplan.hardware import catalog, get_gpu
from memplan.margin import Margin
from memplan.options import Config, Method, Scheme
from memplan.spec import resolve

PREFERENCE = [Method.FO_ADAM, Method.FO_SGD, Method.FORWARD_GRAD, Method.ZO_ADAM, Method.ZO_SGD_MMT,
              Method.ZO_SGD_CONS, Method.ZO_SGD, Method.ZO_SGD_SIGN]
SCHEMES = [Scheme.FT, Scheme.LORA]


def best(model: str, gpu, margin: Margin, **options) -> dict | None:
    """The first (method, scheme) in preference order whose peak fits; None when nothing does."""
    spec = resolve(model)
    budget = margin.budget(gpu.total_bytes)
    for method in PREFERENCE:
        for scheme in SCHEMES:
            cfg = Config(model=model, method=method, scheme=scheme, **options)
            est = estimate_config(cfg, gpu, search=False, spec=spec)
            if est.peak_device_bytes <= budget:
                return {"model": est.model, "gpu": gpu.name, "method": method.value, "scheme": scheme.value,
                        "peak_device_bytes": est.peak_device_bytes, "budget_bytes": budget}
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="opt-125m,opt-13b", help="comma-separated models")
    parser.add_argument("--gpus", default="", help="comma-separated GPUs (default: the whole catalog)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--margin", default="5%")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args(argv)
    try:
        gpus = [get_gpu(g) for g in args.gpus.split(",") if g] or sorted(catalog(), key=lambda g: g.total_bytes)
        margin = Margin.parse(args.margin)
        rows = [best(m, g, margin, batch=args.batch, seq=args.seq, dtype=args.dtype) or
                {"model": resolve(m).name, "gpu": g.name, "method": None, "scheme": None}
                for g in gpus for m in args.models.split(",")]
    except (MemplanError, ValueError) as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"best method that fits (batch {args.batch} x seq {args.seq}, {args.dtype}, margin {margin}):")
    for r in rows:
        verdict = (f"{r['method']} ({r['scheme']}): {r['peak_device_bytes'] / 2**30:.1f} GiB"
                   if r["method"] else "nothing fits")
        print(f"  {r['gpu']:>14}  {r['model']:<24} {verdict}")


if __name__ == "__main__":
    main()
