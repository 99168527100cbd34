"""The :class:`~.adapter_deltas.ModuleEntry` of one module of any registered method: its factors
and its own forward come from the method's definition (:mod:`nora_serve.methods`), shared by
every format that stores the method."""

from __future__ import annotations

from pathlib import Path

import torch

from nora_serve.methods import Method, get_method

from .adapter_deltas import ModuleEntry
from .errors import AdapterError
from .fold import Chain


def method_entry(method: Method | str, t: dict[str, torch.Tensor], scale: float, *,
                 raw: dict[str, torch.Tensor] | None = None, rank: int | None = None,
                 file: Path | None = None, what: str | None = None) -> ModuleEntry:
    """One module: ``t`` the method's tensors (short names) as the method computes with them,
    ``raw`` what the file held (default ``t``), ``rank`` the source rank (default the method's).
    A method that cannot be folded (``foldable`` False) gets factors that raise an
    :class:`AdapterError` naming ``file`` and ``what`` (how the file says it is that method)."""
    m = get_method(method) if isinstance(method, str) else method

    def factors(dt):
        if not m.foldable:
            raise AdapterError(
                f"{what or 'method ' + m.name}: its change of the weights is not a low-rank delta, "
                "so it cannot be folded into LoRA; serve it as it is: nora-serve MODEL "
                "--enable-nora, and request it as a LoRA by its name or path", file=file)
        return m.factors({k: v.detach().to(dt) for k, v in t.items()}, scale)

    return ModuleEntry(
        raw=dict(t) if raw is None else raw,
        factors=factors,
        forward=lambda x: m.forward(t, scale, x),
        source_rank=m.rank(t) if rank is None else rank,
        shape=m.shape(t),
        fold_input=(lambda dt: Chain(*m.chain(t, scale))) if m.chain is not None else None,
        scale=scale,
    )


def _dyrank_entry(A, c, B, scale, pruned=None) -> ModuleEntry:
    """Dynamic-rank DoRA with the official checkpoint's pruning mask (True = pruned): the method
    computes with ``c`` zeroed where pruned."""
    raw = {"lora_A": A, "lora_c": c, "lora_B": B}
    if pruned is not None:
        raw["pruned"] = pruned
        c = torch.where(~pruned, c, torch.zeros_like(c))
    return method_entry("dyrank", {"lora_A": A, "lora_c": c, "lora_B": B}, scale, raw=raw)
