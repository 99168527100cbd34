"""The forward of the shared-basis layers (``layers.py``), for both punica wrappers.

Per step, the token -> slot table becomes one table for the dense stack (slot -> dense index)
and one per basis group (the slot itself, -1 for tokens of other groups); each gets its segment
metadata once and every layer reuses it. Per layer: one rank-aware LoRA op over the dense
stack, then per slice and group one shared-basis op (two dense GEMMs over the step's tokens,
the slots' own cores gathered in between).
"""

from __future__ import annotations

import torch

from nora_serve import kernels


class NoraLinearOpsMixin:
    # CPU: skip groups without tokens (a host check is free there). GPU: run every group, so
    # the work does not depend on tensor values (CUDA graphs).
    _nora_skip_idle = True

    def _nora_token_slots(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _nora_meta(self, tokens: torch.Tensor, num_slots: int, tag: str) -> kernels.SegmentMeta:
        raise NotImplementedError

    def _nora_reset_step(self) -> None:
        self._nora_cache: dict = {}

    def _nora_step(self, n: int, plan):
        cache = getattr(self, "_nora_cache", None)
        if cache is None:
            cache = self._nora_cache = {}
        key = (n, plan.version)
        if key not in cache:
            slots = self._nora_token_slots(n)
            valid = slots >= 0
            safe = slots.clamp(min=0).long()
            none = torch.full_like(slots, -1)
            dense = torch.where(valid, plan.dense_of_slot[safe], none)
            group = torch.where(valid, plan.group_of_slot[safe], none)
            metas = [self._nora_meta_or_idle(dense, plan.dense_slots, "nora_dense")]
            for g in range(plan.max_groups):
                tok = torch.where(group == g, slots, none)
                metas.append(self._nora_meta_or_idle(tok, plan.max_loras, f"nora_group{g}"))
            cache[key] = metas
        return cache[key]

    def _nora_meta_or_idle(self, tokens, num_slots, tag):
        if self._nora_skip_idle and not bool((tokens >= 0).any()):
            return None
        return self._nora_meta(tokens, num_slots, tag)

    def add_nora_linear(self, y: torch.Tensor, x: torch.Tensor, layer) -> None:
        """``y += ΔW_slot x`` per row, for a layer with shared-basis storage."""
        plan = layer.nora_plan
        dense_meta, *group_metas = self._nora_step(x.shape[0], plan)
        if dense_meta is not None:
            ranks = torch.clamp(plan.dense_ranks, max=layer.lora_a_stacked[0].shape[-2])
            kernels.lora_linear(y, x, list(layer.lora_a_stacked), list(layer.lora_b_stacked),
                                dense_meta, ranks, 1.0, 0)
        off = 0
        for i, width in enumerate(layer.output_slices):
            for g, meta in enumerate(group_metas):
                if meta is None:
                    continue
                kernels.shared_basis_linear(
                    y, x, layer.nora_basis_a[i][g], layer.nora_basis_b[i][g], layer.nora_cores[i],
                    plan.core_offsets, layer.nora_core_ranks[i], meta, 1.0, off)
            off += width
