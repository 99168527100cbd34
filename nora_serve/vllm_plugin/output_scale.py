"""Per-slot output scales: what serves PEFT's DoRA per request.

A DoRA module computes ``y = v ⊙ (W x) + b + B' A x`` with ``v = m / ||W + s B A||`` per output
row and ``B' = s diag(v) B`` (``nora_serve.methods.dora``). ``B' A`` is an ordinary LoRA in the
adapter's slot; ``v`` is this table's row for that slot, applied to the base output of the rows
the slot serves before the LoRA is added. Rows of other slots (and of the base model) are scaled
by 1, bit for bit, so one batch mixes DoRA, other adapters and the base model.

Tensor parallelism: ``v`` is cut like a LoRA ``B`` (``slice_lora_b``: by output rows in a
column-parallel layer, whole in a row-parallel one). A row-parallel layer's output here is a
partial sum before the all-reduce, and the scale is linear, so each partial sum is scaled.
"""

from __future__ import annotations

import torch


class OutputScales:
    """One layer's scales by dense index: ``table[d + 1]`` scales the (packed, TP-local) output
    of rows served by dense index ``d``; ``table[0]`` stays 1. Only dense slots hold such
    adapters, so the table has ``dense_slots + 1`` rows whatever ``--max-loras`` is."""

    def __init__(self, layer, dense_slots: int):
        self.layer = layer
        ref = layer.lora_b_stacked[0]
        self.table = torch.ones(dense_slots + 1, sum(layer.output_slices), dtype=ref.dtype, device=ref.device)
        self.count = 0  # dense indices holding a scale: nothing to do while 0
        self._held = [False] * dense_slots
        # The base output holds the bias unless skip_bias_add (a row-parallel layer: on TP rank
        # 0 only, before the all-reduce). DoRA leaves the bias unscaled.
        from vllm.lora.layers import RowParallelLinearWithLoRA

        base = layer.base_layer
        on_rank = not (isinstance(layer, RowParallelLinearWithLoRA) and getattr(layer, "tp_rank", 0) > 0)
        self.bias = getattr(base, "bias", None) if on_rank and not getattr(base, "skip_bias_add", False) else None

    def set(self, dense: int, scales: list[torch.Tensor | None] | None) -> None:
        """``scales``: one vector per slice (the module's whole ``v``; ``None``: 1)."""
        if self._held[dense]:
            self.table[dense + 1].fill_(1)
            self._held[dense] = False
            self.count -= 1
        if not scales or all(v is None for v in scales):
            return
        row, off = self.table[dense + 1], 0
        for size, part in zip(self.layer.output_slices, _tp_slices(self.layer, scales)):
            if part is not None:
                if part.numel() != size:
                    raise ValueError(f"nora: an output scale of {part.numel()} rows for a slice of {size}")
                row[off:off + size].copy_(part)
            off += size
        self._held[dense] = True
        self.count += 1

    def apply(self, y: torch.Tensor, dense_of_row: torch.Tensor) -> None:
        """``y[i] *= table[dense_of_row[i] + 1]`` in place, the bias kept unscaled
        (``dense_of_row``: -1 for rows without a dense adapter)."""
        scale = self.table.index_select(0, dense_of_row + 1)
        if self.bias is not None:
            y.addcmul_(scale - 1, y - self.bias)  # y + (v - 1) ⊙ (y - b): rows at v = 1 stay exact
        else:
            y.mul_(scale)


def _tp_slices(layer, scales: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The TP-local part of each slice's scale, cut exactly as the layer cuts a LoRA ``B``."""
    if getattr(layer, "tp_size", 1) <= 1:
        return list(scales)
    cols = [s[:, None] if s is not None else None for s in scales]
    if layer.n_slices > 1:
        cut = layer.slice_lora_b(cols)
    else:
        cut = [layer.slice_lora_b(cols[0]) if cols[0] is not None else None]
    return [c[:, 0] if c is not None else None for c in cut]
