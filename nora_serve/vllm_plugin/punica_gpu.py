"""GPU punica wrapper: vLLM's LoRA linear ops on ``nora_serve.kernels``, and the forward of the
shared-basis layers (``punica_base.NoraPunicaOps``, as the CPU wrapper in ``punica_cpu.py``).

vLLM's Triton punica kernels run every slot up to the stacked (padded) rank, ``max_lora_rank``.
The nora segment kernels stop at each slot's true rank (the stacked weights are zero past it),
so a batch mixing rank-4 and rank-64 adapters costs what each one needs.

Everything the kernels read lives in persistent device buffers that ``update_metadata``
rewrites in place, outside the forward pass (as vLLM does with its ``LoRAKernelMeta``):
  * the per-row slot table, int32, -1 for rows past this step's mapping (padding rows of a
    CUDA-graph batch, which vLLM's own index table leaves holding stale slots);
  * the segment tables built from it (``SegmentMetaBuffers``);
  * the per-slot rank table (0 for an empty slot).
The forward pass only slices them, so it neither syncs with the host nor allocates persistent
state: a captured CUDA graph keeps their addresses and reads each step's values on replay, and
torch.compile traces it without graph breaks. Logits, embeddings and MoE stay with vLLM.

Shared-basis layers: per step, the token -> slot table becomes one table for the dense stack
(slot -> dense index) and one per basis group (the slot itself, -1 for tokens of other groups);
their segment metadata is built in ``update_metadata`` into persistent buffers, and every layer
reads views of it: one rank-aware LoRA op over the dense stack, then per slice and group one
shared-basis op (two dense GEMMs over the step's tokens, the slots' own cores gathered in
between), every group each step (no value-dependent work, so CUDA graphs replay it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

from nora_serve import kernels
from nora_serve.serving.state import WorkerState

from .log import logger
from .punica_base import NoraPunicaOps

if TYPE_CHECKING:
    from nora_serve.serving.storage import LayerWeights

_KERNELS: Any = False  # False: not tried yet; None: unusable


def _kernels():
    """``nora_serve.kernels``, or ``None`` where it cannot run (vLLM's own ops are used then)."""
    global _KERNELS
    if _KERNELS is False:
        try:
            import triton  # noqa: F401  (the kernels import it on first launch)

            _KERNELS = kernels
            logger.info("nora: LoRA linear ops on nora_serve.kernels (rank-aware segment GEMMs)")
        except Exception as e:  # kernels or triton missing / broken
            _KERNELS = None
            logger.warning("nora: nora_serve.kernels unusable (%s); using vLLM's punica kernels", e)
    return _KERNELS


class NoraPunicaWrapperGPU(PunicaWrapperGPU, NoraPunicaOps):
    """``PunicaWrapperGPU`` whose linear-layer ops read each slot only up to its true rank, and
    the forward of the shared-basis layers (module docstring). ``state``: the worker's
    :class:`~nora_serve.serving.state.WorkerState` (``hooks.py`` builds the wrapper with it; a
    fresh one by default)."""

    # (rows, plan version, [(tag, num_slots, meta)]) of the last shared-basis build.
    _nora_built: tuple | None = None

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, *,
                 state: WorkerState | None = None, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self.state = state if state is not None else WorkerState()
        self._max_tokens = max_num_batched_tokens
        # Rows of the current mapping; the slot table is -1 from here on.
        self._num_mapped = 0
        self._token_slots = torch.full((max_num_batched_tokens,), -1, dtype=torch.int32,
                                       device=device)
        # True rank per stacked slot, read by the kernels (also during graph replay).
        self._slot_ranks = torch.zeros(self.max_loras, dtype=torch.int32, device=device)
        self._last_ranks: list[int] | None = None
        # Segment tables of the slot table, per stacked slot count, refreshed by update_metadata.
        self._step_bufs: dict[int, Any] = {}
        # Buffers of segment_meta(), per (tag, slot count).
        self._meta_bufs: dict[tuple[str, int], Any] = {}
        k = _kernels()
        if k is not None:
            # Allocated here, never in the forward pass (torch.compile / graph capture).
            self._step_bufs[self.max_loras] = k.SegmentMetaBuffers(
                max_num_batched_tokens, self.max_loras, device)

    # -- per-step metadata -------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        if _kernels() is None:
            return
        n = min(self.indices_len[0] or 0, self._max_tokens)
        self._token_slots[:n].copy_(self._token_lora_indices[:n])
        self._token_slots[n:].fill_(-1)
        self._num_mapped = n
        self._fill_ranks(lora_index_to_id)
        for bufs in self._step_bufs.values():
            bufs.update(self._token_slots[:n])
        self._nora_refresh()

    def _fill_ranks(self, lora_index_to_id) -> None:
        """Per-slot rank into the persistent table, in place (the kernels keep its address)."""
        size = self._slot_ranks.numel()
        ranks = self.state.slot_ranks(lora_index_to_id)
        ranks = (ranks + [0] * size)[:size]
        if ranks == self._last_ranks:
            return
        # Pinned + non_blocking like vLLM's async_tensor_h2d: no host sync, and the caching
        # host allocator keeps the staging block alive until the copy has run.
        pin = self._slot_ranks.is_cuda
        src = torch.tensor(ranks, dtype=torch.int32, pin_memory=pin)
        self._slot_ranks.copy_(src, non_blocking=pin)
        self._last_ranks = ranks

    def token_slots(self, num_rows: int) -> torch.Tensor:
        """The slot of each of the first ``num_rows`` rows (int32, -1 = no adapter, also for
        padding rows): a view of a persistent buffer, safe to read inside a CUDA graph."""
        return self._token_slots[:num_rows]

    def segment_meta(self, token_slots: torch.Tensor, num_slots: int, tag: str = "lora"):
        """Segment metadata of ``token_slots`` (int32, -1 = no adapter, one per row) over
        ``num_slots`` slots, written in place into the persistent buffers of
        ``(tag, num_slots)`` (sized for ``max_num_batched_tokens`` rows) and returned as views
        of them: no host sync, so it may run inside CUDA-graph capture, where the replay
        re-reads ``token_slots`` (which must then be persistent too, e.g. ``token_slots()``).
        A new ``(tag, num_slots)`` allocates its buffers: use it once before capture."""
        k = _kernels()
        if k is None:
            raise RuntimeError("nora_serve.kernels is not usable here")
        key = (tag, int(num_slots))
        bufs = self._meta_bufs.get(key)
        if bufs is None:
            bufs = self._meta_bufs[key] = k.SegmentMetaBuffers(self._max_tokens, key[1],
                                                               self.device)
        return bufs.update(token_slots.to(torch.int32))

    def _step_meta(self, num_rows: int, num_slots: int):
        """This step's metadata for the first ``num_rows`` rows: views of the tables that
        update_metadata built, so the forward pass does no per-layer sorting."""
        if num_rows > self._max_tokens:
            raise ValueError(f"{num_rows} rows > max_num_batched_tokens={self._max_tokens}")
        bufs = self._step_bufs.get(num_slots)
        # Rows past the mapping are idle in the tables, so a view of at least the mapped rows
        # is exact. vLLM's linear layers always get that many (padded) rows; the check is left
        # out of torch.compile traces, where it would bake in this step's row count.
        if bufs is not None and (torch.compiler.is_compiling() or num_rows >= self._num_mapped):
            return bufs.view(num_rows)
        # Fewer rows than the mapping, or an unexpected slot count: build in place.
        return self.segment_meta(self._token_slots[:num_rows], num_slots, tag="nora.rows")

    def _ranks(self, num_slots: int, stacked_rank: int) -> torch.Tensor:
        """Ranks to read per slot, capped by the stacked rank (on device, no host sync)."""
        if num_slots > self._slot_ranks.numel():
            return torch.full((num_slots,), stacked_rank, dtype=torch.int32,
                              device=self._slot_ranks.device)
        return torch.clamp(self._slot_ranks[:num_slots], max=stacked_rank)

    # -- linear layers -----------------------------------------------------------------------
    def add_shrink(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                   scale: float, **kwargs: Any):
        """``y[i][t, :r] = scale * x[t] @ A_i[slot_t, :r].T``; the rest of ``y`` is zeroed.

        Fully sharded column layers shard A along the rank; reading up to min(true rank,
        shard rank) still covers every non-zero row of the shard."""
        k = _kernels()
        if k is None:
            return super().add_shrink(y, x, lora_a_stacked, scale, **kwargs)
        x = x.view(-1, x.shape[-1])
        a0 = lora_a_stacked[0]
        meta = self._step_meta(x.shape[0], a0.shape[0])
        k.lora_shrink(x, list(lora_a_stacked), y, meta, self._ranks(a0.shape[0], a0.shape[-2]),
                      scale)

    def add_expand(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: tuple[torch.Tensor, ...],
                   output_slices: tuple[int, ...], offset_start: int = 0, add_inputs=True,
                   **kwargs: Any) -> None:
        """``y[t, off_i:off_i+n_i] (+)= x[i][t, :r] @ B_i[slot_t, :, :r].T``; rows without an
        adapter are left alone (as vLLM's kernel does)."""
        k = _kernels()
        if k is None:
            return super().add_expand(y, x, lora_b_stacked, output_slices, offset_start,
                                      add_inputs, **kwargs)
        assert x.ndim == 3 and x.size(0) == len(output_slices) == len(lora_b_stacked)
        y2 = y.view(-1, y.shape[-1])
        b0 = lora_b_stacked[0]
        meta = self._step_meta(x.size(1), b0.shape[0])
        k.lora_expand(x, list(lora_b_stacked), y2, meta, self._ranks(b0.shape[0], b0.shape[-1]),
                      offset_start, add_inputs)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer=None, **kwargs: Any) -> None:
        """``y[t, slices] += scale * B[slot_t, :, :r] @ A[slot_t, :r] @ x[t]`` in one fused
        launch per slice, no intermediate buffer; rows without an adapter are left alone."""
        k = _kernels()
        if k is None:
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a0 = lora_a_stacked[0]
        num_slots, rank = a0.shape[0], a0.shape[-2]
        meta = self._step_meta(x2.shape[0], num_slots)
        ranks = self._ranks(num_slots, rank)
        if kwargs.get("add_inputs", True):
            k.lora_linear(y2, x2, list(lora_a_stacked), list(lora_b_stacked), meta, ranks,
                          scale, 0)
            return
        # add_inputs=False (vLLM's dual-stream path): adapter rows get the delta itself.
        h = torch.empty((len(output_slices), x2.shape[0], rank), dtype=torch.float32,
                        device=x2.device)
        k.lora_shrink(x2, list(lora_a_stacked), h, meta, ranks, scale)
        k.lora_expand(h, list(lora_b_stacked), y2, meta, ranks, 0, False)

    # -- layers with shared-basis storage ----------------------------------------------------
    def _nora_refresh(self, plan=None) -> None:
        """Build this step's shared-basis metadata (called at the end of ``update_metadata``)."""
        plan = plan or self.state.plan
        if plan is None:
            return
        n = self._num_mapped
        self._nora_built = (n, plan.version, self._nora_build(n, plan, ""))
        plan.refreshed_version = plan.version

    def _nora_build(self, n: int, plan, suffix: str):
        slots = self.token_slots(n)
        valid = slots >= 0
        safe = slots.clamp(min=0).long()
        none = torch.full_like(slots, -1)
        dense = torch.where(valid, plan.dense_of_slot[safe], none)
        group = torch.where(valid, plan.group_of_slot[safe], none)
        tables = [("nora_dense" + suffix, plan.dense_slots, dense)]
        tables += [(f"nora_group{g}{suffix}", plan.max_loras, torch.where(group == g, slots, none))
                   for g in range(plan.max_groups)]
        return [(tag, k, self.segment_meta(tok, k, tag)) for tag, k, tok in tables]

    def _nora_step(self, n: int, plan) -> list:
        built = self._nora_built
        if not torch.compiler.is_compiling():  # compiled graphs read what update_metadata built
            if built is None or built[1] != plan.version:
                self._nora_refresh(plan)  # the plan changed after the mapping (eager only)
                built = self._nora_built
            if n < built[0]:  # fewer rows than the mapping: tables of their own
                return [m for _, _, m in self._nora_build(n, plan, ".rows")]
        return [self._meta_bufs[(tag, int(k))].view(n) for tag, k, _ in built[2]]

    def add_nora_linear(self, y: torch.Tensor, x: torch.Tensor, w: LayerWeights) -> None:
        plan = w.plan
        dense_meta, *group_metas = self._nora_step(x.shape[0], plan)
        if w.out_scale.count:
            # PEFT DoRA. Decided on the host: a CUDA graph captured before a DoRA adapter was
            # loaded lacks it.
            self.scale_output(y, w, dense_meta.token_slot[: y.shape[0]].long())
        ranks = torch.clamp(plan.dense_ranks, max=w.lora_a[0].shape[-2])
        kernels.lora_linear(y, x, list(w.lora_a), list(w.lora_b), dense_meta, ranks, 1.0, 0)
        off = 0
        for i, width in enumerate(w.output_slices):
            for g, meta in enumerate(group_metas):
                kernels.shared_basis_linear(y, x, w.basis_a[i][g], w.basis_b[i][g], w.cores[i],
                                      plan.core_offsets, w.core_ranks[i], meta, 1.0, off)
            off += width
