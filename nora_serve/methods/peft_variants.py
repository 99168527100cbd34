"""PEFT's other low-rank methods, relative to the original base weight.

PiSSA saved "converted relative to the original base" is plain LoRA on disk (rank 2r), so
it needs no function of its own: :func:`nora_serve.methods.lora.lora_factors` serves it.
"""

from __future__ import annotations

import torch

from .base import Factors


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
