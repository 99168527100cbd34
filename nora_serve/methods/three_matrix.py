"""Three-matrix LoRA (SLoRA / NLoRA / IntTune): ``ΔW = s · B N A`` with an ``r x r`` core."""

from __future__ import annotations

import torch

from .base import Factors


def three_matrix_factors(
    A: torch.Tensor, N: torch.Tensor, B: torch.Tensor, scale: float
) -> Factors:
    """``A: [r, d_in]``, ``N: [r, r]``, ``B: [d_out, r]``; rank ``<= r``."""
    return Factors(scale * (B @ N), A)


def nystrom_init(W0: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLoRA's init as the official code does it: ``A = W0[:r, :]``, ``B = W0[:, :r]``,
    ``N = W0[:r, :r]``. Returns ``(A, N, B)`` as fresh contiguous copies."""
    W = W0.detach()
    return W[:r, :].clone(), W[:r, :r].clone(), W[:, :r].clone()


def three_matrix_core(N: torch.Tensor, scale: float) -> torch.Tensor:
    """The ``r x r`` core between the outer pair: ``ΔW = B (s N) A``."""
    return scale * N
