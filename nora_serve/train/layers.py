"""Trainable adapter layers: each wraps a frozen ``nn.Linear`` and adds its method's output.

One generic layer, :class:`MethodLinear`, for every registered method: the method's trainable
tensors are parameters (float32 whatever the base dtype), its frozen ones buffers (so they never
reach the optimizer and are saved from exactly what the forward used), and its forward is the
method's own (``Method.forward``: the same function ``--verify`` runs; never a dense ``ΔW``).
"""

from __future__ import annotations

import torch
from torch import nn

from nora_serve.methods import Factors, Method, dyrank_importance, svd_outer
from nora_serve.methods.registry import kaiming_ as _kaiming_  # noqa: F401  (kept importable)


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


class MethodLinear(AdapterLinear):
    """A registered method's layer: ``tensors`` (the method's init) become parameters (the
    method's ``trainable``) or buffers (the rest); ``r`` is the rank the config records."""

    def __init__(self, base: nn.Linear, spec: Method, tensors: dict[str, torch.Tensor], scale: float,
                 r: int, *, dropout: float = 0.0):
        super().__init__(base, dropout)
        self.spec, self.method, self.r, self.scale = spec, spec.name, r, scale
        dev = base.weight.device
        for n in spec.tensors:
            t = tensors[n].to(dev, torch.float32).contiguous()
            if n in spec.trainable:
                self.register_parameter(n, nn.Parameter(t))
            else:
                self.register_buffer(n, t)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.spec.tensors}

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(n for n in self.spec.tensors if n not in self.spec.trainable)

    def delta(self, x):
        W = self.base.weight.to(torch.float32) if self.spec.needs_weight else None
        return self.spec.forward(self.tensors(), self.scale, x, W)

    def native_tensors(self):
        return {n: t.detach() for n, t in self.tensors().items()}

    def factors(self):
        return self.spec.factors(self.native_tensors(), self.scale)


class DyRankLinear(MethodLinear):
    """A method with ``dynamic_rank`` (dynamic-rank DoRA): ``ΔW = s · B diag(c) A`` over ``r0``
    single-rank components. ``pruned`` (a bool buffer) marks components whose ``c_k`` the pruner
    zeroes; the importance EMA lives here too, per module."""

    def __init__(self, base, spec, tensors, scale, r, *, dropout=0.0):
        super().__init__(base, spec, tensors, scale, r, dropout=dropout)
        dev = base.weight.device
        self.register_buffer("pruned", torch.zeros(r, dtype=torch.bool, device=dev))
        self.register_buffer("score", torch.zeros(r, device=dev))

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


def svd_outer_f32(W0: torch.Tensor, r: int, act_scale: torch.Tensor | None = None):
    """:func:`svd_outer` of the weight as stored, returned as float32 ``(A_o, B_o)``."""
    # The SVD itself runs in float64 (svd_outer); an exact upcast of bf16/fp16 weights first.
    A_o, B_o = svd_outer(W0.to(torch.float32), r, act_scale)
    return A_o, B_o
