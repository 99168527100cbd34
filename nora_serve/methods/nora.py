"""NoRA (nested LoRA): frozen SVD outer pair, trainable inner pair.

``ΔW = s · B_o (B_i A_i) A_o`` with ``B_o: [d_out, r]``, ``A_o: [r, d_in]``,
``B_i: [r, r']``, ``A_i: [r', r]``.
"""

from __future__ import annotations

import torch

from .base import Factors


def nora_factors(
    outer_A: torch.Tensor,
    outer_B: torch.Tensor,
    inner_A: torch.Tensor,
    inner_B: torch.Tensor,
    scale: float,
) -> Factors:
    """Fold the inner pair into the outer one: rank ``<= r'``."""
    return Factors(scale * (outer_B @ inner_B), inner_A @ outer_A)


def svd_outer(
    W0: torch.Tensor, r: int, act_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen outer pair ``(A_o, B_o)`` from the top-``r`` SVD of ``W0``.

    ``act_scale`` ([d_in], positive) makes it activation-aware: the SVD is taken of
    ``W0 · diag(act_scale)`` and the scale is divided back out of ``A_o``. Deterministic in
    (W0, r, act_scale): computed in float64 on the CPU with a sign convention, so adapters
    trained from one base share bit-identical outer factors.
    """
    W = W0.detach().to(device="cpu", dtype=torch.float64)
    if act_scale is not None:
        s = act_scale.detach().to(device="cpu", dtype=torch.float64)
        W = W * s[None, :]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r, :]
    # Sign convention: the largest-magnitude entry of each left singular vector is positive.
    idx = U.abs().argmax(dim=0)
    sign = torch.sign(U[idx, torch.arange(U.shape[1])])
    sign[sign == 0] = 1
    U, Vh = U * sign[None, :], Vh * sign[:, None]
    root = S.sqrt()
    B_o = U * root[None, :]
    A_o = root[:, None] * Vh
    if act_scale is not None:
        A_o = A_o / s[None, :]
    return A_o.to(W0.dtype).contiguous(), B_o.to(W0.dtype).contiguous()


def nora_core(inner_A: torch.Tensor, inner_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The ``r x r`` core between the frozen outer pair: ``ΔW = B_o (s B_i A_i) A_o``."""
    return scale * (inner_B @ inner_A)
