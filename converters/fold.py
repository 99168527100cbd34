"""The exact minimal-rank fold of ``ΔW = P Q`` into balanced LoRA factors.

QR-factor ``P = Q_p R_p`` and ``Qᵀ = Q_q R_q``, take the SVD of the small ``R_p R_qᵀ = U S Vᵀ``,
drop the singular values that are numerically zero (or, when asked, the smallest ones within
a tolerance), and emit ``B' = Q_p U √S``, ``A' = √S Vᵀ Q_qᵀ``. Never forms ``ΔW``; costs
``O((d_out + d_in) k²)``; the dropped singular values give the exact truncation error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nora_serve.methods.base import Factors


class RankError(ValueError):
    """A module's exact rank exceeds ``max_rank`` and truncation was not allowed."""


@dataclass
class Folded:
    B: torch.Tensor  # [d_out, rank]
    A: torch.Tensor  # [rank, d_in]
    source_rank: int  # k, the inner size of the factors the method gave
    exact_rank: int  # numerical rank of the delta
    rank: int  # rank written (exact_rank, or less after truncation)
    rel_error: float  # ||ΔW - B'A'||_F / ||ΔW||_F, exact, from the dropped singular values
    singular_values: torch.Tensor  # all of them, descending, float64

    def factors(self) -> Factors:
        return Factors(self.B, self.A)


def default_rtol(compute_dtype: torch.dtype) -> float:
    """Singular values below ``rtol · σ_max`` are rounding noise of the fold itself."""
    return 1e3 * torch.finfo(compute_dtype).eps


def fold(
    factors: Factors,
    *,
    max_rank: int | None = None,
    tolerance: float = 0.0,
    allow_truncation: bool = False,
    rtol: float | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
    name: str = "module",
) -> Folded:
    """Fold ``P Q`` into ``B' A'`` at the minimal rank.

    ``tolerance``: drop the smallest singular values while the relative Frobenius error stays
    within it (implies truncation). ``max_rank``: keep at most this many; exceeding it is a
    :class:`RankError` unless ``allow_truncation`` (or a ``tolerance`` that gets there).
    """
    P, Q = factors
    if P.ndim != 2 or Q.ndim != 2 or P.shape[1] != Q.shape[0]:
        raise ValueError(f"{name}: factors do not chain: P {tuple(P.shape)}, Q {tuple(Q.shape)}")
    out_dtype = out_dtype or P.dtype
    d_out, d_in, k = P.shape[0], Q.shape[1], P.shape[1]
    P64 = P.detach().to(device="cpu", dtype=compute_dtype)
    Q64 = Q.detach().to(device="cpu", dtype=compute_dtype)
    if k == 0:
        S = torch.zeros(0, dtype=torch.float64)
        return Folded(P.new_zeros(d_out, 0, dtype=out_dtype), P.new_zeros(0, d_in, dtype=out_dtype),
                      0, 0, 0, 0.0, S)
    Qp, Rp = torch.linalg.qr(P64)
    Qq, Rq = torch.linalg.qr(Q64.T)
    U, S, Vh = torch.linalg.svd(Rp @ Rq.T)
    S64 = S.to(torch.float64)
    smax = float(S64[0]) if S64.numel() else 0.0
    rtol = default_rtol(compute_dtype) if rtol is None else rtol
    exact = int((S64 > rtol * smax).sum()) if smax > 0 else 0

    keep = exact
    total = float((S64**2).sum())
    if tolerance > 0 and total > 0:
        # tail[i] = error if we keep i values: sqrt(sum S[i:]^2) / ||ΔW||
        tail = torch.flip(torch.cumsum(torch.flip(S64**2, [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(1)])
        ok = (tail / total).sqrt() <= tolerance
        keep = min(keep, int(ok.nonzero()[0]))
    if max_rank is not None and keep > max_rank:
        if not (allow_truncation or tolerance > 0):
            raise RankError(
                f"{name}: exact rank {keep} exceeds --max-rank {max_rank} "
                f"(allow truncation to accept a relative error of "
                f"{_rel_err(S64, max_rank, total):.3e})"
            )
        keep = max_rank
    rel_error = _rel_err(S64, keep, total)
    root = S[:keep].sqrt()
    B = (Qp @ U[:, :keep]) * root[None, :]
    A = root[:, None] * (Vh[:keep, :] @ Qq.T)
    return Folded(B.to(out_dtype).contiguous(), A.to(out_dtype).contiguous(), k, exact, keep, rel_error, S64)


def _rel_err(S: torch.Tensor, keep: int, total: float) -> float:
    if total <= 0:
        return 0.0
    return float((S[keep:] ** 2).sum() / total) ** 0.5
