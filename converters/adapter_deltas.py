"""What every reader returns: :class:`AdapterDeltas`, one :class:`ModuleEntry` per module.

An entry holds the method's raw tensors, its delta as factors ``ΔW = P Q`` (computed by
:mod:`nora_serve.methods`), and the method's own forward (used by ``--verify`` as an
independent recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from nora_serve.methods import Factors

from .fold import Chain


@dataclass
class ModuleEntry:
    raw: dict[str, torch.Tensor]  # the method's own tensors for this module
    factors: Callable[[torch.dtype], Factors]  # ΔW = P Q, computed in the given dtype
    forward: Callable[[torch.Tensor], torch.Tensor]  # x [n, d_in] -> x ΔWᵀ, the method's way
    source_rank: int
    shape: tuple[int, int]  # (d_out, d_in)
    # What the fold consumes: the factors, or a Chain (L, C, R) that skips forming L C.
    fold_input: Callable[[torch.dtype], "Factors | Chain"] | None = None
    scale: float = 1.0  # the method's scale s (the factors already hold it)

    def for_fold(self, dtype: torch.dtype):
        return (self.fold_input or self.factors)(dtype)


class _LazyFactors(Mapping):
    """``{module: Factors}`` computed on access (float64), so large adapters are never held
    twice in memory."""

    def __init__(self, entries: dict[str, ModuleEntry], dtype: torch.dtype = torch.float64):
        self._entries, self._dtype = entries, dtype

    def __getitem__(self, name: str) -> Factors:
        return self._entries[name].factors(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class AdapterDeltas:
    """An adapter read from disk, reduced to per-module deltas relative to the original base."""

    path: Path
    format: str
    method: str
    entries: dict[str, ModuleEntry]
    base_fingerprints: dict[str, str] | None = None
    shared_basis: dict | None = None
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32  # storage dtype of the source tensors
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # assumptions a reader made (e.g. a default)
    # A format_version 2 native adapter: the basis file it was read with (digest checked).
    basis_path: Path | None = None

    @property
    def modules(self) -> Mapping[str, Factors]:
        return _LazyFactors(self.entries)

    @property
    def source_ranks(self) -> dict[str, int]:
        return {m: e.source_rank for m, e in self.entries.items()}

    def factors(self, module: str, dtype: torch.dtype = torch.float64) -> Factors:
        return self.entries[module].factors(dtype)

    def forward(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` by the source method's own sequence of operations (not via the factors)."""
        return self.entries[module].forward(x)
