"""nora-serve's native adapter format (written by ``nora-train``, read by everything else).

A directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

``adapter_config.json``::

    {
      "format": "nora-serve", "format_version": 1,
      "method": "nora",                  # lora | nora | slora | nlora | inttune | dyrank
      "r": 8,                            # rank; NoRA: outer rank; dyrank: start rank r0
      "inner_r": 4,                      # NoRA only: r'
      "lora_alpha": 16, "use_rslora": false,
      "scaling": 4.0,                    # s, recorded for readers; must equal the method's rule
      "target_modules": ["model.layers.0.self_attn.q_proj", ...],   # full module names
      "base_model_name_or_path": "...",
      "base_fingerprints": {"model.layers.0.self_attn.q_proj": "sha256:...", ...},
      "shared_basis": {"rule": "svd", "r": 8, "calibration": null, "fingerprint": "sha256:..."},
      "rank_pattern": {"model.layers.0.self_attn.q_proj": 6, ...}   # dyrank: true rank per module
    }

Tensors, keyed ``<module>.<name>``:

    lora                    lora_A [r, d_in], lora_B [d_out, r]
    nora                    outer_A [r, d_in], outer_B [d_out, r]   (frozen, shared basis)
                            inner_A [r', r],   inner_B [r, r']      (trained)
    slora / nlora / inttune lora_A [r, d_in], lora_N [r, r], lora_B [d_out, r]
    dyrank                  lora_A [r0, d_in], lora_c [r0], lora_B [d_out, r0] (pruned: c = 0)

Scale rules: lora ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); slora/nlora/inttune
``alpha / r``; nora ``alpha / r'``; dyrank ``alpha / r0``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nora_serve.methods import (
    Factors,
    dyrank_factors,
    lora_factors,
    nora_core,
    nora_factors,
    three_matrix_core,
    three_matrix_factors,
)

FORMAT = "nora-serve"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

METHOD_TENSORS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_A", "lora_B"),
    "nora": ("outer_A", "outer_B", "inner_A", "inner_B"),
    "slora": ("lora_A", "lora_N", "lora_B"),
    "nlora": ("lora_A", "lora_N", "lora_B"),
    "inttune": ("lora_A", "lora_N", "lora_B"),
    "dyrank": ("lora_A", "lora_c", "lora_B"),
}
# Tensors that are a deterministic function of the base weights: shared between adapters.
SHARED_TENSORS: dict[str, tuple[str, ...]] = {
    "nora": ("outer_A", "outer_B"),
    "inttune": ("lora_A", "lora_B"),
}
METHODS = tuple(METHOD_TENSORS)


def method_scale(config: dict) -> float:
    """The scalar ``s`` of a native config, by the method's own rule."""
    method, alpha = config["method"], float(config["lora_alpha"])
    if method == "nora":
        return alpha / int(config["inner_r"])
    if method == "lora" and config.get("use_rslora"):
        return alpha / math.sqrt(int(config["r"]))
    return alpha / int(config["r"])


def module_factors(method: str, scale: float, t: dict[str, torch.Tensor]) -> Factors:
    """``ΔW = P Q`` of one module from its native tensors (``t`` keyed by tensor name)."""
    if method == "lora":
        return lora_factors(t["lora_A"], t["lora_B"], scale)
    if method == "nora":
        return nora_factors(t["outer_A"], t["outer_B"], t["inner_A"], t["inner_B"], scale)
    if method in ("slora", "nlora", "inttune"):
        return three_matrix_factors(t["lora_A"], t["lora_N"], t["lora_B"], scale)
    if method == "dyrank":
        return dyrank_factors(t["lora_A"], t["lora_c"], t["lora_B"], scale)
    raise ValueError(f"unknown native method {method!r} (known: {', '.join(METHODS)})")


def module_core(method: str, scale: float, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The adapter's own ``r x r`` core ``C`` of a shared-basis method (``ΔW = B_sh C A_sh``,
    with ``A_sh, B_sh`` = the tensors named in :data:`SHARED_TENSORS`)."""
    if method == "nora":
        return nora_core(t["inner_A"], t["inner_B"], scale)
    if method == "inttune":
        return three_matrix_core(t["lora_N"], scale)
    raise ValueError(f"method {method!r} has no shared basis (shared-basis methods: {', '.join(SHARED_TENSORS)})")


@dataclass
class NativeAdapter:
    """An adapter in the native format, in memory: ``tensors[module][name]``."""

    config: dict
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def scale(self) -> float:
        return method_scale(self.config)

    def factors(self, module: str) -> Factors:
        return module_factors(self.method, self.scale, self.tensors[module])

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write atomically: a failed save leaves nothing at ``out``."""
        from safetensors.torch import save_file

        from .atomic import atomic_dir

        cfg = dict(self.config)
        cfg.setdefault("format", FORMAT)
        cfg.setdefault("format_version", FORMAT_VERSION)
        cfg["scaling"] = method_scale(cfg)
        cfg["target_modules"] = sorted(self.tensors)
        flat = {
            f"{m}.{n}": t.detach().to("cpu").contiguous()
            for m, ts in self.tensors.items()
            for n, t in ts.items()
        }
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_file(flat, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return Path(out)


def is_native(path: str | Path) -> bool:
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False
