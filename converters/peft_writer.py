"""Write folded factors as a stock PEFT LoRA directory that vLLM 0.32 loads with --enable-lora.

Every module's real scale is already folded into its factors, so the config makes the scale
exactly 1 for both PEFT and vLLM (``vllm/lora/peft_helper.py``): ``lora_alpha = r`` and, per
module, ``rank_pattern[m] = alpha_pattern[m] = rank(m)``, so ``alpha / r = 1`` everywhere;
``use_rslora`` is false (``alpha / sqrt(r)`` would not be 1). Only ``lora_A`` / ``lora_B``
tensors, safetensors only. The source's provenance goes to a separate ``nora_convert.json``,
which neither PEFT nor vLLM reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "nora_convert.json"


def peft_config(ranks: dict[str, int], *, base_model_name_or_path: str | None,
                task_type: str | None = "CAUSAL_LM") -> dict:
    """``ranks``: ``{full module name: rank > 0}``."""
    r = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: int(k) for m, k in sorted(ranks.items())},
        "alpha_pattern": {m: int(k) for m, k in sorted(ranks.items())},
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def write_peft_lora(tmp: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                    base_model_name_or_path: str | None, metadata: dict,
                    task_type: str | None = "CAUSAL_LM") -> dict:
    """Write into the (temporary) directory ``tmp``; ``factors``: ``{module: (B [d_out, k],
    A [k, d_in])}`` with ``k > 0``. Returns the config written."""
    from safetensors.torch import save_file

    ranks = {m: int(A.shape[0]) for m, (B, A) in factors.items()}
    cfg = peft_config(ranks, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    flat: dict[str, torch.Tensor] = {}
    for m, (B, A) in sorted(factors.items()):
        flat[f"{PEFT_PREFIX}{m}.lora_A.weight"] = A.contiguous()
        flat[f"{PEFT_PREFIX}{m}.lora_B.weight"] = B.contiguous()
    save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / META_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    return cfg
