"""LoRA-XS (arXiv 2405.17604): frozen truncated-SVD factors of ``W0``, one trainable ``r x r``
matrix between them.

``ΔW = s · U_r R (Σ_r V_rᵀ)`` with ``outer_B = U_r: [d_out, r]``, ``outer_A = Σ_r V_rᵀ:
[r, d_in]``, ``lora_R = R: [r, r]``, ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). As the
official code (``utils/initialization_utils.py``): the SVD is of ``W0`` (they decompose ``W0ᵀ``
with ``TruncatedSVD`` and set ``lora_A = Σ Uᵀ``, ``lora_B = V``: the same factors, ``Σ`` on the
input side), PEFT's LoRA scale ``alpha / r``, and ``R ~ N(0, σ²)`` with ``σ = 1e-5``. The SVD
is NoRA's :func:`~.nora.top_svd` (float64, a fixed-seed randomized SVD for large weights, NoRA's
sign convention), so the outer pair is a deterministic function of (W0, r) on one device; all
LoRA-XS adapters of one base and rank share it through one basis file, a shared basis with core
``s R``.
"""

from __future__ import annotations

import torch

from .base import Factors
from .nora import top_svd
from .registry import InitArgs, Method, check_pairs, lora_rule, max_rank_check, mm, register_method

INIT_STD = 1e-5  # the official code's ``loraxs_sigma``


def loraxs_outer(W0: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outer_A, outer_B) = (Σ_r V_rᵀ, U_r)`` of the weight as stored, in float32."""
    U, S, Vh, _ = top_svd(W0.to(torch.float32), r)
    return (S[:, None] * Vh).to(torch.float32).contiguous(), U.to(torch.float32).contiguous()


def loraxs_factors(outer_A, outer_B, R, scale: float) -> Factors:
    """``P = s U_r R``, ``Q = Σ_r V_rᵀ``: rank ``<= r``."""
    return Factors(scale * (outer_B @ R), outer_A)


def _check(t):
    oA, oB, R = t["outer_A"], t["outer_B"], t["lora_R"]
    r = oA.shape[0]
    return check_pairs(t, ("outer_B", oB.shape[1] == r, f"outer_B {tuple(oB.shape)} vs outer_A {tuple(oA.shape)}"),
                       ("lora_R", tuple(R.shape) == (r, r), f"lora_R {tuple(R.shape)} vs rank {r}"))


def _basis(W0, r, act_scale=None):
    A, B = loraxs_outer(W0, r)
    return {"outer_A": A, "outer_B": B}


def _init(a: InitArgs) -> dict[str, torch.Tensor]:
    max_rank_check("LoRA-XS", a.r, a.d_out, a.d_in)
    t = dict(a.basis) if a.basis is not None else _basis(a.W0, a.r)
    t["lora_R"] = torch.randn(a.r, a.r, generator=a.gen) * INIT_STD
    return t


LORAXS = register_method(Method(
    name="loraxs",
    summary="LoRA-XS: dW = s U_r R (S_r V_r^T), U_r and S_r V_r^T from the SVD of W0 (frozen, "
            "shared), R [r x r] trained; s = alpha/r",
    tensors=("outer_A", "outer_B", "lora_R"),
    factors=lambda t, s: loraxs_factors(t["outer_A"], t["outer_B"], t["lora_R"], s),
    forward=lambda t, s, x, W=None: s * mm(x, t["outer_A"], t["lora_R"], t["outer_B"]),
    check=_check,
    rank=lambda t: t["outer_A"].shape[0],
    shape=lambda t: (t["outer_B"].shape[0], t["outer_A"].shape[1]),
    scale=lora_rule,
    rslora=True,
    chain=lambda t, s: (t["outer_B"], s * t["lora_R"].detach().to(torch.float64), t["outer_A"]),
    shared=("outer_A", "outer_B"),
    shared_rule="svd_xs",
    basis=_basis,
    core=lambda t, s: s * t["lora_R"],
    trainable=("lora_R",),
    init=_init,
    needs_w0=True,
))
