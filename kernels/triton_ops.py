"""Triton kernels (GPU) and the `nora::*` custom ops that launch them.

Triton is imported lazily, on the first GPU (or interpreted) launch. The CPU server
does not come here: it runs ``cpu_step`` (its own route per step, no segment tables).
Every launch takes its grid from tensor shapes only (number of row tiles, rank/out
blocks), reads the slot, the rank and the token rows from device tensors, and never
syncs with the host: safe under CUDA graph capture. Idle tiles (slot -1) and blocks past a slot's rank return at once.

Under TRITON_INTERPRET=1 (CPU tensors) the kernels run in numpy, which gets
bf16 `tl.dot` wrong; there the operands are upcast to fp32 (DOT_F32).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from .metadata import SegmentMeta
from .reference import as_3d

SHRINK_BLOCK_N = 16
SHRINK_BLOCK_K = 128
EXPAND_BLOCK_N = 128
EXPAND_BLOCK_K = 16
FUSED_BLOCK_K = 128
FUSED_BLOCK_N = 128
# Fused path: aim for about this many programs per launch (2 per SM on an H100).
FUSED_TARGET_PROGRAMS = 264


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dot_f32(*tensors: torch.Tensor) -> bool:
    return _interpreting() and any(t.dtype == torch.bfloat16 for t in tensors)


def slice_ranks(ranks: torch.Tensor, s: int) -> torch.Tensor:
    """ranks is [max_loras] (all slices alike) or [num_slices, max_loras]."""
    return ranks[s] if ranks.dim() == 2 else ranks


def _pow2_at_least(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


# Bound on first use; module globals so the JIT (and the interpreter, which does
# not see closures) resolves them, the @triton.jit helpers included.
triton = tl = None
_tile_tokens = _dot = _rows_dot_cols = _store_rows = None


@functools.cache
def _kernels():
    global triton, tl, _tile_tokens, _dot, _rows_dot_cols, _store_rows
    import triton
    import triton.language as tl

    # Pieces shared by the kernels; the JIT inlines them. The idle-tile / rank
    # early exits stay in each kernel: a `return` in a helper would not end it.

    @triton.jit
    def _tile_tokens(sorted_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M: tl.constexpr):
        """The tile's token rows (int64; row 0 past the tile's length) and row mask."""
        start = tl.load(tile_start_ptr + tile)
        mlen = tl.load(tile_len_ptr + tile)
        offs_m = tl.arange(0, BLOCK_M)
        mmask = offs_m < mlen
        tok = tl.load(sorted_ptr + start + offs_m, mask=mmask, other=0).to(tl.int64)
        return tok, mmask

    @triton.jit
    def _dot(a, b, DOT_F32: tl.constexpr):
        """a @ b, fp32 result: a cast to b's dtype, or both upcast under DOT_F32."""
        if DOT_F32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            out = tl.dot(a.to(b.dtype), b)
        return out

    @triton.jit
    def _rows_dot_cols(a_rows, sak, amask, b_cols, sbk, bmask, K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_F32: tl.constexpr):
        """fp32 [BLOCK_M, BLOCK_N]: sum over k < K of a_rows[m][k * sak] * b_cols[n][k * sbk],
        rows / columns outside amask / bmask and k >= K read as 0."""
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            a = tl.load(a_rows + kk[None, :] * sak, mask=amask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_cols + kk[:, None] * sbk, mask=kmask[:, None] & bmask[None, :], other=0.0)
            acc += _dot(a, b, DOT_F32)
        return acc

    @triton.jit
    def _store_rows(y_ptr, tok, mmask, offs_n, nmask, y_off, sy0, sy1, acc,
                    ADD_INPUTS: tl.constexpr):
        """y[tok, y_off + offs_n] (+)= acc on the masked rows / columns."""
        yp = y_ptr + tok[:, None] * sy0 + (y_off + offs_n[None, :]) * sy1
        m2 = mmask[:, None] & nmask[None, :]
        if ADD_INPUTS:
            acc += tl.load(yp, mask=m2, other=0.0).to(tl.float32)
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def shrink_kernel(
        x_ptr, w_ptr, out_ptr, sorted_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, ranks_ptr,
        scale, K, sx0, sx1, sw0, sw1, sw2, so0, so1,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile)
        if slot < 0:
            return
        r = tl.load(ranks_ptr + slot)
        n0 = pid_n * BLOCK_N
        if n0 >= r:  # rank-aware: no block past the slot's rank runs
            return
        tok, mmask = _tile_tokens(sorted_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < r
        x_rows = x_ptr + tok[:, None] * sx0
        w_rows = w_ptr + slot.to(tl.int64) * sw0 + offs_n[None, :] * sw1
        acc = _rows_dot_cols(x_rows, sx1, mmask, w_rows, sw2, nmask, K,
                             BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
        out = out_ptr + tok[:, None] * so0 + offs_n[None, :] * so1
        tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def expand_kernel(
        in_ptr, w_ptr, y_ptr, sorted_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr, ranks_ptr,
        N, y_off, si0, si1, sw0, sw1, sw2, sy0, sy1,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ADD_INPUTS: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(tile_slot_ptr + tile)
        if slot < 0:
            return
        r = tl.load(ranks_ptr + slot)
        if ADD_INPUTS:
            if r == 0:
                return
        tok, mmask = _tile_tokens(sorted_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        in_rows = in_ptr + tok[:, None] * si0
        w_rows = w_ptr + slot.to(tl.int64) * sw0 + offs_n[None, :] * sw1
        # The K loop stops at the slot's rank: nothing past it is read.
        acc = _rows_dot_cols(in_rows, si1, mmask, w_rows, sw2, nmask, r,
                             BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
        _store_rows(y_ptr, tok, mmask, offs_n, nmask, y_off, sy0, sy1, acc, ADD_INPUTS)

    @triton.jit
    def fused_kernel(
        x_ptr, a_ptr, b_ptr, y_ptr, sorted_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
        ranks_ptr, scale, K, N, y_off,
        sx0, sx1, sa0, sa1, sa2, sb0, sb1, sb2, sy0, sy1,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # Program (tile, p): the tile's shrink x A[:r]^T (recomputed by each p; A
        # is small and stays in L2), then out blocks p, p + P, p + 2P, ...
        tile = tl.program_id(0)
        pid = tl.program_id(1)
        nprog = tl.num_programs(1)
        slot = tl.load(tile_slot_ptr + tile)
        if slot < 0:
            return
        r = tl.load(ranks_ptr + slot)
        if r == 0:
            return
        tok, mmask = _tile_tokens(sorted_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < r
        x_rows = x_ptr + tok[:, None] * sx0
        a_rows = a_ptr + slot.to(tl.int64) * sa0 + offs_r[None, :] * sa1
        h = _rows_dot_cols(x_rows, sx1, mmask, a_rows, sa2, rmask, K,
                           BLOCK_M, BLOCK_R, BLOCK_K, DOT_F32)
        h = h * scale
        b_rows = b_ptr + slot.to(tl.int64) * sb0 + offs_r[:, None] * sb2
        for nb in range(pid, tl.cdiv(N, BLOCK_N), nprog):
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            wb = tl.load(b_rows + offs_n[None, :] * sb1, mask=rmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(h, wb, DOT_F32)
            _store_rows(y_ptr, tok, mmask, offs_n, nmask, y_off, sy0, sy1, acc, True)  # y += acc

    @triton.jit
    def core_kernel(
        h_ptr, c_ptr, coff_ptr, g_ptr, sorted_ptr, tile_slot_ptr, tile_start_ptr, tile_len_ptr,
        ranks_ptr, scale, sh0, sh1, sg0, sg1,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # g[t, i] = scale * sum_{j<r} C[i, j] h[t, j], C row-major r x r at cores[off:].
        tile = tl.program_id(0)
        slot = tl.load(tile_slot_ptr + tile)
        if slot < 0:
            return
        r = tl.load(ranks_ptr + slot)
        if r == 0:
            return
        off = tl.load(coff_ptr + slot).to(tl.int64)
        tok, mmask = _tile_tokens(sorted_ptr, tile_start_ptr, tile_len_ptr, tile, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = offs_r < r
        hh = tl.load(h_ptr + tok[:, None] * sh0 + offs_r[None, :] * sh1,
                     mask=mmask[:, None] & rmask[None, :], other=0.0)
        # ct[j, i] = C[i, j]
        ct = tl.load(c_ptr + off + offs_r[None, :] * r + offs_r[:, None],
                     mask=rmask[:, None] & rmask[None, :], other=0.0)
        g = _dot(hh, ct, DOT_F32)
        tl.store(g_ptr + tok[:, None] * sg0 + offs_r[None, :] * sg1,
                 (g * scale).to(g_ptr.dtype.element_ty), mask=mmask[:, None] & rmask[None, :])

    return shrink_kernel, expand_kernel, fused_kernel, core_kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- Triton launchers on raw tensors (work on CUDA, and on CPU under TRITON_INTERPRET=1) ----


def shrink_triton(x, lora_a, out, sorted_tokens, tile_slot, tile_start, tile_len, ranks, scale,
                  block_m):
    shrink_kernel = _kernels()[0]
    out.zero_()
    n_tiles = tile_slot.shape[0]
    if n_tiles == 0:
        return
    for s, w in enumerate(lora_a):
        w = as_3d(w)
        R, K = w.shape[1], w.shape[2]
        o = out[s]
        grid = (n_tiles, _cdiv(R, SHRINK_BLOCK_N))
        shrink_kernel[grid](
            x, w, o, sorted_tokens, tile_slot, tile_start, tile_len, slice_ranks(ranks, s),
            float(scale), K,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), o.stride(0), o.stride(1),
            BLOCK_M=block_m, BLOCK_N=SHRINK_BLOCK_N, BLOCK_K=SHRINK_BLOCK_K,
            DOT_F32=_dot_f32(x, w),
        )


def expand_triton(inp, lora_b, y, sorted_tokens, tile_slot, tile_start, tile_len, ranks,
                  offset_start, add_inputs, block_m):
    expand_kernel = _kernels()[1]
    n_tiles = tile_slot.shape[0]
    if n_tiles == 0:
        return
    off = offset_start
    for s, w in enumerate(lora_b):
        w = as_3d(w)
        N = w.shape[1]
        i = inp[s]
        grid = (n_tiles, _cdiv(N, EXPAND_BLOCK_N))
        expand_kernel[grid](
            i, w, y, sorted_tokens, tile_slot, tile_start, tile_len, slice_ranks(ranks, s),
            N, off,
            i.stride(0), i.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=EXPAND_BLOCK_K,
            ADD_INPUTS=bool(add_inputs), DOT_F32=_dot_f32(w, y),
        )
        off += N


def linear_triton(y, x, lora_a, lora_b, sorted_tokens, tile_slot, tile_start, tile_len, ranks,
                  scale, offset_start, block_m):
    fused_kernel = _kernels()[2]
    n_tiles = tile_slot.shape[0]
    if n_tiles == 0:
        return
    off = offset_start
    for s, (wa, wb) in enumerate(zip(lora_a, lora_b)):
        wa, wb = as_3d(wa), as_3d(wb)
        R, K = wa.shape[1], wa.shape[2]
        N = wb.shape[1]
        n_blocks = _cdiv(N, FUSED_BLOCK_N)
        split = max(1, min(n_blocks, FUSED_TARGET_PROGRAMS // n_tiles))
        fused_kernel[(n_tiles, split)](
            x, wa, wb, y, sorted_tokens, tile_slot, tile_start, tile_len,
            slice_ranks(ranks, s), float(scale), K, N,
            off, x.stride(0), x.stride(1), wa.stride(0), wa.stride(1), wa.stride(2),
            wb.stride(0), wb.stride(1), wb.stride(2), y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_R=_pow2_at_least(R), BLOCK_K=FUSED_BLOCK_K,
            BLOCK_N=FUSED_BLOCK_N, DOT_F32=_dot_f32(x, wa, wb),
        )
        off += N


def core_gather_triton(h, cores_flat, core_offsets, ranks, g, sorted_tokens, tile_slot,
                       tile_start, tile_len, scale, block_m):
    core_kernel = _kernels()[3]
    g.zero_()
    n_tiles = tile_slot.shape[0]
    if n_tiles == 0:
        return
    core_kernel[(n_tiles,)](
        h, cores_flat, core_offsets, g, sorted_tokens, tile_slot, tile_start, tile_len, ranks,
        float(scale), h.stride(0), h.stride(1), g.stride(0), g.stride(1),
        BLOCK_M=block_m, BLOCK_R=_pow2_at_least(h.shape[1]), DOT_F32=_dot_f32(h, cores_flat),
    )


# ---- custom ops: one schema each, launching the Triton kernels ------------------------------
# The meta tensors are passed one by one so that the ops are plain tensor ops for
# torch.compile / CUDA graphs; `block_m` must be the one the meta was built with.

Tensor = torch.Tensor


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu" and not _interpreting():
        raise RuntimeError("nora: the segment kernels run on CUDA (or CPU tensors under "
                           "TRITON_INTERPRET=1); the CPU path is nora_serve.kernels.cpu_step")


@torch.library.custom_op("nora::lora_shrink", mutates_args=("out",))
def _lora_shrink_op(
    x: Tensor, lora_a: list[Tensor], out: Tensor, sorted_tokens: Tensor, seg_slot: Tensor,
    seg_start: Tensor, seg_len: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_len: Tensor,
    ranks: Tensor, scale: float, block_m: int,
) -> None:
    _check_device(x)
    shrink_triton(x, lora_a, out, sorted_tokens, tile_slot, tile_start, tile_len, ranks, scale,
                  block_m)


@torch.library.custom_op("nora::lora_expand", mutates_args=("y",))
def _lora_expand_op(
    inp: Tensor, lora_b: list[Tensor], y: Tensor, sorted_tokens: Tensor, seg_slot: Tensor,
    seg_start: Tensor, seg_len: Tensor, tile_slot: Tensor, tile_start: Tensor, tile_len: Tensor,
    ranks: Tensor, offset_start: int, add_inputs: bool, block_m: int,
) -> None:
    _check_device(inp)
    expand_triton(inp, lora_b, y, sorted_tokens, tile_slot, tile_start, tile_len, ranks,
                  offset_start, add_inputs, block_m)


@torch.library.custom_op("nora::lora_linear", mutates_args=("y",))
def _lora_linear_op(
    y: Tensor, x: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], sorted_tokens: Tensor,
    seg_slot: Tensor, seg_start: Tensor, seg_len: Tensor, tile_slot: Tensor, tile_start: Tensor,
    tile_len: Tensor, ranks: Tensor, scale: float, offset_start: int, block_m: int,
) -> None:
    _check_device(x)
    linear_triton(y, x, lora_a, lora_b, sorted_tokens, tile_slot, tile_start, tile_len, ranks,
                  scale, offset_start, block_m)


@torch.library.custom_op("nora::core_gather", mutates_args=("g",))
def _core_gather_op(
    h: Tensor, cores_flat: Tensor, core_offsets: Tensor, ranks: Tensor, g: Tensor,
    sorted_tokens: Tensor, seg_slot: Tensor, seg_start: Tensor, seg_len: Tensor,
    tile_slot: Tensor, tile_start: Tensor, tile_len: Tensor, scale: float, block_m: int,
) -> None:
    _check_device(h)
    core_gather_triton(h, cores_flat, core_offsets, ranks, g, sorted_tokens, tile_slot,
                       tile_start, tile_len, scale, block_m)


# Mutation-only ops: nothing to allocate under fake tensors / torch.compile tracing.
for _op in (_lora_shrink_op, _lora_expand_op, _lora_linear_op, _core_gather_op):
    _op.register_fake(lambda *args, **kwargs: None)


def meta_args(meta: SegmentMeta) -> tuple:
    return (meta.sorted_tokens, meta.seg_slot, meta.seg_start, meta.seg_len, meta.tile_slot,
            meta.tile_start, meta.tile_len)


# ---- public API (tensor + SegmentMeta) ---------------------------------------------------


def lora_shrink(x: Tensor, lora_a: Sequence[Tensor], out: Tensor, meta: SegmentMeta,
                ranks: Tensor, scale: float = 1.0) -> None:
    """out[s, t, :r] = scale * x[t] @ lora_a[s][slot_t, :r].T, r = ranks[slot_t].

    x [T, d_in]; lora_a: per slice [max_loras, (1,) max_rank, d_in] (vLLM's
    lora_a_stacked); out [S, T, max_rank] (fp32, like vLLM's buffer) is fully
    overwritten: zero past each token's rank and for no-adapter tokens. ranks:
    [max_loras] int32, or [S, max_loras] for per-slice ranks.
    """
    torch.ops.nora.lora_shrink(x, list(lora_a), out, *meta_args(meta), ranks, float(scale),
                               meta.block_m)


def lora_expand(inp: Tensor, lora_b: Sequence[Tensor], y: Tensor, meta: SegmentMeta,
                ranks: Tensor, offset_start: int = 0, add_inputs: bool = True) -> None:
    """y[t, off_s:off_s+n_s] (+)= inp[s, t, :r] @ lora_b[s][slot_t, :, :r].T.

    inp [S, T, >= max_rank]; lora_b: per slice [max_loras, (1,) n_s, max_rank]
    (vLLM's lora_b_stacked); slices laid out back to back from offset_start
    (vLLM's output_slices are the n_s). Only the first r columns of inp and B are
    read. Rows of no-adapter tokens are not touched; with add_inputs=False the
    adapter rows are overwritten with the delta.
    """
    torch.ops.nora.lora_expand(inp, list(lora_b), y, *meta_args(meta), ranks, int(offset_start),
                               bool(add_inputs), meta.block_m)


def lora_linear(y: Tensor, x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                meta: SegmentMeta, ranks: Tensor, scale: float = 1.0,
                offset_start: int = 0) -> None:
    """Fused shrink + expand (decode): y[t, slices] += scale * B[:, :r] A[:r] x[t].

    Same layouts as lora_shrink / lora_expand, no intermediate buffer; rows of
    no-adapter tokens are not touched. The equivalent of punica's add_lora_linear.
    """
    torch.ops.nora.lora_linear(y, x, list(lora_a), list(lora_b), *meta_args(meta), ranks,
                               float(scale), int(offset_start), meta.block_m)


def core_gather(h: Tensor, cores_flat: Tensor, core_offsets: Tensor, ranks: Tensor, g: Tensor,
                meta: SegmentMeta, scale: float = 1.0) -> None:
    """g[t, :r] = scale * C_slot @ h[t, :r] with C_slot the slot's packed r x r core
    (see pack_cores); g [T, R] is fully overwritten (zeros elsewhere)."""
    torch.ops.nora.core_gather(h, cores_flat, core_offsets, ranks, g, *meta_args(meta),
                               float(scale), meta.block_m)
