"""Apply adapters to a base model in plain PyTorch or through stock PEFT, for reference logits.

Importable by any test: ``from reference import ...`` (tests/ is on sys.path under pytest's
importlib mode through ``conftest``) or ``tests.reference``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    return model.eval()


def probe_ids(fixtures_dir: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(fixtures_dir) / "probe.safetensors"))["input_ids"]


def reference_logits(adapter_fixture: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, logits)`` the adapter's own code computed (fixture file)."""
    from safetensors.torch import load_file

    t = load_file(str(Path(adapter_fixture) / "reference_logits.safetensors"))
    return t["input_ids"], t["logits"]


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def read_peft_lora(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """``(config, {module: (A, B, scale)})`` of a plain PEFT LoRA directory, scales by PEFT's
    rules (rank/alpha patterns, rsLoRA)."""
    import math
    import re

    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))

    def pattern(p, name):
        for k, v in (p or {}).items():
            if re.match(rf"(.*\.)?({k})$", name):
                return v
        return None

    out = {}
    for key in t:
        if not key.endswith(".lora_A.weight"):
            continue
        m = key[len("base_model.model."): -len(".lora_A.weight")]
        A, B = t[key], t[key.replace(".lora_A.", ".lora_B.")]
        r = pattern(cfg.get("rank_pattern"), m) or cfg["r"]
        alpha = pattern(cfg.get("alpha_pattern"), m) or cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[m] = (A, B, scale)
    return cfg, out


@torch.no_grad()
def merge_plain(model, adapter_dir: str | Path):
    """``W += scale · B @ A`` for every module of a PEFT LoRA directory (in place)."""
    _, mods = read_peft_lora(adapter_dir)
    named = dict(model.named_modules())
    for m, (A, B, scale) in mods.items():
        lin = named[m]
        lin.weight += (scale * (B.double() @ A.double())).to(lin.weight.dtype)
    return model


def peft_model(base_dir: str | Path, adapter_dir: str | Path):
    """Stock PEFT: ``PeftModel.from_pretrained`` on transformers' LlamaForCausalLM."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir)).eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
