"""Official SLoRA / NLoRA / IntTune adapters: PEFT's LoRA layout plus ``lora_N`` per module.

IntTune saves like NLoRA; only the base tells them apart (see :func:`_is_inttune`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nora_serve.methods import get_method

from .adapter_deltas import AdapterDeltas
from .peft_layout import CONFIG, _peft_weights_file, _weight_keys
from .read_peft import _read_lora_layout
from .tensors_io import read_json


def _is_three_matrix(path: Path, cfg: dict) -> bool:
    """A ``peft_type: LORA`` directory with a three-matrix init or any ``lora_N`` tensor."""
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in ("n_lora", "s_lora"):
        return True
    keys = _weight_keys(_peft_weights_file(path))
    return any(".lora_N." in k or k.endswith(".lora_N") for k in keys)


# The official init names -> the registered method (any other init: NLoRA, as the official code).
INIT_METHODS = {"s_lora": "slora", "n_lora": "nlora"}


def _read_three_matrix(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    init = read_json(path / CONFIG).get("init_lora_weights")
    method = INIT_METHODS.get(str(init).lower(), "nlora")
    cfg, entries, dtype = _read_lora_layout(path, method, peft_init=False)
    d = AdapterDeltas(path, "three_matrix", method, entries,
                      base_model_name_or_path=cfg.get("base_model_name_or_path"),
                      dtype=dtype, config=cfg)
    variant = get_method(method).frozen_variant
    if variant is not None and base is not None and _keeps_basis(d, base, get_method(variant)):
        d.method = variant
    return d


def _keeps_basis(d: AdapterDeltas, base: Path, variant) -> bool:
    """Whether every module's shared tensors are still exactly ``variant``'s basis of the base
    weight (IntTune: NLoRA's init ``A = W0[:r]``, ``B = W0[:, :r]`` kept frozen)."""
    from .fingerprint import load_base_weights

    try:
        W = load_base_weights(base, list(d.entries))
    except KeyError:
        return False
    for m, e in d.entries.items():
        A = e.raw["lora_A"]
        w = W[m].to(A.dtype)
        if tuple(w.shape) != tuple(e.shape):
            return False
        basis = variant.basis(w, A.shape[0])
        if not all(torch.equal(e.raw[n], t) for n, t in basis.items()):
            return False
    return True

