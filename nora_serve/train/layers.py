"""Trainable adapter layers: each wraps a frozen ``nn.Linear`` and adds its method's output.

One generic layer, :class:`MethodLinear`, for every registered method: the method's trainable
tensors are parameters (float32 whatever the base dtype), its frozen ones buffers (so they never
reach the optimizer and are saved from exactly what the forward used), and its forward is the
method's own (``Method.forward``: the same function ``--verify`` runs; never a dense ``ΔW``).
"""

from __future__ import annotations

import torch
from torch import nn

from nora_serve.methods import Factors, Method


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
