"""Plain LoRA: ``ΔW = s · B A``, the form every other method is folded into.

``A: [r, d_in]``, ``B: [d_out, r]``, ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
Init as PEFT's default: A kaiming-uniform, B = 0.
"""

from __future__ import annotations

import torch

from .base import Factors
from .registry import InitArgs, Method, check_pairs, kaiming_, mm, register_method


def lora_factors(A: torch.Tensor, B: torch.Tensor, scale: float) -> Factors:
    """``A: [r, d_in]``, ``B: [d_out, r]``."""
    return Factors(B * scale, A)


def lora_check(t):
    A, B = t["lora_A"], t["lora_B"]
    return check_pairs(t, ("lora_B", B.shape[1] == A.shape[0],
                           f"lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}"))


def lora_init(a: InitArgs) -> dict[str, torch.Tensor]:
    return {"lora_A": kaiming_(torch.empty(a.r, a.d_in), a.gen), "lora_B": torch.zeros(a.d_out, a.r)}


LORA = register_method(Method(
    name="lora",
    summary="dW = s B A; s = alpha/r (alpha/sqrt(r) with --rslora)",
    tensors=("lora_A", "lora_B"),
    factors=lambda t, s: lora_factors(t["lora_A"], t["lora_B"], s),
    forward=lambda t, s, x, W=None: s * mm(x, t["lora_A"], t["lora_B"]),
    check=lora_check,
    rank=lambda t: t["lora_A"].shape[0],
    shape=lambda t: (t["lora_B"].shape[0], t["lora_A"].shape[1]),
    rslora=True,
    trainable=("lora_A", "lora_B"),
    init=lora_init,
))
