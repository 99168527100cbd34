"""Plain LoRA: ``ΔW = s · B A``, the form every other method is folded into."""

from __future__ import annotations

import math

import torch

from .base import Factors


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_factors(A: torch.Tensor, B: torch.Tensor, scale: float) -> Factors:
    """``A: [r, d_in]``, ``B: [d_out, r]``."""
    return Factors(B * scale, A)
