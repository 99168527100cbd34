"""Dynamic-rank DoRA (arXiv 2405.17357): single-rank components, pruned per module.

``ΔW = s · B diag(c) A`` with ``A: [r0, d_in]``, ``c: [r0]``, ``B: [d_out, r0]``,
``s = lora_alpha / r0`` (fixed to the start rank ``r0 = ceil(1.5 r)`` even after pruning).
Init as the official code: ``c = 0``, A and B kaiming-uniform (gain for a = 0).
"""

from __future__ import annotations

import math

import torch

from .base import Factors
from .registry import InitArgs, Method, check_pairs, kaiming_, mm, register_method


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


def dyrank_start_rank(r_target: int) -> int:
    return math.ceil(1.5 * r_target)


def _check(t):
    A, c, B = t["lora_A"], t["lora_c"], t["lora_B"]
    r = A.shape[0]
    return check_pairs(t, ("lora_B", B.shape[1] == r, f"lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}"),
                       ("lora_c", tuple(c.shape) == (r,), f"lora_c {tuple(c.shape)} vs rank {r}"))


def _init(a: InitArgs) -> dict[str, torch.Tensor]:
    r0 = a.r  # the trainer passes the start rank (``start_rank``)
    return {"lora_A": kaiming_(torch.empty(r0, a.d_in), a.gen, a=0.0),
            "lora_c": torch.zeros(r0),
            "lora_B": kaiming_(torch.empty(a.d_out, r0), a.gen, a=0.0)}


DYRANK = register_method(Method(
    name="dyrank",
    summary="dynamic-rank DoRA: starts at ceil(1.5 r) components per module, prunes to "
            "an average of r on a cubic schedule; s = alpha/ceil(1.5 r)",
    tensors=("lora_A", "lora_c", "lora_B"),
    # Pruned components have c = 0 (the readers pass the masked c), so they drop out.
    factors=lambda t, s: dyrank_factors(t["lora_A"], t["lora_c"], t["lora_B"], s),
    forward=lambda t, s, x, W=None: s * (mm(x, t["lora_A"]) * t["lora_c"].to(x.dtype)) @ t["lora_B"].to(x.dtype).T,
    check=_check,
    rank=lambda t: int((t["lora_c"] != 0).sum()),
    shape=lambda t: (t["lora_B"].shape[0], t["lora_A"].shape[1]),
    vectors=("lora_c",),
    trainable=("lora_A", "lora_c", "lora_B"),
    init=_init,
    start_rank=dyrank_start_rank,
    dynamic_rank=True,
))
