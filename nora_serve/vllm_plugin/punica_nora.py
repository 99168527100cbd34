"""The forward of the shared-basis layers (``layers.py``) on the GPU punica wrapper (the CPU
wrapper has its own, on ``kernels.cpu_step``: see ``punica_cpu.py``).

Per step, the token -> slot table becomes one table for the dense stack (slot -> dense index)
and one per basis group (the slot itself, -1 for tokens of other groups). Their segment
metadata is built in ``update_metadata``, outside the forward pass, as vLLM builds its own
(the GPU wrapper keeps it in persistent buffers, so CUDA graphs and torch.compile see fixed
addresses); every layer then reads views of it. Per layer: one rank-aware LoRA op over the
dense stack, then per slice and group one shared-basis op (two dense GEMMs over the step's
tokens, the slots' own cores gathered in between).
"""

from __future__ import annotations

import torch

from nora_serve import kernels

from .storage import LayerWeights


class NoraLinearOpsMixin:
    """Needs ``self.state`` (the worker's ``WorkerState``: its slot plan)."""

    # Skip groups without tokens only where a host check is free; the GPU wrapper runs every
    # group, so that the work does not depend on tensor values (CUDA graphs).
    _nora_skip_idle = True
    # (rows, plan version, [(tag, num_slots, meta or None)]) of the last build.
    _nora_built: tuple | None = None

    # -- per wrapper -----------------------------------------------------------------------
    def _nora_rows(self) -> int:
        """Rows of the current mapping."""
        raise NotImplementedError

    def _nora_token_slots(self, n: int) -> torch.Tensor:
        """int32 slot per row for the first ``n`` rows, -1 = no adapter."""
        raise NotImplementedError

    def _nora_meta(self, tokens: torch.Tensor, num_slots: int, tag: str) -> kernels.SegmentMeta:
        raise NotImplementedError

    def _nora_view(self, tag: str, num_slots: int, meta: kernels.SegmentMeta, n: int):
        return meta

    # -- shared ----------------------------------------------------------------------------
    def _nora_refresh(self, plan=None) -> None:
        """Build this step's metadata (called at the end of ``update_metadata``)."""
        plan = plan or self.state.plan
        if plan is None:
            return
        n = self._nora_rows()
        self._nora_built = (n, plan.version, self._nora_build(n, plan, ""))
        plan.refreshed_version = plan.version

    def _nora_build(self, n: int, plan, suffix: str):
        slots = self._nora_token_slots(n)
        valid = slots >= 0
        safe = slots.clamp(min=0).long()
        none = torch.full_like(slots, -1)
        dense = torch.where(valid, plan.dense_of_slot[safe], none)
        group = torch.where(valid, plan.group_of_slot[safe], none)
        tables = [("nora_dense" + suffix, plan.dense_slots, dense)]
        tables += [(f"nora_group{g}{suffix}", plan.max_loras, torch.where(group == g, slots, none))
                   for g in range(plan.max_groups)]
        out = []
        for tag, num_slots, tok in tables:
            idle = self._nora_skip_idle and not bool((tok >= 0).any())
            out.append((tag, num_slots, None if idle else self._nora_meta(tok, num_slots, tag)))
        return out

    def _nora_step(self, n: int, plan) -> list:
        built = self._nora_built
        if not torch.compiler.is_compiling():  # compiled graphs read what update_metadata built
            if built is None or built[1] != plan.version:
                self._nora_refresh(plan)  # the plan changed after the mapping (eager only)
                built = self._nora_built
            if n < built[0]:  # fewer rows than the mapping: tables of their own
                return [m for _, _, m in self._nora_build(n, plan, ".rows")]
        return [None if m is None else self._nora_view(tag, k, m, n) for tag, k, m in built[2]]

    def add_nora_linear(self, y: torch.Tensor, x: torch.Tensor, w: LayerWeights) -> None:
        """``y += ΔW_slot x`` per row, for a layer with shared-basis storage (``w``: its weights)."""
        plan = w.plan
        dense_meta, *group_metas = self._nora_step(x.shape[0], plan)
        scales = w.out_scale
        if dense_meta is not None and scales.count:
            # PEFT DoRA: scale the base output of its rows first (output_scale.py). Decided on
            # the host: a CUDA graph captured before a DoRA adapter was loaded lacks it.
            scales.apply(y, dense_meta.token_slot[: y.shape[0]].long())
        if dense_meta is not None:
            ranks = torch.clamp(plan.dense_ranks, max=w.lora_a[0].shape[-2])
            kernels.lora_linear(y, x, list(w.lora_a), list(w.lora_b),
                                dense_meta, ranks, 1.0, 0)
        off = 0
        for i, width in enumerate(w.output_slices):
            for g, meta in enumerate(group_metas):
                if meta is None:
                    continue
                kernels.shared_basis_linear(
                    y, x, w.basis_a[i][g], w.basis_b[i][g], w.cores[i],
                    plan.core_offsets, w.core_ranks[i], meta, 1.0, off)
            off += width
