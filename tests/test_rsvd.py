"""The shared bases' top-r factors (``nora_serve.methods.nora.top_svd``): above a small size a
fixed-seed randomized SVD, checked here against the full SVD on matrices with a decaying
spectrum; deterministic, with the sign convention; the activation-aware variant too."""

from __future__ import annotations

import pytest
import torch

from nora_serve.methods import svd_outer
from nora_serve.methods.nora import EXACT_MAX_DIM, top_svd

M, N = 1024, 768  # min(M, N) above EXACT_MAX_DIM: the randomized path
assert min(M, N) > EXACT_MAX_DIM


def decaying(alpha: float, m: int = M, n: int = N, seed: int = 1) -> torch.Tensor:
    """``U diag(i^-alpha) Vᵀ`` with random orthonormal ``U``, ``V`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    return (U * s) @ V.T


def largest_angle(U1: torch.Tensor, U2: torch.Tensor) -> float:
    """The largest principal angle (radians) between the column spaces of two orthonormal bases."""
    cos = torch.linalg.svdvals(U1.T @ U2).clamp(max=1.0)
    return float(cos.min().acos())


# (decay exponent, rank, largest principal angle bound (rad), bound on err / optimal err - 1).
# alpha 0.5 decays about as slowly as LLM weights: the top-r subspace is then ill-conditioned
# (tiny gaps between singular values), yet the rank-r error stays within 1e-5 of the optimum.
CASES = [(2.0, 8, 1e-6, 1e-12), (1.0, 8, 1e-3, 1e-9), (1.0, 32, 1e-3, 1e-8), (0.5, 16, 0.05, 1e-5)]


@pytest.mark.parametrize("alpha, r, max_angle, max_excess", CASES)
def test_subspace_and_error_match_full_svd(alpha, r, max_angle, max_excess):
    W = decaying(alpha)
    U, S, Vh, _ = top_svd(W, r, device="cpu")
    Uf, Sf, Vhf = torch.linalg.svd(W, full_matrices=False)
    assert largest_angle(U, Uf[:, :r]) <= max_angle
    assert largest_angle(Vh.T, Vhf[:r].T) <= max_angle
    optimal = float(Sf[r:].square().sum().sqrt())  # Eckart-Young: the best rank-r error
    err = float((W - (U * S) @ Vh).norm())
    assert err <= (1 + max_excess) * optimal
    assert torch.allclose(S, Sf[:r], rtol=1e-3)
    # Orthonormal factors.
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)


def test_deterministic_with_sign_convention():
    W = decaying(1.0).to(torch.float32)
    a, b = top_svd(W, 8, device="cpu"), top_svd(W.clone(), 8, device="cpu")
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    U = a[0]
    top = U.abs().argmax(dim=0)
    assert bool((U[top, torch.arange(U.shape[1])] > 0).all())  # largest entry of each u_i positive
    A1, B1 = svd_outer(W, 8)
    A2, B2 = svd_outer(W, 8)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)


def test_small_matrices_get_the_exact_svd():
    W = decaying(0.3, 256, 128)
    U, S, Vh, _ = top_svd(W, 4, device="cpu")
    Uf, Sf, Vhf = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(S, Sf[:4], rtol=1e-12)
    assert largest_angle(U, Uf[:, :4]) < 1e-6


def test_activation_aware_variant():
    """With ``act_scale`` the factors are the top-r SVD of ``W diag(s)``, the scale divided back
    out of ``A_o``: ``B_o A_o diag(s)`` is the best rank-r approximation of ``W diag(s)``."""
    W = decaying(1.0)
    s = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
    r = 8
    A_o, B_o = svd_outer(W, r, act_scale=s)
    Ws = W * s[None, :]
    Sf = torch.linalg.svdvals(Ws)
    err = float((Ws - B_o @ (A_o * s[None, :])).norm())
    assert err <= (1 + 1e-8) * float(Sf[r:].square().sum().sqrt())
    U, S, _, _ = top_svd(W, r, s, device="cpu")
    torch.testing.assert_close(B_o, U * S.sqrt()[None, :])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_subspace():
    W = decaying(1.0)
    Uc, Sc, _, _ = top_svd(W, 8, device="cpu")
    Ug, Sg, _, _ = top_svd(W, 8, device="cuda")
    assert Ug.device.type == "cpu"  # returned on the CPU
    assert largest_angle(Uc, Ug) < 1e-6 and torch.allclose(Sc, Sg, rtol=1e-9)
