"""Write folded factors as a stock PEFT LoRA directory that vLLM 0.32 loads with --enable-lora.

Every module's real scale is already folded into its factors, so the config makes the scale
exactly 1 for both PEFT and vLLM (``vllm/lora/peft_helper.py``): ``lora_alpha = r`` and, per
module, ``rank_pattern[m] = alpha_pattern[m] = rank(m)``, so ``alpha / r = 1`` everywhere;
``use_rslora`` is false (``alpha / sqrt(r)`` would not be 1). Only ``lora_A`` / ``lora_B``
tensors, safetensors only. The source's provenance goes to a separate ``nora_convert.json``,
which neither PEFT nor vLLM reads, and a short model card ``README.md`` (YAML front matter with
``library_name: peft`` and ``base_model``, as PEFT's ``save_pretrained`` writes) sums it up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "nora_convert.json"
CARD_NAME = "README.md"


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


def write_peft_weights(tmp: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                       base_model_name_or_path: str | None, task_type: str | None = "CAUSAL_LM") -> dict:
    """The weights and ``adapter_config.json`` of a stock PEFT LoRA, into the directory ``tmp``;
    ``factors``: ``{module: (B [d_out, k], A [k, d_in])}`` with ``k > 0``, scale folded in.
    Returns the config written."""
    from safetensors.torch import save_file

    ranks = {m: int(A.shape[0]) for m, (B, A) in factors.items()}
    cfg = peft_config(ranks, base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    flat: dict[str, torch.Tensor] = {}
    for m, (B, A) in sorted(factors.items()):
        flat[f"{PEFT_PREFIX}{m}.lora_A.weight"] = A.contiguous()
        flat[f"{PEFT_PREFIX}{m}.lora_B.weight"] = B.contiguous()
    save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def write_peft_lora(tmp: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                    base_model_name_or_path: str | None, metadata: dict,
                    task_type: str | None = "CAUSAL_LM") -> dict:
    """:func:`write_peft_weights`, plus ``nora_convert.json`` (``metadata``) and the model card.
    Returns the config written."""
    cfg = write_peft_weights(tmp, factors, base_model_name_or_path=base_model_name_or_path,
                             task_type=task_type)
    (tmp / META_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    (tmp / CARD_NAME).write_text(model_card(cfg, metadata))
    return cfg


def base_identity(metadata: dict) -> str | None:
    """One fingerprint for the base weights the adapter was checked against or made for
    (over the per-module fingerprints), or None when none are recorded."""
    fps = metadata.get("base_fingerprints")
    if not fps:
        return None
    h = hashlib.sha256()
    for m in sorted(fps):
        h.update(f"{m}={fps[m]}\n".encode())
    return "sha256:" + h.hexdigest()[:32]


def _identity_rows(metadata: dict) -> list[tuple[str, str]]:
    """Where the base name came from (when not simply the source's) and what was checked."""
    ident = metadata.get("base_identity") or {}
    rows = []
    how = {"explicit": "set explicitly (--base-model-name-or-path)",
           "--base": "from --base (the source names none)"}.get(ident.get("set_by"))
    if how:
        src = ident.get("source")
        rows.append(("base model set", how + (f"; the source names `{src}`" if src else "")))
    scope = (metadata.get("base_check") or {}).get("scope")
    if scope:
        rows.append(("base check", scope.removeprefix("base check: ")))
    return rows


def _yaml_str(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid double-quoted YAML scalar


def model_card(cfg: dict, metadata: dict) -> str:
    """A short ``README.md`` for a converted adapter: what it was, what it is, what it is for."""
    from nora_serve import __version__

    base = metadata.get("base_model_name_or_path")
    method = metadata.get("method") or "unknown"
    fmt = metadata.get("source_format") or "unknown"
    mods = metadata.get("modules") or {}
    ranks = sorted(int(v["rank"]) for v in mods.values() if int(v["rank"]) > 0) or sorted(cfg["rank_pattern"].values())
    zero = sum(1 for v in mods.values() if int(v["rank"]) == 0)
    ident = base_identity(metadata)
    shared = (metadata.get("shared_basis") or {}).get("fingerprint")
    verify = metadata.get("verify_max_rel_error")

    front = ["---", "library_name: peft"]
    if base:
        front.append(f"base_model: {_yaml_str(str(base))}")
    front += ["tags:", "- lora", "- nora-serve", f"- {_yaml_str(method)}", "---", ""]
    rows = [
        ("source method", f"`{method}`"),
        ("source format", f"`{fmt}`"),
        ("base model", f"`{base}`" if base else "not recorded"),
        *_identity_rows(metadata),
        ("base weights fingerprint", f"`{ident}` (over {len(metadata['base_fingerprints'])} modules)"
         if ident else "not recorded"),
        ("modules", f"{len(ranks)} folded" + (f", {zero} exactly zero (left out)" if zero else "")),
        ("folded rank", f"min {ranks[0]}, max {ranks[-1]} (PEFT `r` = {cfg['r']}, per module in "
                        "`rank_pattern`)"),
        ("max truncation error", f"{float(metadata.get('max_rel_error') or 0.0):.3e} (relative "
                                 "Frobenius error of the fold, worst module)"),
        ("dtype", f"`{metadata.get('dtype')}`"),
    ]
    if shared:
        rows.append(("shared basis fingerprint", f"`{shared}`"))
    if verify is not None:
        rows.append(("verify", f"worst relative error {float(verify):.3e} against the source "
                               "method's forward"))
    body = [
        "# LoRA adapter converted by nora-convert",
        "",
        f"A `{method}` adapter (`{fmt}` format) folded exactly into stock PEFT LoRA by "
        f"nora-serve {__version__}: each module's delta at its minimal rank, scale 1 "
        "(`lora_alpha` = `r` per module). Details per module: `nora_convert.json`.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, ADAPTER_DIR)",
        "```",
        "",
        "vLLM: `vllm serve BASE --enable-lora --max-lora-rank "
        f"{_lora_rank_bucket(ranks[-1])} --lora-modules NAME=ADAPTER_DIR`",
        "",
    ]
    return "\n".join(front + body)


def _lora_rank_bucket(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM 0.32 allows (``MaxLoRARanks``) that holds rank ``r``."""
    for b in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r <= b:
            return b
    return r
