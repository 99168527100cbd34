"""Official SLoRA / NLoRA / IntTune adapters: PEFT's LoRA layout plus ``lora_N`` per module.

IntTune saves like NLoRA; only the base tells them apart (see :func:`_is_inttune`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter_deltas import AdapterDeltas
from .peft_layout import _peft_weights_file, _weight_keys
from .read_peft import _read_lora_layout


def _is_three_matrix(path: Path, cfg: dict) -> bool:
    """A ``peft_type: LORA`` directory with a three-matrix init or any ``lora_N`` tensor."""
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in ("n_lora", "s_lora"):
        return True
    keys = _weight_keys(_peft_weights_file(path))
    return any(".lora_N." in k or k.endswith(".lora_N") for k in keys)


def _read_three_matrix(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg, entries, dtype = _read_lora_layout(path, three=True)
    init = cfg.get("init_lora_weights")
    method = "slora" if str(init).lower() == "s_lora" else "nlora"
    d = AdapterDeltas(path, "three_matrix", method, entries,
                      base_model_name_or_path=cfg.get("base_model_name_or_path"),
                      dtype=dtype, config=cfg)
    if method == "nlora" and base is not None and _is_inttune(d, base):
        d.method = "inttune"
    return d


def _is_inttune(d: AdapterDeltas, base: Path) -> bool:
    """IntTune keeps NLoRA's init ``A = W0[:r]``, ``B = W0[:, :r]`` frozen."""
    from .fingerprint import load_base_weights

    try:
        W = load_base_weights(base, list(d.entries))
    except KeyError:
        return False
    for m, e in d.entries.items():
        A, B = e.raw["lora_A"], e.raw["lora_B"]
        r = A.shape[0]
        w = W[m].to(A.dtype)
        if w.shape != e.shape or not (torch.equal(A, w[:r, :]) and torch.equal(B, w[:, :r])):
            return False
    return True

