"""CPU path: one GEMM per adapter segment.

vLLM's CPU ops gather a full padded weight per *token* (index_select of
[max_rank, d_in] per row, then einsum); here the tokens are gathered once in
slot order and each segment of same-slot tokens is one GEMM against the slot's
weight cut to its true rank, so no weight is copied and nothing past the rank
is read. Segment bounds are read on the host (a sync is free on the CPU).

fp16 GEMMs run in fp32 (CPU fp16 GEMMs are very slow); bf16/fp32 run natively.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metadata import SegmentMeta
from .reference import as_3d


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t in a dtype the CPU handles well; b_t is usually a transposed view."""
    if a.dtype == torch.float16 or b_t.dtype == torch.float16 or a.dtype != b_t.dtype:
        return a.float() @ b_t.float()
    return a @ b_t


def _out_dtype(w: torch.Tensor) -> torch.dtype:
    """dtype of a product with w as _mm computes it (fp16 runs in fp32)."""
    return torch.float32 if w.dtype == torch.float16 else w.dtype


def _segments(seg_slot, seg_start, seg_len):
    return [
        (s, b, n)
        for s, b, n in zip(seg_slot.tolist(), seg_start.tolist(), seg_len.tolist())
        if s >= 0 and n > 0
    ]


def slice_ranks(ranks: torch.Tensor, s: int) -> torch.Tensor:
    """ranks is [max_loras] (all slices alike) or [num_slices, max_loras]."""
    return ranks[s] if ranks.dim() == 2 else ranks


def _adapter_tokens(sorted_tokens: torch.Tensor, segs) -> torch.Tensor:
    # Adapter tokens come first in sorted order (no-adapter tokens sort last).
    n = sum(n for _, _, n in segs)
    return sorted_tokens[:n].to(torch.int64)


def shrink_impl(x, lora_a, out, sorted_tokens, seg_slot, seg_start, seg_len, ranks, scale):
    out.zero_()
    segs = _segments(seg_slot, seg_start, seg_len)
    if not segs:
        return
    idx = _adapter_tokens(sorted_tokens, segs)
    xs = x.index_select(0, idx)
    R = out.shape[-1]
    for s, w in enumerate(lora_a):
        w = as_3d(w)
        rk = slice_ranks(ranks, s).tolist()
        res = torch.zeros(idx.numel(), R, dtype=out.dtype)
        for slot, b, n in segs:
            r = rk[slot]
            if r > 0:
                res[b : b + n, :r] = _mm(xs[b : b + n], w[slot, :r].t()) * scale
        out[s].index_copy_(0, idx, res)


def expand_impl(inp, lora_b, y, sorted_tokens, seg_slot, seg_start, seg_len, ranks,
                offset_start, add_inputs):
    segs = _segments(seg_slot, seg_start, seg_len)
    if not segs:
        return
    idx = _adapter_tokens(sorted_tokens, segs)
    ins = inp.index_select(1, idx)
    off = offset_start
    for s, w in enumerate(lora_b):
        w = as_3d(w)
        rk = slice_ranks(ranks, s).tolist()
        n_out = w.shape[1]
        res = torch.zeros(idx.numel(), n_out, dtype=_out_dtype(w))
        for slot, b, n in segs:
            r = rk[slot]
            if r > 0:
                res[b : b + n] = _mm(ins[s, b : b + n, :r].to(w.dtype), w[slot, :, :r].t())
        view = y[:, off : off + n_out]
        if add_inputs:
            view.index_add_(0, idx, res.to(y.dtype))
        else:
            view.index_copy_(0, idx, res.to(y.dtype))
        off += n_out


def linear_impl(y, x, lora_a, lora_b, sorted_tokens, seg_slot, seg_start, seg_len, ranks,
                scale, offset_start):
    """Fused shrink+expand: per segment (x_seg A[:r]^T * scale) B[:, :r]^T, then one
    scatter-add per slice."""
    segs = _segments(seg_slot, seg_start, seg_len)
    if not segs:
        return
    idx = _adapter_tokens(sorted_tokens, segs)
    xs = x.index_select(0, idx)
    off = offset_start
    for s, (wa, wb) in enumerate(zip(lora_a, lora_b)):
        wa, wb = as_3d(wa), as_3d(wb)
        rk = slice_ranks(ranks, s).tolist()
        n_out = wb.shape[1]
        res = torch.zeros(idx.numel(), n_out, dtype=_out_dtype(wb))
        for slot, b, n in segs:
            r = rk[slot]
            if r > 0:
                h = _mm(xs[b : b + n], wa[slot, :r].t())
                h.mul_(scale)
                res[b : b + n] = _mm(h.to(wb.dtype), wb[slot, :, :r].t())
        y[:, off : off + n_out].index_add_(0, idx, res.to(y.dtype))
        off += n_out


def _apply_cores(hs, cores_flat, core_offsets, ranks, segs, out):
    """out[t, :r] = C_slot @ hs[t, :r] for the (slot-sorted) adapter rows of hs.

    Cores are r x r and tiny, so rather than one small GEMM per segment (Python
    overhead dominates with hundreds of segments) segments are bucketed by rank:
    per bucket, one copy of its cores and one batched matmul."""
    rk = ranks.tolist()
    offs = core_offsets.tolist()
    buckets: dict[int, list[tuple[int, int, int]]] = {}
    for seg in segs:
        if rk[seg[0]] > 0:
            buckets.setdefault(rk[seg[0]], []).append(seg)
    for r, lst in buckets.items():
        c = torch.stack([cores_flat[offs[s] : offs[s] + r * r] for s, _, _ in lst]).view(-1, r, r)
        rows = torch.tensor([i for _, b, n in lst for i in range(b, b + n)])
        if any(n > 1 for _, _, n in lst):
            c = c[torch.tensor([j for j, (_, _, n) in enumerate(lst) for _ in range(n)])]
        hr = hs[rows, :r].to(c.dtype)
        if c.dtype == torch.float16:
            c, hr = c.float(), hr.float()
        out[rows, :r] = torch.bmm(c, hr.unsqueeze(-1)).squeeze(-1).to(out.dtype)


def core_gather_impl(h, cores_flat, core_offsets, ranks, g, sorted_tokens, seg_slot, seg_start,
                     seg_len, scale):
    g.zero_()
    segs = _segments(seg_slot, seg_start, seg_len)
    if not segs:
        return
    idx = _adapter_tokens(sorted_tokens, segs)
    res = torch.zeros(idx.numel(), g.shape[1], dtype=g.dtype)
    _apply_cores(h.index_select(0, idx), cores_flat, core_offsets, ranks, segs, res)
    if scale != 1.0:
        res.mul_(scale)
    g.index_copy_(0, idx, res)


# ---- public CPU entry points (take a SegmentMeta) -------------------------------------


def lora_shrink_cpu(x, lora_a: Sequence[torch.Tensor], out, meta: SegmentMeta, ranks, scale=1.0):
    shrink_impl(x, lora_a, out, meta.sorted_tokens, meta.seg_slot, meta.seg_start, meta.seg_len,
                ranks, scale)


def lora_expand_cpu(inp, lora_b: Sequence[torch.Tensor], y, meta: SegmentMeta, ranks,
                    offset_start=0, add_inputs=True):
    expand_impl(inp, lora_b, y, meta.sorted_tokens, meta.seg_slot, meta.seg_start, meta.seg_len,
                ranks, offset_start, add_inputs)


def lora_linear_cpu(y, x, lora_a, lora_b, meta: SegmentMeta, ranks, scale=1.0, offset_start=0):
    linear_impl(y, x, lora_a, lora_b, meta.sorted_tokens, meta.seg_slot, meta.seg_start,
                meta.seg_len, ranks, scale, offset_start)


def _dense_expand(y, y_offset, g, b_shared):
    """y[:, off:off+d_out] += g @ B^T over all tokens (rows with g = 0 stay exact)."""
    view = y[:, y_offset : y_offset + b_shared.shape[0]]
    if y.dtype == torch.float16 or g.dtype != b_shared.dtype:
        view += _mm(g, b_shared.t()).to(y.dtype)
    else:
        view.addmm_(g, b_shared.t())


def shared_basis_linear_cpu(y, x, a_shared, b_shared, cores_flat, core_offsets, ranks,
                            meta: SegmentMeta, scale=1.0, y_offset=0):
    """Two dense GEMMs over all tokens, the r x r cores gathered in between."""
    segs = meta.host_segments()
    if not segs:
        return
    idx = _adapter_tokens(meta.sorted_tokens, segs)
    h = _mm(x, a_shared.t())
    gs = torch.zeros(idx.numel(), h.shape[1], dtype=h.dtype)
    _apply_cores(h.index_select(0, idx), cores_flat, core_offsets, ranks, segs, gs)
    g = torch.zeros_like(h)
    g.index_copy_(0, idx, gs)
    if scale != 1.0:
        g.mul_(scale)
    _dense_expand(y, y_offset, g.to(b_shared.dtype), b_shared)


def shared_basis_inner_linear_cpu(y, x, a_shared, b_shared, inner_a, inner_b, ranks,
                                  meta: SegmentMeta, scale=1.0, y_offset=0):
    """NoRA: dense x A_o^T, per-segment inner pair (A_i then B_i, cut to r'), dense B_o,
    the dense products over all tokens."""
    segs = meta.host_segments()
    if not segs:
        return
    idx = _adapter_tokens(meta.sorted_tokens, segs)
    h = _mm(x, a_shared.t())
    hs = h.index_select(0, idx)
    ia, ib = as_3d(inner_a), as_3d(inner_b)
    rk = ranks.tolist()
    gs = torch.zeros_like(hs)
    for slot, b, n in segs:
        r = rk[slot]
        if r > 0:
            u = _mm(hs[b : b + n].to(ia.dtype), ia[slot, :r].t())
            gs[b : b + n] = _mm(u.to(ib.dtype), ib[slot, :, :r].t()).to(gs.dtype)
    g = torch.zeros_like(h)
    g.index_copy_(0, idx, gs)
    if scale != 1.0:
        g.mul_(scale)
    _dense_expand(y, y_offset, g.to(b_shared.dtype), b_shared)
