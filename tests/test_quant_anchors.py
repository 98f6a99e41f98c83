"""--quant against the published single-GPU QLoRA rows of the shared recipes (anchors/recipes.json).

Expressible: unsloth's README 'Llama 3.1 (8B) max. context length', column 'Hugging Face + FA2'
(q-36, q-37, q-38): QLoRA 4-bit r32 on q, k, v, o, gate, up, down, batch 1, the longest padded
sequence that trained on a 24 / 48 / 80 GB card. Conditions memplan assumes where the row is silent:
nf4 (bitsandbytes' and transformers' default 4-bit type), fo-adam, pure bf16 (--dtype bf16),
gradient checkpointing on, sdpa (FA2 keeps no seq^2 tensor either). Measure: a fit boundary, not a
peak; memplan's largest fitting seq is compared. Tolerance: -20 % / +35 %: memplan's boundary is
27-31 % longer on all three cards (rows are 'soft': optimizer, autocast and checkpointing unstated;
an 8-bit optimizer or an autocast run would move it).

Not expressible, and why:
- q-01, q-03, q-04, q-05 (torchtune): torchao's NF4 tensor, not bitsandbytes; q-03 to q-05 also use
  torch.compile, packing, chunked loss or activation offloading.
- q-10, q-11, q-13, q-14, q-19 to q-24 (litgpt): litgpt's own model with bitsandbytes layers, which
  keeps embeddings, norms and the head in bf16 (no prepare_model_for_kbit_training) and uses a paged
  optimizer; Alpaca's variable lengths. q-15 to q-18 are inference (weights plus a KV cache).
- q-29: GPTQ weights (auto-gptq), not bitsandbytes.
- q-30 to q-35 (LLaMA-Factory): measure unstated, whole GB, gradient accumulation and checkpointing
  unstated.
- q-39: a 70B boundary on an 80 GB card with the same unstated conditions; the 8B rows cover it.
- Multi-GPU QLoRA rows (FSDP, ZeRO-3): sharding is not modelled yet.
"""

from __future__ import annotations

import pytest

from memplan.api import estimate

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOW, HIGH = 0.80, 1.35


@pytest.mark.parametrize("row,gpu,published_seq", [
    ("q-36", "rtx-4090", 5789),   # 24 GB card
    ("q-37", "rtx-a6000", 15502),  # 48 GB card
    ("q-38", "a100-80gb", 28454),  # 80 GB card
])
def test_unsloth_hf_fa2_context_boundary(row, gpu, published_seq):
    est = estimate("llama-3.1-8b", "fo-adam", gpu=gpu, scheme="lora", quant="nf4", dtype="bf16", batch=1,
                   seq=1024, lora_rank=32, lora_targets=TARGETS, grad_checkpointing=True, attention="sdpa")
    assert LOW * published_seq <= est.max_seq <= HIGH * published_seq, (row, est.max_seq)
