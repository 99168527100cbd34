"""Trainable adapter layers: each wraps a frozen ``nn.Linear`` and adds its method's delta.

Every layer runs its method's natural forward (never a dense ``ΔW``), keeps its trainable
factors in float32 whatever the base dtype, and returns its native tensors for saving
(:data:`nora_serve.converters.native.METHOD_TENSORS`). Frozen factors are buffers, so they
never reach the optimizer and are saved from exactly what the forward used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nora_serve.methods import (
    Factors,
    dyrank_factors,
    dyrank_importance,
    lora_factors,
    lora_scale,
    nora_factors,
    nystrom_init,
    svd_outer,
    three_matrix_factors,
)


def _kaiming_(t: torch.Tensor, gen: torch.Generator | None, a: float = math.sqrt(5)) -> torch.Tensor:
    """``nn.init.kaiming_uniform_`` (fan_in = t.shape[1]) drawn from ``gen``."""
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound)
    return t


class AdapterLinear(nn.Module):
    """Base class: ``y = base(x) + delta(x)``; subclasses define ``delta`` and ``native_tensors``."""

    method: str = ""

    def __init__(self, base: nn.Linear, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        # Some HF code reads ``<proj>.weight`` (dtype/device probes): point it at the base.
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x).to(torch.float32)
        return y + self.delta(h).to(y.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # x is float32
        raise NotImplementedError

    def native_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def factors(self) -> Factors:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}"


class LoRALinear(AdapterLinear):
    """``ΔW = s · B A``; A kaiming-uniform, B = 0 (PEFT's default init)."""

    method = "lora"

    def __init__(self, base, r, alpha, *, use_rslora=False, dropout=0.0, gen=None):
        super().__init__(base, dropout)
        self.r, self.scale = r, lora_scale(alpha, r, use_rslora)
        self.lora_A = nn.Parameter(_kaiming_(torch.empty(r, self.in_features), gen))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))

    def delta(self, x):
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    def native_tensors(self):
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def factors(self):
        return lora_factors(self.lora_A.detach(), self.lora_B.detach(), self.scale)


class NoRALinear(AdapterLinear):
    """``ΔW = s · B_o (B_i A_i) A_o``: outer pair frozen (given, from :func:`svd_outer`),
    inner pair trained from ``B_i = 0`` so the model starts at the base; ``s = alpha / r'``."""

    method = "nora"

    def __init__(self, base, outer_A, outer_B, inner_r, alpha, *, dropout=0.0, gen=None):
        super().__init__(base, dropout)
        r = outer_A.shape[0]
        if not 0 < inner_r < r:
            raise ValueError(f"NoRA needs 0 < inner_rank < rank, got inner_rank={inner_r}, rank={r}")
        self.r, self.inner_r, self.scale = r, inner_r, alpha / inner_r
        dev = base.weight.device
        self.register_buffer("outer_A", outer_A.to(dev, torch.float32).contiguous())
        self.register_buffer("outer_B", outer_B.to(dev, torch.float32).contiguous())
        self.inner_A = nn.Parameter(_kaiming_(torch.empty(inner_r, r), gen).to(dev))
        self.inner_B = nn.Parameter(torch.zeros(r, inner_r, device=dev))

    def delta(self, x):
        h = x @ self.outer_A.T
        h = (h @ self.inner_A.T) @ self.inner_B.T
        return h @ self.outer_B.T * self.scale

    def native_tensors(self):
        return {
            "outer_A": self.outer_A,
            "outer_B": self.outer_B,
            "inner_A": self.inner_A.detach(),
            "inner_B": self.inner_B.detach(),
        }

    def factors(self):
        return nora_factors(self.outer_A, self.outer_B, self.inner_A.detach(), self.inner_B.detach(), self.scale)


class ThreeMatrixLinear(AdapterLinear):
    """``ΔW = s · B N A`` with ``s = alpha / r``.

    slora: A, N kaiming-uniform, B = 0. nlora: ``A = W0[:r]``, ``N = W0[:r, :r]``,
    ``B = W0[:, :r]`` (base not residualised, so ``ΔW != 0`` at step 0). inttune: the nlora
    init with A and B frozen (buffers); only N trains.
    """

    def __init__(self, base, method, r, alpha, *, W0=None, dropout=0.0, gen=None):
        super().__init__(base, dropout)
        if method not in ("slora", "nlora", "inttune"):
            raise ValueError(f"not a three-matrix method: {method!r}")
        self.method, self.r, self.scale = method, r, alpha / r
        dev = base.weight.device
        if method == "slora":
            A = _kaiming_(torch.empty(r, self.in_features), gen)
            N = _kaiming_(torch.empty(r, r), gen)
            B = torch.zeros(self.out_features, r)
        else:
            # The slices of the base weight as stored (see trainer), in float32.
            A, N, B = (t.to(torch.float32) for t in nystrom_init(W0, r))
        A, N, B = A.to(dev), N.to(dev), B.to(dev)
        if method == "inttune":
            self.register_buffer("lora_A", A.contiguous())
            self.register_buffer("lora_B", B.contiguous())
        else:
            self.lora_A = nn.Parameter(A.contiguous())
            self.lora_B = nn.Parameter(B.contiguous())
        self.lora_N = nn.Parameter(N.contiguous())

    def delta(self, x):
        return ((x @ self.lora_A.T) @ self.lora_N.T) @ self.lora_B.T * self.scale

    def native_tensors(self):
        return {"lora_A": self.lora_A.detach(), "lora_N": self.lora_N.detach(), "lora_B": self.lora_B.detach()}

    def factors(self):
        return three_matrix_factors(self.lora_A.detach(), self.lora_N.detach(), self.lora_B.detach(), self.scale)


class DyRankLinear(AdapterLinear):
    """Dynamic-rank DoRA: ``ΔW = s · B diag(c) A`` over ``r0`` single-rank components.

    ``c = 0`` at the start and A, B kaiming-uniform (as the official code: gain for a = 0);
    ``s = alpha / r0`` stays fixed after pruning. ``pruned`` (a bool buffer) marks components
    whose ``c_k`` the pruner zeroes; the importance EMA lives here too, per module.
    """

    method = "dyrank"

    def __init__(self, base, r0, alpha, *, dropout=0.0, gen=None):
        super().__init__(base, dropout)
        self.r, self.scale = r0, alpha / r0
        dev = base.weight.device
        self.lora_A = nn.Parameter(_kaiming_(torch.empty(r0, self.in_features), gen, a=0.0).to(dev))
        self.lora_c = nn.Parameter(torch.zeros(r0, device=dev))
        self.lora_B = nn.Parameter(_kaiming_(torch.empty(self.out_features, r0), gen, a=0.0).to(dev))
        self.register_buffer("pruned", torch.zeros(r0, dtype=torch.bool, device=dev))
        self.register_buffer("score", torch.zeros(r0, device=dev))

    def delta(self, x):
        return ((x @ self.lora_A.T) * self.lora_c) @ self.lora_B.T * self.scale

    @torch.no_grad()
    def update_score(self, beta: float, eps: float = 1e-8) -> None:
        s = dyrank_importance(self.lora_A, self.lora_c, self.lora_B, eps)
        self.score.mul_(beta).add_((1 - beta) * s.to(self.score.device))

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_c[self.pruned] = 0

    @property
    def true_rank(self) -> int:
        return int((self.lora_c.detach() != 0).sum())

    def native_tensors(self):
        return {"lora_A": self.lora_A.detach(), "lora_c": self.lora_c.detach(), "lora_B": self.lora_B.detach()}

    def factors(self):
        return dyrank_factors(self.lora_A.detach(), self.lora_c.detach(), self.lora_B.detach(), self.scale)


def svd_outer_f32(W0: torch.Tensor, r: int, act_scale: torch.Tensor | None = None):
    """:func:`svd_outer` of the weight as stored, returned as float32 ``(A_o, B_o)``."""
    # The SVD itself runs in float64 (svd_outer); an exact upcast of bf16/fp16 weights first.
    A_o, B_o = svd_outer(W0.to(torch.float32), r, act_scale)
    return A_o, B_o
