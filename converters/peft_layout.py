"""PEFT's on-disk layout as the readers see it: file names, ``base_model.model.<module>.<suffix>``
keys, rank/alpha patterns, and the config features a plain low-rank delta cannot carry."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from .errors import AdapterError
from .peft_writer import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME
from .tensors_io import load_weights, safetensors_keys

# The same names the writer uses: what PEFT saves is what PEFT (and the converter) writes.
CONFIG = CONFIG_NAME
PEFT_WEIGHTS = (WEIGHTS_NAME, "adapter_model.bin")
# PEFT inits that leave the base residualised (W_res = W0 - ΔW0): the saved adapter is relative
# to a modified base unless PEFT converted it on save (then init_lora_weights reads True).
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def _peft_weights_file(path: Path) -> Path:
    for name in PEFT_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise AdapterError("missing adapter weights (adapter_model.safetensors or adapter_model.bin)",
                       file=path)


def _weight_keys(f: Path) -> list[str]:
    if f.suffix == ".safetensors":
        return safetensors_keys(f)
    return list(load_weights(f))


def _pattern_value(pattern: dict, name: str):
    """PEFT's rule (``get_pattern_key``): a key matches a module-name suffix at a '.' boundary;
    the first match wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _split_peft_keys(tensors: dict[str, torch.Tensor], file: Path, allowed: dict[str, str],
                     *, extra_ok: Callable[[str], bool] = lambda k: False
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<module>.<suffix>`` by module; ``allowed`` maps the on-disk
    suffix to the tensor's short name. Anything else is an error naming the tensor."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if extra_ok(key):
            continue
        for suffix, short in allowed.items():
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                if module.startswith(PEFT_PREFIX):
                    module = module[len(PEFT_PREFIX):]
                out.setdefault(module, {})[short] = t
                break
        else:
            raise AdapterError(_unexpected_reason(key, allowed), file=file, tensor=key)
    return out


def _unexpected_reason(key: str, allowed: dict[str, str]) -> str:
    known = "/".join(sorted(set(allowed)))
    if "lora_magnitude_vector" in key:
        return "weight-decomposed DoRA (use_dora) magnitude: not a low-rank delta, cannot be folded into LoRA"
    if "lora_embedding" in key:
        return "embedding LoRA is not supported by the converter"
    if "modules_to_save" in key or key.endswith((".weight", ".bias")):
        return (f"unexpected tensor: the checkpoint changes weights a LoRA cannot carry "
                f"(expected only {known})")
    return f"unexpected tensor (expected only {known})"


def _check_residual_init(cfg: dict, file: Path) -> None:
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r}: this adapter is relative to a residualised base "
            "(W0 - initial adapter), not the original one; re-save it with PEFT's "
            "path_initial_model_for_weight_conversion to get a delta relative to the original base",
            file=file)


def _reject_unfoldable_peft_features(cfg: dict, file: Path) -> None:
    """What no reader takes (``use_dora`` is PEFT LoRA's DoRA method: read by the LoRA reader,
    refused by the fold)."""
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save={cfg['modules_to_save']!r}: the adapter changes whole "
                           "modules, which a LoRA cannot carry", file=file)
    if cfg.get("trainable_token_indices"):
        raise AdapterError("trainable_token_indices: the adapter changes embedding rows, which a "
                           "LoRA cannot carry", file=file)
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise AdapterError("adapter trains biases, which a LoRA cannot carry", file=file)
    if cfg.get("layer_replication"):
        raise AdapterError("layer_replication is not supported", file=file)
    if cfg.get("alora_invocation_tokens"):
        raise AdapterError("activated LoRA (alora_invocation_tokens) is not a plain delta", file=file)
    if cfg.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out=true (Conv1D bases such as GPT-2) is not supported", file=file)
