"""Three-matrix LoRA (SLoRA / NLoRA / IntTune): ``ΔW = s · B N A`` with an ``r x r`` core.

``A: [r, d_in]``, ``N: [r, r]``, ``B: [d_out, r]``, ``s = alpha / r``. SLoRA: A, N
kaiming-uniform, B = 0. NLoRA: the Nyström init ``A = W0[:r]``, ``N = W0[:r, :r]``,
``B = W0[:, :r]`` (base not residualised, so ``ΔW != 0`` at step 0). IntTune: NLoRA's init with
A and B frozen, so it is a shared-basis method (rule ``nystrom``) with core ``s N``.
"""

from __future__ import annotations

import torch

from .base import Factors
from .registry import InitArgs, Method, check_pairs, kaiming_, max_rank_check, mm, register_method

TENSORS = ("lora_A", "lora_N", "lora_B")


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


def _check(t):
    A, N, B = t["lora_A"], t["lora_N"], t["lora_B"]
    r = A.shape[0]
    return check_pairs(t, ("lora_B", B.shape[1] == r, f"lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}"),
                       ("lora_N", tuple(N.shape) == (r, r), f"lora_N {tuple(N.shape)} vs rank {r}"))


def _slora_init(a: InitArgs) -> dict[str, torch.Tensor]:
    A = kaiming_(torch.empty(a.r, a.d_in), a.gen)
    N = kaiming_(torch.empty(a.r, a.r), a.gen)
    return {"lora_A": A, "lora_N": N, "lora_B": torch.zeros(a.d_out, a.r)}


def _nystrom_basis(W0, r, act_scale=None):
    A, _, B = nystrom_init(W0, r)
    return {"lora_A": A, "lora_B": B}


def _nystrom(name):
    def init(a: InitArgs) -> dict[str, torch.Tensor]:
        max_rank_check(name, a.r, a.d_out, a.d_in)
        # The slices of the base weight as stored, in float32.
        A, N, B = (t.to(torch.float32) for t in nystrom_init(a.W0, a.r))
        if a.basis is not None:  # IntTune's frozen pair as the run's basis file holds it
            A, B = a.basis["lora_A"], a.basis["lora_B"]
        return {"lora_A": A, "lora_N": N, "lora_B": B}

    return init


def _method(name, summary, **kw) -> Method:
    return Method(
        name=name,
        summary=summary,
        tensors=TENSORS,
        factors=lambda t, s: three_matrix_factors(t["lora_A"], t["lora_N"], t["lora_B"], s),
        forward=lambda t, s, x, W=None: s * mm(x, t["lora_A"], t["lora_N"], t["lora_B"]),
        check=_check,
        rank=lambda t: t["lora_A"].shape[0],
        shape=lambda t: (t["lora_B"].shape[0], t["lora_A"].shape[1]),
        # The fold skips forming B N: a Chain (L, C, R).
        chain=lambda t, s: (t["lora_B"], s * t["lora_N"].detach().to(torch.float64), t["lora_A"]),
        **kw,
    )


SLORA = register_method(_method(
    "slora", "dW = s B N A, A and N random, B = 0; s = alpha/r",
    trainable=TENSORS, init=_slora_init))
NLORA = register_method(_method(
    "nlora", "the same with the Nystrom init A = W0[:r], N = W0[:r,:r], B = W0[:,:r]",
    trainable=TENSORS, init=_nystrom("nlora"), needs_w0=True, frozen_variant="inttune"))
INTTUNE = register_method(_method(
    "inttune", "nlora's init with A and B frozen: only the r x r core N trains",
    shared=("lora_A", "lora_B"), shared_rule="nystrom", basis=_nystrom_basis,
    core=lambda t, s: three_matrix_core(t["lora_N"], s),
    trainable=("lora_N",), init=_nystrom("inttune"), needs_w0=True))
