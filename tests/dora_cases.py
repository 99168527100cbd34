"""PEFT DoRA adapters for the serving tests, and PEFT's own forward as their reference."""

from __future__ import annotations

import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_dora(base_dir, out: Path, seed: int = 0, r: int = 8, alpha: float = 16,
                   targets=TARGETS, use_rslora: bool = False) -> Path:
    """A DoRA adapter saved by stock PEFT (``use_dora=True``), with ``B`` and the magnitudes moved
    away from their init so that both change the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=use_rslora,
                                          target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(out))
    return Path(out)


@lru_cache(maxsize=None)
def _peft_model(base_dir: str, adapter_dir: str):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()


@lru_cache(maxsize=None)
def peft_run(base_dir: str, adapter_dir: str, prompt: tuple[int, ...], max_tokens: int) -> dict:
    """Greedy tokens, their logprobs and the prompt's logprobs by stock PEFT's forward (fp32),
    in the shape ``reference.reference_run`` returns."""
    model = _peft_model(base_dir, adapter_dir)

    @torch.no_grad()
    def logprobs(ids):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)

    ids = list(prompt)
    lp = logprobs(ids)
    out = {"prompt_logprobs": [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))],
           "tokens": [], "logprobs": []}
    for _ in range(max_tokens):
        last = logprobs(ids)[-1]
        nxt = int(torch.argmax(last))
        out["tokens"].append(nxt)
        out["logprobs"].append(float(last[nxt]))
        ids.append(nxt)
    return out


def moves_beyond_lora(base_dir, adapter_dir, prompt, max_tokens: int) -> float:
    """How far PEFT's DoRA output is from the same ``s B A`` served as a plain LoRA (largest prompt
    logprob change): a server that ignored the magnitudes would be off by this much."""
    import json
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(adapter_dir, d / "lora")
        cfg_path = d / "lora" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["use_dora"] = False
        cfg_path.write_text(json.dumps(cfg))
        from safetensors.torch import load_file, save_file

        t = load_file(str(d / "lora" / "adapter_model.safetensors"))
        save_file({k: v for k, v in t.items() if "magnitude" not in k}, str(d / "lora" / "adapter_model.safetensors"))
        a = peft_run(str(base_dir), str(adapter_dir), tuple(prompt), max_tokens)
        b = peft_run(str(base_dir), str(d / "lora"), tuple(prompt), max_tokens)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return max(abs(x - y) for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:]))


def train_dora(base_dir, out: Path) -> Path:
    """``nora-train --method dora``: saves a stock PEFT DoRA directory."""
    import json

    from nora_serve.tiny import WORDS

    data = out.parent / "dora_train.jsonl"
    with data.open("w") as fh:
        for i in range(16):
            fh.write(json.dumps({"prompt": f"{WORDS[i % len(WORDS)]} ", "completion": WORDS[(3 * i) % len(WORDS)]}) + "\n")
    exe = Path(sys.executable).parent / "nora-train"
    subprocess.run([str(exe), "--base", str(base_dir), "--data", str(data), "--method", "dora", "--rank", "4",
                    "--lora-alpha", "8", "--max-steps", "12", "--lr", "2e-2", "--out", str(out), "--quiet"],
                   check=True, capture_output=True, text=True, timeout=600)
    return out
