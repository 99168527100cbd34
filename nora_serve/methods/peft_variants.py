"""PEFT's other low-rank methods, relative to the original base weight: read from PEFT's own
files only (no native format, no trainer).

PiSSA saved "converted relative to the original base" is plain LoRA on disk (rank 2r), so
it needs no method of its own: ``lora`` serves it.
"""

from __future__ import annotations

import torch

from .base import Factors
from .registry import Method, check_pairs, register_method


def adalora_factors(
    A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, alpha: float, ranknum: float
) -> Factors:
    """PEFT AdaLoRA: ``ΔW = B (A ⊙ E) · alpha / (ranknum + 1e-5)`` (PEFT adds the 1e-5).

    ``ranknum`` is the configured ``init_r``, also for a saved adapter already truncated to its
    surviving ranks: PEFT (0.21) keeps it at ``init_r`` when it reloads one, and so did the
    training run whose reference logits the fixture holds.
    """
    scale = alpha / (ranknum + 1e-5)
    return Factors(B * scale, A * E.reshape(-1, 1))


def vera_factors(
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    d_in: int,
) -> Factors:
    """PEFT VeRA: ``ΔW = diag(λ_b) B diag(λ_d) A`` with the shared ``vera_A [r, max_in]`` and
    ``vera_B [max_out, r]`` sliced to this layer's ``[d_out, d_in]``."""
    d_out = lambda_b.shape[0]
    return Factors(lambda_b[:, None] * vera_B[:d_out, :] * lambda_d[None, :], vera_A[:, :d_in])


def _adalora_forward(t, s, x, W=None):
    d = x.dtype
    return (x @ (t["lora_A"].to(d) * t["lora_E"].to(d)).T @ t["lora_B"].to(d).T) * s


ADALORA = register_method(Method(
    name="adalora",
    summary="PEFT AdaLoRA: dW = B (A * E) alpha/(ranknum + 1e-5)",
    tensors=("lora_A", "lora_E", "lora_B"),
    # The scale is folded in as ``alpha / (ranknum + 1e-5)``: alpha = 1, ranknum = 1/s - 1e-5.
    factors=lambda t, s: Factors(t["lora_B"] * s, t["lora_A"] * t["lora_E"].reshape(-1, 1)),
    forward=_adalora_forward,
    check=lambda t: check_pairs(
        t, ("lora_E", tuple(t["lora_E"].shape) == (t["lora_A"].shape[0], 1),
            f"lora_E {tuple(t['lora_E'].shape)} vs rank {t['lora_A'].shape[0]}"),
        ("lora_B", t["lora_B"].shape[1] == t["lora_A"].shape[0],
         f"lora_B {tuple(t['lora_B'].shape)} vs lora_A {tuple(t['lora_A'].shape)}")),
    rank=lambda t: t["lora_A"].shape[0],
    shape=lambda t: (t["lora_B"].shape[0], t["lora_A"].shape[1]),
    scale=lambda c: float(c["lora_alpha"]) / (float(c["ranknum"]) + 1e-5),
    config_keys=("ranknum",),
    native=False,
))


def _vera_forward(t, s, x, W=None):
    d = x.dtype
    h = (x @ t["vera_A"].to(d).T) * t["lambda_d"].to(d)
    return (h @ t["vera_B"].to(d).T) * t["lambda_b"].to(d)


# Per module: the shared projections already sliced to the layer (vera_A [r, d_in],
# vera_B [d_out, r]) and the layer's own scaling vectors.
VERA = register_method(Method(
    name="vera",
    summary="PEFT VeRA: dW = diag(lambda_b) B diag(lambda_d) A, A and B shared and frozen",
    tensors=("vera_A", "vera_B", "lambda_d", "lambda_b"),
    factors=lambda t, s: vera_factors(t["vera_A"], t["vera_B"], t["lambda_d"], t["lambda_b"],
                                      t["vera_A"].shape[1]),
    forward=_vera_forward,
    check=lambda t: None,
    rank=lambda t: t["lambda_d"].shape[0],
    shape=lambda t: (t["lambda_b"].shape[0], t["vera_A"].shape[1]),
    scale=lambda c: 1.0,
    vectors=("lambda_d", "lambda_b"),
    native=False,
))
