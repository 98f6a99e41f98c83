"""The analytic estimator against published single-GPU recipe measurements (../shared/anchors/recipes.json).

The rows memplan can express: litgpt's LoRA tables (`finetune/lora.py`, bf16-true, AdamW, no
activation checkpointing on one GPU, LoRA on query and value with dropout 0.05, SDPA), whose peak
is `torch.cuda.max_memory_allocated()` / 1e9 at the longest sample (Alpaca's 1304 tokens for
Llama 2, the 512-token cap for Alpaca2k). litgpt runs its own GPT and LoRA code, not transformers'
and peft's, so the tolerance is 5 % on Llama-2 / Llama-3.1 / Mistral (all within 1.5 % today) and
10 % on the Llama-3.2 rows (tied 128k embeddings), which memplan places 6 % and 9 % low for
reasons not yet found. calibration/RECIPE-ANCHORS.md lists every single-GPU row and why the others
cannot be expressed (torch.compile, quantised weights, a 32-bit paged optimizer, unknown lengths).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.api import estimate

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parents[1] / "shared" / "anchors" / "recipes.json"
if not ANCHORS.is_file():  # the rows used here, kept with the tests for clones without ../shared
    ANCHORS = HERE / "data" / "anchors-recipes.json"
CASES = {c["id"]: c for c in json.loads(ANCHORS.read_text())["cases"]}
MODELS = HERE / "data" / "models"  # configs the catalog lacks

# id: (model, LoRA rank, batch, longest sequence, tolerance)
ROWS = {
    "q-09": ("llama-2-7b", 8, 1, 1304, 0.05),
    "q-12": ("llama-2-13b", 8, 1, 1304, 0.05),
    "ma-17": ("llama-3.1-8b", 32, 1, 512, 0.05),
    "ma-22": ("mistralai/Mistral-7B-v0.1", 32, 2, 512, 0.05),
    "ma-18": (str(MODELS / "llama-3.2-3b.json"), 32, 1, 512, 0.10),
    "ma-19": (str(MODELS / "llama-3.2-1b.json"), 32, 1, 512, 0.10),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_litgpt_lora_single_gpu(row):
    case = CASES[row]
    assert case["gpus"] == 1 and case["unit"] == "GB" and "max_memory_allocated" in case["measure"]
    model, rank, batch, seq, tolerance = ROWS[row]
    est = estimate(model, "fo-adam", scheme="lora", lora_rank=rank, lora_targets=("q_proj", "v_proj"),
                   lora_dropout=0.05, dtype="bf16", attention="sdpa", batch=batch, seq=seq, search=False)
    assert est.peak_allocated_bytes / 1e9 == pytest.approx(case["value"], rel=tolerance)
