"""The exact minimal-rank fold of ``ΔW = P Q`` (or ``L C R``) into balanced LoRA factors.

Write ``P = Q_p R_p`` and ``Qᵀ = Q_q R_q`` with orthonormal ``Q_p``, ``Q_q``, take the SVD of
the small ``R_p R_qᵀ = U S Vᵀ``, drop the singular values that are numerically zero (or, when
asked, the smallest ones within a tolerance), and emit ``B' = Q_p U √S``, ``A' = √S Vᵀ Q_qᵀ``.
Never forms ``ΔW``; costs ``O((d_out + d_in) k²)``; ``||B'||_F = ||A'||_F`` (balanced); the
dropped singular values give the exact truncation error.

Two ways to get ``R_p`` (the same for ``R_q``):

* Gram (default, fast): ``PᵀP = V Λ Vᵀ``, ``R_p = Λ^½ Vᵀ``, ``Q_p = P V Λ^-½``. Only matrix
  products over the long dimension, which run near peak speed; ``B' = P (V Λ^-½ U √S)``
  reproduces ``P Q`` up to rounding whatever the conditioning, because ``V Λ^-½ Λ^½ Vᵀ = I``
  over the kept directions. Squaring loses the smallest singular values of an ill-conditioned
  factor, so when a Gram matrix has eigenvalues between clearly-zero and clearly-nonzero the
  module falls back to:
* Householder QR of the factors themselves (exact at any conditioning, a few times slower).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from nora_serve.methods.base import Factors

from .errors import AdapterError


class RankError(AdapterError):
    """A module's exact rank exceeds ``max_rank`` and truncation was not allowed."""


class Chain(NamedTuple):
    """``ΔW = L @ C @ R`` with ``L: [d_out, k1]``, ``C: [k1, k2]`` (or None = identity),
    ``R: [k2, d_in]``: lets three-matrix methods fold without forming ``L C`` first."""

    L: torch.Tensor
    C: torch.Tensor | None
    R: torch.Tensor


@dataclass
class Folded:
    B: torch.Tensor  # [d_out, rank]
    A: torch.Tensor  # [rank, d_in]
    source_rank: int  # k, the inner size of the factors the method gave
    exact_rank: int  # numerical rank of the delta
    rank: int  # rank written (exact_rank, or less after truncation)
    rel_error: float  # ||ΔW - B'A'||_F / ||ΔW||_F, exact, from the dropped singular values
    singular_values: torch.Tensor  # of the delta, descending, float64

    def factors(self) -> Factors:
        return Factors(self.B, self.A)


def default_rtol(compute_dtype: torch.dtype) -> float:
    """Singular values below ``rtol · σ_max`` are rounding noise of the fold itself."""
    return 1e3 * torch.finfo(compute_dtype).eps


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """k x k LAPACK calls (eigh, SVD) take milliseconds on one thread but can take hundreds
    of milliseconds on several when the cores are busy (OpenMP spin-waits): keep them on one."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gram_rtols(compute_dtype: torch.dtype) -> tuple[float, float]:
    """(zero, clear): Gram eigenvalues below ``zero · λ_max`` are rounding noise (a rank-deficient
    factor); at or above ``clear · λ_max`` the Gram route is accurate. In between: use QR."""
    eps = torch.finfo(compute_dtype).eps
    # 64 eps: the rounding noise of a k x k Gram for k up to ~64 (a factor with exactly
    # dependent columns); a factor direction below ~8 sqrt(eps) of the largest one counts as
    # zero on this route (1.2e-7 in float64: the rounding level of fp32-stored adapters).
    if compute_dtype == torch.float64:
        return 64 * eps, 1e-8
    # A float32 Gram cannot tell a small direction from a null one: any eigenvalue under
    # 1e-3 of the largest sends the module to QR, which reports what it drops.
    return 0.0, 1e-3


def _gram_basis(X: torch.Tensor, compute_dtype: torch.dtype):
    """For tall ``X [d, k]``: ``(R [k', k], T [k, k'])`` with ``X = (X T) R`` and ``X T``
    orthonormal; None when ``X`` is too ill-conditioned for the Gram route."""
    G = (X.T @ X).to(torch.float64)
    G = (G + G.T) * 0.5
    with _one_thread():
        lam, V = torch.linalg.eigh(G)  # ascending
    lmax = float(lam[-1]) if lam.numel() else 0.0
    if lmax <= 0:
        return lam.new_zeros(0, X.shape[1]), lam.new_zeros(X.shape[1], 0)
    zero, clear = _gram_rtols(compute_dtype)
    rel = lam / lmax
    if bool(((rel > zero) & (rel < clear)).any()) or (zero == 0.0 and bool((rel < clear).any())):
        return None
    keep = rel >= clear
    V, root = V[:, keep], lam[keep].sqrt()
    return root[:, None] * V.T, V / root[None, :]


def _qr_basis(X: torch.Tensor):
    """``(Q_x [d, k], R [k, k])`` by Householder QR."""
    Qx, R = torch.linalg.qr(X)
    return Qx, R


def fold(
    factors: Factors | Chain,
    *,
    max_rank: int | None = None,
    tolerance: float = 0.0,
    allow_truncation: bool = False,
    rtol: float | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
    name: str = "module",
    method: str = "auto",
) -> Folded:
    """Fold ``P Q`` (or a :class:`Chain` ``L C R``) into ``B' A'`` at the minimal rank.

    ``tolerance``: drop the smallest singular values while the relative Frobenius error stays
    within it. ``max_rank``: keep at most this many; exceeding it is a :class:`RankError` unless
    ``allow_truncation``. ``compute_dtype``: float64 (default, exact) or float32 (faster;
    components under ``rtol = 1e3 · eps32`` of the largest are dropped and counted in
    ``rel_error``). ``method``: "auto" (Gram, QR where a factor is ill-conditioned) or "qr".
    """
    if isinstance(factors, Chain):
        L, C, R = factors
    else:
        L, R = factors
        C = None
    if L.ndim != 2 or R.ndim != 2 or (C is not None and C.ndim != 2):
        raise ValueError(f"{name}: factors must be 2-D")
    k1 = L.shape[1]
    k2 = R.shape[0]
    if (C is None and k1 != k2) or (C is not None and tuple(C.shape) != (k1, k2)):
        raise ValueError(f"{name}: factors do not chain: {tuple(L.shape)}, "
                         f"{None if C is None else tuple(C.shape)}, {tuple(R.shape)}")
    out_dtype = out_dtype or L.dtype
    d_out, d_in = L.shape[0], R.shape[1]
    rtol = default_rtol(compute_dtype) if rtol is None else rtol
    Lc = L.detach().to(device="cpu", dtype=compute_dtype)
    Rc = R.detach().to(device="cpu", dtype=compute_dtype)
    Cc = None if C is None else C.detach().to(device="cpu", dtype=torch.float64)
    source_rank = min(k1, k2)

    def empty():
        return Folded(L.new_zeros(d_out, 0, dtype=out_dtype), L.new_zeros(0, d_in, dtype=out_dtype),
                      source_rank, 0, 0, 0.0, torch.zeros(0, dtype=torch.float64))

    if min(k1, k2, d_out, d_in) == 0:
        return empty()

    bases = None
    if method == "auto":
        bl = _gram_basis(Lc, compute_dtype)
        br = _gram_basis(Rc.T, compute_dtype) if bl is not None else None
        if bl is not None and br is not None:
            bases = ("gram", bl, br)
    elif method != "qr":
        raise ValueError(f"unknown fold method {method!r}")
    if bases is None:
        # QR needs a single pair: fold the core into the shorter side first.
        if Cc is not None:
            if k2 <= k1:
                Lc, Cc = Lc @ Cc.to(compute_dtype), None
            else:
                Rc, Cc = Cc.to(compute_dtype) @ Rc, None
        bases = ("qr", _qr_basis(Lc), _qr_basis(Rc.T))

    kind, (X1, X2), (Y1, Y2) = bases
    if kind == "gram":
        RL, TL = X1, X2  # RL [kL', k1], TL [k1, kL']
        RR, TR = Y1, Y2
    else:
        QL, RL = X1, X2.to(torch.float64)
        QR_, RR = Y1, Y2.to(torch.float64)
    if RL.shape[0] == 0 or RR.shape[0] == 0:
        return empty()
    core = RL @ Cc @ RR.T if Cc is not None else RL @ RR.T
    with _one_thread():
        U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    S64 = S.to(torch.float64)
    smax = float(S64[0]) if S64.numel() else 0.0
    exact = int((S64 > rtol * smax).sum()) if smax > 0 else 0

    keep = exact
    # In float64 the values below the threshold are the fold's own rounding noise. A float32
    # fold decides at 1e3 eps32 and may drop real (tiny) components: report what they carry.
    counted = S64[:exact] if compute_dtype == torch.float64 else S64
    total = float((counted ** 2).sum())
    if tolerance > 0 and total > 0:
        # tail[i] = error if we keep i values: sqrt(sum S[i:exact]^2) / ||ΔW||
        s2 = counted ** 2
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(1)])
        ok = (tail / total).sqrt() <= tolerance
        keep = min(keep, int(ok.nonzero()[0]))
    if max_rank is not None and keep > max_rank:
        if not allow_truncation:
            raise RankError(
                f"exact rank {keep} exceeds --max-rank {max_rank}"
                + (f" even at --tolerance {tolerance:g}" if tolerance > 0 else "")
                + f" (allowing truncation would cost a relative error of "
                f"{_rel_err(counted, max_rank, total):.3e})",
                module=name,
            )
        keep = max_rank
    rel_error = _rel_err(counted, keep, total)
    root = S64[:keep].sqrt()
    left = U[:, :keep] * root[None, :]  # [kL', keep]
    right = root[:, None] * Vh[:keep, :]  # [keep, kR']
    if kind == "gram":
        B = Lc @ (TL @ left).to(compute_dtype)
        A = (right @ TR.T).to(compute_dtype) @ Rc
    else:
        B = QL @ left.to(compute_dtype)
        A = right.to(compute_dtype) @ QR_.T
    return Folded(B.to(out_dtype).contiguous(), A.to(out_dtype).contiguous(), source_rank, exact,
                  keep, rel_error, S64)


def _rel_err(S: torch.Tensor, keep: int, total: float) -> float:
    if total <= 0:
        return 0.0
    return max(0.0, float((S[keep:] ** 2).sum() / total)) ** 0.5
