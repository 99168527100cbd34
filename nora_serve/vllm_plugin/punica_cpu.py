"""A punica wrapper for vLLM's CPU platform that gets mixed batches right.

vLLM-CPU's torch ops index the stacked adapter weights with the per-token slot, and the
"no adapter" slot is -1, which Python indexing wraps to the *last* slot: base-model tokens
batched with adapter tokens get that adapter's delta. Its logits path also applies the
per-request slot table to per-token prompt hidden states when ``prompt_logprobs`` is asked
for, which fails as soon as two requests share a step. This wrapper groups rows by slot, skips
rows without an adapter, and maps prompt-logprob rows back to their tokens' slots.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from nora_serve import kernels

from .punica_nora import NoraLinearOpsMixin

# The hidden states whose row slices vLLM hands to ``compute_logits`` while computing prompt
# logprobs (set by the model-runner hook in ``hooks.py``): row i is scheduled token i.
_prompt_hidden_states: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "nora_prompt_hidden_states", default=None
)


@contextlib.contextmanager
def prompt_logprobs_rows(hidden_states: torch.Tensor):
    token = _prompt_hidden_states.set(hidden_states)
    try:
        yield
    finally:
        _prompt_hidden_states.reset(token)


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(slot, row_ids)]`` for every slot >= 0 present in ``indices``."""
    out = []
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        out.append((int(slot), (indices == slot).nonzero().squeeze(1)))
    return out


def _rows(indices: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` per-row slots; rows past the table (padding) have no adapter."""
    if indices.numel() >= n:
        return indices[:n]
    pad = torch.full((n - indices.numel(),), -1, dtype=indices.dtype, device=indices.device)
    return torch.cat([indices, pad])


def _w(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot of a stacked weight ``[max_loras, 1, a, b]`` (or ``[max_loras, a, b]``)."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


class NoraPunicaWrapperCPU(NoraLinearOpsMixin, PunicaWrapperCPU):
    """Drop-in for ``PunicaWrapperCPU`` with correct no-adapter rows and prompt-logprob logits,
    and the forward of the shared-basis layers."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        from . import hooks

        hooks.install_worker_hooks()

    # -- the per-row slot table for linear layers ------------------------------------------------
    def _token_slots(self, n: int) -> torch.Tensor:
        return _rows(self.token_lora_indices, n)

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._meta_cache: dict = {}
        from .worker import slot_ranks

        # Per-slot rank bound: the kernels read no further than this (unknown: the full rank).
        self._slot_ranks = torch.tensor(slot_ranks(lora_index_to_id), dtype=torch.int32)
        self._nora_refresh()

    def _nora_rows(self) -> int:
        return self.token_lora_indices.numel()

    def _nora_token_slots(self, n: int) -> torch.Tensor:
        return self._token_slots(n).to(torch.int32)

    def _nora_meta(self, tokens: torch.Tensor, num_slots: int, tag: str):
        return kernels.build_segment_meta(tokens, num_slots)

    def _meta(self, slots: torch.Tensor, max_loras: int):  # slots = self._token_slots(n)
        """Segment metadata for a slot table, built once per step and row count."""
        cache = getattr(self, "_meta_cache", None)
        if cache is None:
            cache = self._meta_cache = {}
        key = (slots.numel(), max_loras)  # the table for n rows is fixed within a step
        if key not in cache:
            cache[key] = kernels.build_segment_meta(slots.to(torch.int32), max_loras)
        return cache[key]

    def _full_ranks(self, stacked: torch.Tensor, rank_dim: int) -> torch.Tensor:
        """Rank to read per slot: the loaded adapter's rank (slots are zero past it), capped by
        the stacked (padded) rank."""
        full = stacked.shape[rank_dim]
        ranks = getattr(self, "_slot_ranks", None)
        if ranks is None or ranks.numel() != stacked.shape[0]:
            return torch.full((stacked.shape[0],), full, dtype=torch.int32)
        return torch.clamp(ranks, max=full)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked,
                        scale: float, output_slices, *, buffer=None, **kwargs: Any) -> None:
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        meta = self._meta(self._token_slots(x2.shape[0]), lora_a_stacked[0].shape[0])
        kernels.lora_linear(y2, x2, list(lora_a_stacked), list(lora_b_stacked), meta,
                      self._full_ranks(lora_a_stacked[0], -2), scale, 0)

    # -- linear layers -----------------------------------------------------------------------
    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs: Any):
        """``y[i][t, :r] = scale * x[t] @ A_i[slot_t].T`` for rows with an adapter, 0 elsewhere."""
        x = x.view(-1, x.shape[-1])
        groups = _groups(self._token_slots(x.shape[0]))
        for i, a_stacked in enumerate(lora_a_stacked):
            out = y[i].view(-1, y[i].shape[-1])
            r = a_stacked.shape[-2]
            out[:, :r] = 0
            for slot, rows in groups:
                a = _w(a_stacked, slot).to(out.dtype)  # [r, d_in]
                out[rows, :r] = scale * (x.index_select(0, rows).to(out.dtype) @ a.T)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs=True, **kwargs: Any) -> None:
        """``y[t, off_i:off_i+n_i] (+)= x[i][t] @ B_i[slot_t].T``; rows without an adapter get 0."""
        y2 = y.view(-1, y.shape[-1])
        groups = _groups(self._token_slots(y2.shape[0]))
        off = offset_start
        for i, b_stacked in enumerate(lora_b_stacked):
            n = output_slices[i]
            view = y2[:, off:off + n]
            if not add_inputs:
                view.zero_()
            xi = x[i].view(-1, x[i].shape[-1])
            for slot, rows in groups:
                b = _w(b_stacked, slot)  # [n, r]
                r = b.shape[-1]
                delta = xi.index_select(0, rows)[:, :r].to(y.dtype) @ b.to(y.dtype).T
                view.index_add_(0, rows, delta[:, :n])
            off += n

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> None:
        """``y += x @ B[slot].T`` row by row (embedding LoRA only needs the expand)."""
        y2 = y.view(-1, y.shape[-1])
        groups = _groups(self._token_slots(y2.shape[0]))
        if not add_inputs:
            y2.zero_()
        for slot, rows in groups:
            b = _w(lora_b_stacked, slot)
            r = b.shape[-1]
            delta = x.index_select(0, rows)[:, :r].to(y.dtype) @ b.to(y.dtype).T
            n = min(delta.shape[1], y2.shape[1])
            y2[:, :n].index_add_(0, rows, delta[:, :n])

    # -- logits --------------------------------------------------------------------------------
    def _logits_slots(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        per_request = self.sampler_indices
        if per_request.numel() == n:
            return per_request
        base = _prompt_hidden_states.get()
        if base is not None and base.dim() == 2 and x.dim() == 2 and base.stride(0) == x.stride(0):
            row_bytes = base.stride(0) * base.element_size()
            delta = x.data_ptr() - base.data_ptr()
            if delta >= 0 and delta % row_bytes == 0:
                start = delta // row_bytes
                if start + n <= base.shape[0]:
                    return _rows(self.token_lora_indices[start:], n)
        if self.token_lora_indices.numel() == n:
            return self.token_lora_indices
        raise RuntimeError(
            f"nora: cannot map {n} logits rows to adapters ({per_request.numel()} requests, "
            f"{self.token_lora_indices.numel()} tokens in this step)"
        )

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs: Any) -> None:
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if lora_b_stacked.shape[-2] <= y2.shape[1]:
            slots = self._logits_slots(x2).to(torch.int32)
            meta = kernels.build_segment_meta(slots, lora_a_stacked.shape[0])
            kernels.lora_linear(y2, x2, [lora_a_stacked], [lora_b_stacked], meta,
                          self._full_ranks(lora_a_stacked, -2), float(scale), 0)
            return
        for slot, rows in _groups(self._logits_slots(x2)):
            a = _w(lora_a_stacked, slot).float()  # [r, hidden]
            b = _w(lora_b_stacked, slot)  # [vocab, r]
            h = scale * (x2.index_select(0, rows).float() @ a.T)
            delta = h.to(y.dtype) @ b.to(y.dtype).T
            n = min(delta.shape[1], y2.shape[1])
            y2[:, :n].index_add_(0, rows, delta[:, :n])
