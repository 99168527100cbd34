"""Property tests of the minimal-rank fold: random shapes, ranks and dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nora_serve.converters.fold import Chain, RankError, fold
from nora_serve.methods import Factors

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def low_rank(draw):
    """``(P, Q, true_rank)``: ``P = X [I | I_dup]`` has duplicated columns, an exact rank
    deficiency that survives any input dtype; ``Q`` is random."""
    d_out = draw(st.integers(1, 48))
    d_in = draw(st.integers(1, 48))
    rank = draw(st.integers(0, min(d_out, d_in, 10)))
    dup = draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    idx = torch.randint(0, max(rank, 1), (dup,), generator=g) if rank else torch.zeros(0, dtype=torch.long)
    P = torch.cat([X, X[:, idx]], dim=1)
    Q = torch.randn(P.shape[1], d_in, generator=g, dtype=torch.float64)
    scale = 10.0 ** draw(st.integers(-3, 3))
    P, Q = (P * scale).to(dtype), Q.to(dtype)
    true = int(torch.linalg.matrix_rank(P.double() @ Q.double())) if rank else 0
    return P, Q, true


@settings(max_examples=150, deadline=None)
@given(low_rank())
def test_fold_exact_rank_balanced(case):
    P, Q, true = case
    f = fold(Factors(P, Q), out_dtype=torch.float64)
    dW = P.double() @ Q.double()
    assert f.rank == f.exact_rank == true
    assert f.rel_error == 0.0
    assert f.B.shape == (P.shape[0], true) and f.A.shape == (true, Q.shape[1])
    err = float((f.B @ f.A - dW).norm())
    assert err <= 1e-10 * max(float(dW.norm()), 1e-300)
    if true:
        assert math.isclose(float(f.B.norm()), float(f.A.norm()), rel_tol=1e-8)


@settings(max_examples=100, deadline=None)
@given(low_rank(), st.integers(0, 10))
def test_truncation_error_is_the_reported_one(case, keep):
    P, Q, true = case
    keep = min(keep, true)
    if true == 0:
        return
    f = fold(Factors(P, Q), max_rank=max(keep, 1), allow_truncation=True, out_dtype=torch.float64)
    dW = P.double() @ Q.double()
    actual = float((dW - f.B @ f.A).norm() / dW.norm())
    assert f.rank == min(max(keep, 1), true)
    assert abs(actual - f.rel_error) <= 1e-9 + 1e-7 * f.rel_error


@settings(max_examples=60, deadline=None)
@given(low_rank(), st.floats(1e-4, 0.9))
def test_tolerance_keeps_error_within_bound(case, tol):
    P, Q, true = case
    f = fold(Factors(P, Q), tolerance=tol, out_dtype=torch.float64)
    assert f.rel_error <= tol
    if true:
        dW = P.double() @ Q.double()
        assert abs(float((dW - f.B @ f.A).norm() / dW.norm()) - f.rel_error) <= 1e-9
        # Minimal: one fewer component would exceed the tolerance.
        S = f.singular_values[: f.exact_rank]
        if f.rank > 0:
            assert float((S[f.rank - 1:] ** 2).sum() / (S ** 2).sum()) ** 0.5 > tol


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_chain_equals_factors(d_out, d_in, k1, k2, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d_out, k1, generator=g, dtype=torch.float64)
    C = torch.randn(k1, k2, generator=g, dtype=torch.float64)
    R = torch.randn(k2, d_in, generator=g, dtype=torch.float64)
    a = fold(Chain(L, C, R))
    b = fold(Factors(L @ C, R))
    c = fold(Factors(L @ C, R), method="qr")
    assert a.rank == b.rank == c.rank == int(torch.linalg.matrix_rank(L @ C @ R))
    torch.testing.assert_close(a.B @ a.A, L @ C @ R, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.singular_values[: a.rank], c.singular_values[: c.rank], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("spread", [1e-5, 1e-7, 1e-9])
def test_ill_conditioned_factor_stays_exact(spread):
    """Singular values of P spread over many decades: the Gram route would lose the small
    ones, so the fold falls back to QR and still finds every component."""
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(200, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    s = torch.logspace(0, math.log10(spread), 6, dtype=torch.float64)
    P = U * s @ V.T
    Q = torch.randn(6, 150, generator=g, dtype=torch.float64)
    f = fold(Factors(P, Q))
    assert f.rank == 6
    dW = P @ Q
    assert float((f.B @ f.A - dW).norm() / dW.norm()) < 1e-12


def test_rank_error_names_module():
    P, Q = torch.randn(20, 6, dtype=torch.float64), torch.randn(6, 30, dtype=torch.float64)
    with pytest.raises(RankError) as e:
        fold(Factors(P, Q), max_rank=4, name="model.layers.3.mlp.up_proj")
    assert "model.layers.3.mlp.up_proj" in str(e.value) and "exceeds --max-rank 4" in str(e.value)


def test_zero_delta_has_rank_zero():
    f = fold(Factors(torch.zeros(10, 4), torch.randn(4, 12)))
    assert f.rank == 0 and f.B.shape == (10, 0) and f.A.shape == (0, 12)


@pytest.mark.parametrize("compute", [torch.float64, torch.float32])
def test_compute_dtype_float32_close(compute):
    g = torch.Generator().manual_seed(2)
    B, N, A = torch.randn(300, 16, generator=g), torch.randn(16, 16, generator=g), torch.randn(16, 200, generator=g)
    f = fold(Chain(B, N, A), compute_dtype=compute, out_dtype=torch.float64)
    dW = B.double() @ N.double() @ A.double()
    assert f.rank == 16
    tol = 1e-12 if compute == torch.float64 else 1e-5
    assert float((f.B @ f.A - dW).norm() / dW.norm()) < tol


def test_gram_gap_goes_to_qr():
    """A factor with singular values {1, 1e-6}: the Gram eigenvalue 1e-12 is neither noise nor
    clearly resolved, so the fold takes the QR route and keeps both components."""
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(100, 2, generator=g, dtype=torch.float64))
    P = U * torch.tensor([1.0, 1e-6], dtype=torch.float64)
    Q = torch.randn(2, 80, generator=g, dtype=torch.float64)
    assert fold(Factors(P, Q)).rank == fold(Factors(P, Q), method="qr").rank == 2


@settings(max_examples=80, deadline=None)
@given(low_rank())
def test_float32_fold_reports_what_it_drops(case):
    P, Q, true = case
    f = fold(Factors(P, Q), compute_dtype=torch.float32, out_dtype=torch.float64)
    dW = P.double() @ Q.double()
    if true == 0:
        assert f.rank == 0
        return
    actual = float((dW - f.B @ f.A).norm() / dW.norm())
    assert f.rank <= true
    # What the float32 fold drops is reported; the rest is float32 rounding.
    assert actual <= f.rel_error + 1e-4
