"""Dynamic-rank DoRA (arXiv 2405.17357): single-rank components, pruned per module.

``ΔW = s · B diag(c) A`` with ``A: [r0, d_in]``, ``c: [r0]``, ``B: [d_out, r0]``,
``s = lora_alpha / r0`` (fixed to the start rank even after pruning).
"""

from __future__ import annotations

import torch

from .base import Factors


def dyrank_factors(
    A: torch.Tensor,
    c: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    pruned: torch.Tensor | None = None,
) -> Factors:
    """Keep the components with ``c_k != 0`` that are not pruned (``pruned[k]`` True)."""
    keep = c != 0
    if pruned is not None:
        keep = keep & ~pruned.to(torch.bool)
    idx = keep.nonzero().flatten()
    return Factors(scale * B[:, idx] * c[idx][None, :], A[idx, :])


def dyrank_importance(
    A: torch.Tensor, c: torch.Tensor, B: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Per-component importance ``|c_k| ||b_k|| ||a_k|| / ||ΔW||_F`` (``[r0]``).

    ``|c_k| ||b_k|| ||a_k||`` is the Frobenius norm of the rank-1 term ``c_k b_k a_kᵀ``; the
    scale ``s`` cancels in the ratio. ``eps`` keeps it finite while ``ΔW = 0`` (c starts at 0).
    """
    A, c, B = A.detach().float(), c.detach().float(), B.detach().float()
    delta = B @ (c[:, None] * A)
    return c.abs() * B.norm(dim=0) * A.norm(dim=1) / (delta.norm() + eps)


def dyrank_budget(total: int, r0: int, r_target: int, progress: float) -> int:
    """Components kept across all modules on the cubic schedule: ``progress`` in [0, 1] runs
    from the start of pruning (keep all ``total``) to its end (keep ``total · r_target / r0``)."""
    progress = min(max(progress, 0.0), 1.0)
    pruned = int(total * (r0 - r_target) * progress**3 / r0 + 1e-9)
    return total - pruned


def dyrank_variance_reg(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> torch.Tensor:
    """The dimensional-equilibrium regulariser of the official code: the variance of each
    component's entries (``a_k`` over ``d_in``, ``b_k`` over ``d_out``), summed and averaged
    over ``2 · r0 · modules``. Low variance spreads a component's norm over its entries, so
    its importance is not carried by a few large weights."""
    total = sum(A.var(dim=1).sum() + B.var(dim=0).sum() for A, B in zip(As, Bs))
    return total / (2 * sum(A.shape[0] for A in As))
