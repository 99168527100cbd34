"""The one shape every method's delta is reduced to."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Factors(NamedTuple):
    """``ΔW = P @ Q`` with ``P: [d_out, k]`` and ``Q: [k, d_in]`` (``k`` may exceed the true rank)."""

    P: torch.Tensor
    Q: torch.Tensor

    @property
    def k(self) -> int:
        return self.P.shape[1]

    def dense(self) -> torch.Tensor:
        """The dense delta; for tests and tiny layers only."""
        return self.P @ self.Q

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ ΔWᵀ`` without forming ``ΔW``."""
        return (x @ self.Q.T.to(x.dtype)) @ self.P.T.to(x.dtype)
