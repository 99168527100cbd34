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
