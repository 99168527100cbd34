"""CPU serving path: per-step routes, built once per step, and the layer ops that read them.

A serving step runs the same token -> slot table through every LoRA layer, so everything that
depends only on the table (which slots are used, how many tokens each, the token order by slot)
is computed once, in the punica wrapper's ``update_metadata``, into a :class:`Route`. A layer's
op then does only tensor work, chosen by the route's mode:

    ALL   every row uses one slot: two GEMMs on views of that slot's weights (the usual decode
          batch of one adapter);
    SEG   several slots: rows gathered into one equal, padded segment per slot and run
          as one ``bmm`` per stage against each slot's own weights (:func:`batched_lora_linear`,
          from 32 rows and while the segments are even enough to pad, :func:`pad_route`);
          else one GEMM pair
          against all resident slots side by side, each row keeping its own slot's columns
          (:func:`stacked_lora_linear`, while that stack is narrow; in a step mixing dense and
          shared-basis rows only the dense rows, gathered), or rows gathered once in slot order
          with one GEMM pair per segment (cut to the slot's true rank) and one scatter-add;
          rows of other slots are never touched;
    NONE  no row has an adapter: nothing runs.

The slices of a layer (q/k/v, gate/up) run as one GEMM pair (:func:`pack_slices`): on the CPU a
skinny GEMM costs mostly per call. The shared-basis op is two dense GEMMs over the step's rows
with each row's own ``r x r`` core applied in between (gathered per row; rows outside the group
get exactly zero), whatever the number of adapters. Host reads are free on the CPU; none of
this runs inside a traced graph (the plugin calls it from an opaque custom op).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

NONE, ALL, SEG = "none", "all", "seg"
# Rows of several slots run as one GEMM pair against every resident slot's weights while the
# slots' packed ranks add up to at most this (e.g. 8 adapters of rank 16 on q/k/v: 384);
# wider, one GEMM pair per slot's segment.
STACK_MAX_COLUMNS = 512


@dataclass(frozen=True)
class Route:
    """How the rows of one step map to slots of one weight stack (see module docstring)."""

    mode: str
    rows: int  # rows of the table it was built from
    slot: int = -1  # ALL: the one slot
    idx: torch.Tensor | None = None  # SEG: adapter rows in slot order (int64)
    segments: tuple[tuple[int, int, int], ...] = ()  # SEG: (slot, start in idx, length)

    @property
    def slots(self) -> list[int]:
        return [self.slot] if self.mode == ALL else [s for s, _, _ in self.segments]


def build_route(table: torch.Tensor) -> Route:
    """Route of a per-row slot table (int, -1 = no adapter)."""
    n = int(table.shape[0])
    if n == 0:
        return Route(NONE, 0)
    t = table.to(torch.int64)
    lo, hi = int(t.min()), int(t.max())
    if hi < 0:
        return Route(NONE, n)
    if lo == hi:
        return Route(ALL, n, slot=hi)
    key = torch.where(t < 0, torch.full_like(t, hi + 1), t)
    order = torch.argsort(key, stable=True)
    slots, counts = torch.unique_consecutive(key[order], return_counts=True)
    segments, start = [], 0
    for s, c in zip(slots.tolist(), counts.tolist()):
        if s <= hi:
            segments.append((s, start, c))
        start += c
    used = sum(c for _, _, c in segments)
    return Route(SEG, n, idx=order[:used].contiguous(), segments=tuple(segments))


class Prepack(NamedTuple):
    """A platform's GEMM against a weight reordered once (:func:`set_prepack`): ``make(w)``
    takes ``w`` [n, k] and returns an owner of the reordered copy (released with it) and the
    argument ``mm(out, x, None, arg)`` takes to write ``x @ w^T`` into ``out`` [m, n]."""

    make: object
    mm: object


class Prepacked(NamedTuple):
    """One weight reordered for the platform's GEMM (:func:`prepacked`)."""

    owner: object
    arg: object
    n: int  # output columns


# vLLM's CPU build has oneDNN's (the plugin sets it: ``vllm_plugin/punica_cpu.py``). Used for
# the shrinks against a fixed weight (a slot's or a basis's ``A``) in bf16, where it gives
# torch.mm's bits, and for the expands of decode-sized steps (``B``; the product then added):
# on the CPU a skinny GEMM costs mostly per call, and the reordered weight costs 2-3x less at
# 16 rows, 1.2-1.8x at 128 (rank 16-48, d_in 1024-2816, 2 threads). The shrinks call it inline
# (``x.new_empty`` then ``_PREPACK.mm``): a layer's first GEMM stays three Python calls from
# vLLM's layer.
_PREPACK: Prepack | None = None


def set_prepack(prepack: Prepack | None) -> None:
    global _PREPACK
    _PREPACK = prepack


def prepacked(w: torch.Tensor) -> Prepacked | None:
    """``w`` [n, k] reordered for the platform's GEMM (bf16 only), or ``None`` (no such GEMM
    here, or one that refuses it)."""
    if _PREPACK is None or w.dtype != torch.bfloat16 or w.device.type != "cpu" or w.dim() != 2:
        return None
    try:
        owner, arg = _PREPACK.make(w)
    except RuntimeError:
        return None
    return Prepacked(owner, arg, int(w.shape[0]))


def _pre(x: torch.Tensor, pre: Prepacked | None) -> Prepacked | None:
    """``pre`` where ``x`` can go through it (bf16 rows of unit stride), else ``None``."""
    return pre if pre is not None and x.dtype == torch.bfloat16 and x.stride(-1) == 1 else None


def _pre_mm(x: torch.Tensor, pre: Prepacked) -> torch.Tensor:
    """``x @ w^T`` for the weight ``pre`` holds reordered (``x`` passed :func:`_pre`)."""
    out = x.new_empty(x.shape[0], pre.n)
    _PREPACK.mm(out, x, None, pre.arg)
    return out


def _mm_args(a: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The operands of ``a @ b_t`` in dtypes the CPU multiplies well (fp16 and mixed dtypes in
    fp32). The ops call ``torch.mm(*_mm_args(a, b_t))`` themselves: a layer's first GEMM is
    three Python calls from vLLM's layer (``tests/test_punica_cpu.py`` counts them)."""
    if a.dtype == torch.float16 or b_t.dtype == torch.float16 or a.dtype != b_t.dtype:
        return a.float(), b_t.float()
    return a, b_t


def _add_mm(out: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
    """out += a @ b_t, in place (fused where the dtypes allow)."""
    if out.dtype == a.dtype == b_t.dtype and out.dtype != torch.float16:
        out.addmm_(a, b_t)
    else:
        out += torch.mm(*_mm_args(a.to(b_t.dtype) if a.dtype != b_t.dtype else a, b_t)).to(out.dtype)


def _expand(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """out += scale * h b^T: an adapter's expand, after its shrink ``h = x a^T``."""
    if scale != 1.0:
        h.mul_(scale)
    _add_mm(out, h, b.t())


def _w3(w: torch.Tensor) -> torch.Tensor:
    return w[:, 0] if w.dim() == 4 else w


def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor],
                lora_b: Sequence[torch.Tensor], route: Route, ranks: Sequence[Sequence[int]],
                scale: float = 1.0, offset_start: int = 0) -> None:
    """``y[t, slice i] += scale * x[t] A_i[slot_t, :r]^T B_i[slot_t, :, :r]^T``.

    ``lora_a[i]`` [L, (1,) R, d_in], ``lora_b[i]`` [L, (1,) d_out_i, R]; ``ranks[i][slot]`` the
    rank to read (the stacks are zero past it). ``x``/``y`` have ``route.rows`` rows."""
    if route.mode == NONE:
        return
    if route.mode == SEG:
        xs = x.index_select(0, route.idx)
    off = offset_start
    for i, (wa, wb) in enumerate(zip(lora_a, lora_b)):
        wa, wb = _w3(wa), _w3(wb)
        n_out = wb.shape[1]
        rk = ranks[i]
        if route.mode == ALL:
            r = min(rk[route.slot], wa.shape[1])
            if r > 0:
                a = wa[route.slot, :r]
                _expand(y[:, off:off + n_out], torch.mm(*_mm_args(x, a.t())), wb[route.slot, :, :r], scale)
        else:
            res = torch.zeros(xs.shape[0], n_out, dtype=y.dtype)
            for slot, b, n in route.segments:
                r = min(rk[slot], wa.shape[1])
                if r > 0:
                    h = torch.mm(*_mm_args(xs[b:b + n], wa[slot, :r].t()))
                    _expand(res[b:b + n], h, wb[slot, :, :r], scale)
            y[:, off:off + n_out].index_add_(0, route.idx, res)
        off += n_out


class Packed(NamedTuple):
    """A layer's slices packed for one GEMM pair (:func:`pack_slices`)."""

    a_cat: torch.Tensor  # [sum r, d_in]
    b_bd: torch.Tensor  # [sum widths, sum r], block-diagonal
    ranks: tuple[int, ...]
    # (out row, width, column in a_cat, rank, B [width, rank] contiguous) per non-empty slice:
    # the expand block by block where the block-diagonal's zeros would cost more than calls.
    blocks: tuple = ()
    a_pre: Prepacked | None = None  # a_cat reordered for the platform's GEMM (prepacked)
    b_pre: Prepacked | None = None  # b_bd reordered, for the expand of decode-sized steps


def pack_slices(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None],
                widths: Sequence[int]) -> Packed | None:
    """One GEMM pair for all slices of a layer: ``a[i]`` [r_i, d_in] stacked into ``a_cat``
    [sum r, d_in], ``b[i]`` [widths[i], r_i] into the block-diagonal ``b_bd``
    [sum widths, sum r] (``None``: an empty slice, its output rows get zero). Returns a
    :class:`Packed` (a_cat, b_bd, ranks, blocks), or ``None`` when every slice is empty. Skinny
    GEMMs cost mostly per call on the CPU: one rank-3r GEMM is cheaper than three rank-r ones
    (for many rows the expand runs per block instead: :func:`_expand_packed`)."""
    ranks = tuple(0 if t is None else t.shape[0] for t in a)
    if not any(ranks):
        return None
    ref = next(t for t in a if t is not None)
    a_cat = torch.cat([t for t in a if t is not None]).contiguous()
    b_bd = torch.zeros(sum(widths), sum(ranks), dtype=ref.dtype, device=ref.device)
    blocks = []
    row = col = 0
    for bt, r, n in zip(b, ranks, widths):
        if r:
            b_bd[row:row + n, col:col + r] = bt[:n, :r]
            blocks.append((row, n, col, r, b_bd[row:row + n, col:col + r].contiguous()))
            col += r
        row += n
    return Packed(a_cat, b_bd, ranks, tuple(blocks), prepacked(a_cat), prepacked(b_bd))


# From this many rows on, a packed expand runs block by block: the block-diagonal's zeros (2x
# the FLOPs on gate/up, 3x on q/k/v) then cost more than the extra calls. Measured per layer
# (q/k/v, o, gate/up, down of hidden 1024, rank 16, bf16, 1 thread, 2-core EPYC VM): block by
# block 0.44 / 1.16 / 10.3 ms vs block-diagonal 0.49 / 1.70 / 15.1 ms at 128 / 512 / 4096 rows.
BLOCK_EXPAND_ROWS = 128
# Below this many rows the expand runs the platform's GEMM on the reordered ``b_bd`` and adds
# its result (two calls; per call the skinny GEMM is what costs). Per layer at 16 rows, hidden
# 1024, rank 16, bf16, 2 threads, 2-core EPYC VM: o and down 23 -> 11 us, gate/up 51 -> 35 us,
# q/k/v even; at 64 rows gate/up is slower that way (110 vs 96 us).
PREPACK_EXPAND_ROWS = 64


def _expand_pre(h: torch.Tensor, out: torch.Tensor, b_pre: Prepacked | None) -> Prepacked | None:
    """``b_pre`` where an expand of ``h`` into ``out`` runs on it (a decode-sized step, one
    dtype throughout), else ``None``."""
    return _pre(h, b_pre) if h.shape[0] < PREPACK_EXPAND_ROWS and out.dtype == h.dtype else None


def _expand_packed(out: torch.Tensor, h: torch.Tensor, p: Packed, scale: float = 1.0) -> None:
    """out += scale * h b_bd^T for a :class:`Packed` ``p`` (``h`` = x a_cat^T)."""
    pre = _expand_pre(h, out, p.b_pre)
    if pre is not None:
        if scale != 1.0:
            h.mul_(scale)
        out.add_(_pre_mm(h, pre))
        return
    if h.shape[0] < BLOCK_EXPAND_ROWS or len(p.blocks) < 2:
        _expand(out, h, p.b_bd, scale)
        return
    if scale != 1.0:
        h.mul_(scale)
    for row, n, col, r, bt in p.blocks:
        _add_mm(out[:, row:row + n], h[:, col:col + r], bt.t())


def packed_lora_linear(y: torch.Tensor, x: torch.Tensor, packed: Sequence, route: Route,
                       scale: float = 1.0) -> None:
    """:func:`lora_linear` on slice-packed weights: ``packed[slot]`` the :class:`Packed` of
    :func:`pack_slices` (or ``None``: empty slot); ``y`` is the layer's whole output."""
    if route.mode == NONE:
        return
    if route.mode == ALL:
        p = packed[route.slot]
        if p is None:
            return
        pre = _pre(x, p.a_pre)
        if pre is None:
            h = torch.mm(*_mm_args(x, p.a_cat.t()))
        else:
            h = x.new_empty(x.shape[0], pre.n)
            _PREPACK.mm(h, x, None, pre.arg)
        _expand_packed(y, h, p, scale)
        return
    xs = x.index_select(0, route.idx)
    res = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype)
    for slot, b, n in route.segments:
        p = packed[slot]
        if p is not None:
            _expand(res[b:b + n], torch.mm(*_mm_args(xs[b:b + n], p.a_cat.t())), p.b_bd, scale)
    y.index_add_(0, route.idx, res)


@dataclass(frozen=True)
class Stack:
    """Every resident slot's slice-packed weights side by side: slot ``s`` owns columns
    ``[start[s], end[s])`` of ``a_all`` [C, d_in] (rows) and ``b_all`` [d_out, C]. ``key``:
    that column layout (every layer of one kind has the same), under which a step keeps the
    rows' column masks (:func:`stack_keep`)."""

    a_all: torch.Tensor
    b_all: torch.Tensor
    start: torch.Tensor  # [L] int64 (0 for empty slots)
    end: torch.Tensor  # [L] int64 (= start for empty slots)
    key: tuple = ()
    a_pre: Prepacked | None = None  # a_all reordered for the platform's GEMM (prepacked)
    b_pre: Prepacked | None = None  # b_all reordered, for the expand of decode-sized steps

    @property
    def width(self) -> int:
        return self.a_all.shape[0]


def stack_packed(packed: Sequence) -> Stack | None:
    """A :class:`Stack` of ``packed[slot]`` (:class:`Packed` or ``None``); ``None`` if
    every slot is empty."""
    parts = [(s, p) for s, p in enumerate(packed) if p is not None]
    if not parts:
        return None
    start = torch.zeros(len(packed), dtype=torch.int64)
    end = torch.zeros(len(packed), dtype=torch.int64)
    col = 0
    for s, p in parts:
        start[s], end[s] = col, col + p.a_cat.shape[0]
        col += p.a_cat.shape[0]
    a_all = torch.cat([p.a_cat for _, p in parts]).contiguous()
    b_all = torch.cat([p.b_bd for _, p in parts], dim=1).contiguous()
    return Stack(a_all, b_all, start, end, key=(tuple(start.tolist()), tuple(end.tolist())),
                 a_pre=prepacked(a_all), b_pre=prepacked(b_all))


def stack_keep(stack: Stack, table: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` bool: row ``t`` keeps the columns of its slot ``table[t]`` (-1: none). Depends
    only on the step's table and the stack's column layout: built once per step and layout
    (``Step.stack_keep``), read by every layer of that kind."""
    safe = table.clamp(min=0)
    lo = torch.where(table >= 0, stack.start[safe], 0).unsqueeze(1)
    hi = torch.where(table >= 0, stack.end[safe], 0).unsqueeze(1)
    col = torch.arange(stack.width).unsqueeze(0)
    return (col >= lo) & (col < hi)


def stacked_lora_linear(y: torch.Tensor, x: torch.Tensor, stack: Stack, table: torch.Tensor | None = None,
                        keep: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """:func:`packed_lora_linear` for rows of many slots in one GEMM pair: every row against
    every resident slot, then each row keeps only its own slot's columns (``keep`` from
    :func:`stack_keep`, or built here from ``table[t]``, its slot, -1: none). Costs
    ``stack.width / rank`` times the FLOPs of one adapter, in 2 calls instead of 2 per slot:
    cheaper on the CPU while the stack is narrow. ``rows``: only these rows have a slot (a
    mixed step's dense rows): they are gathered, run, and added back; ``keep`` then covers
    just them, in that order (``table`` stays the whole step's). The weights must be finite
    (a kept column is multiplied by zeros of the others only)."""
    xs = x if rows is None else x.index_select(0, rows)
    pre = _pre(xs, stack.a_pre)
    if pre is None:
        h = torch.mm(*_mm_args(xs, stack.a_all.t()))
    else:
        h = xs.new_empty(xs.shape[0], pre.n)
        _PREPACK.mm(h, xs, None, pre.arg)
    if keep is None:
        keep = stack_keep(stack, table if rows is None else table.index_select(0, rows))
    h = torch.where(keep, h, torch.zeros((), dtype=h.dtype))
    # Decode-sized steps: the reordered b_all, then an add (16 rows, 8 slots of rank 16 on
    # q/k/v: 97 -> 56 us; as for _expand_packed).
    pre = _expand_pre(h, y, stack.b_pre)
    if rows is None and pre is None:
        _add_mm(y, h, stack.b_all.t())
        return
    if pre is not None:
        delta = _pre_mm(h, pre)
    else:
        delta = torch.mm(*_mm_args(h.to(stack.b_all.dtype), stack.b_all.t())).to(y.dtype)
    if rows is None:
        y.add_(delta)
    else:
        y.index_add_(0, rows, delta)


class Batch(NamedTuple):
    """Slots ``0 .. L-1`` of a layer's slice-packed weights as batches for ``torch.bmm``
    (:func:`batch_packed`): slot ``s`` reads ``a_t[s]`` [d_in, C] (slice ``i`` in columns
    ``col:col + rank`` of ``h``, zero past the slot's own rank; an empty slot all zero) and, per
    slice, ``b[s]`` [rank, width]."""

    a_t: torch.Tensor  # [L, d_in, C], a transposed view
    slices: tuple  # per slice: (out column, width, column in h, rank, b [L, rank, width] or None)


def batch_packed(packed: Sequence, widths: Sequence[int]) -> Batch | None:
    """A :class:`Batch` of ``packed[slot]`` (:class:`Packed` of a layer with output slices
    ``widths``, or ``None``) up to the last non-empty slot; each slice cut to the widest rank any
    slot has there. ``None`` if every slot is empty, or if empty slots would be most of it (a
    few adapters in high slots: the stack or the segments serve those without the memory)."""
    used = [s for s, p in enumerate(packed) if p is not None]
    if not used or used[-1] + 1 > 2 * len(used):
        return None
    parts = [packed[s] for s in used]
    ref = parts[0].a_cat
    outs = [sum(widths[:i]) for i in range(len(widths))]
    rank = [max(p.ranks[i] for p in parts) for i in range(len(widths))]
    cols = [sum(rank[:i]) for i in range(len(widths))]
    L = used[-1] + 1
    a = torch.zeros(L, sum(rank), ref.shape[1], dtype=ref.dtype, device=ref.device)
    bs = [torch.zeros(L, r, n, dtype=ref.dtype, device=ref.device) if r else None
          for r, n in zip(rank, widths)]
    for s in used:
        p = packed[s]
        for row, _n, col, r, bt in p.blocks:
            i = outs.index(row)
            a[s, cols[i]:cols[i] + r] = p.a_cat[col:col + r]
            bs[i][s, :r] = bt.t()
    slices = tuple((outs[i], widths[i], cols[i], rank[i], bs[i]) for i in range(len(widths)))
    return Batch(a.transpose(1, 2), slices)


class Padded(NamedTuple):
    """A step's adapter rows as one segment of ``m`` rows per slot ``0 .. slots-1`` (a slot
    without rows, and the positions past a segment's own rows, read row 0 and are masked to
    zero): gathered with one ``index_select``, run with one ``bmm`` per stage on the weights as
    they are stored (no copy), added back with one ``index_add_``."""

    index: torch.Tensor  # [slots * m] int64: row of x per padded position
    valid: torch.Tensor  # [slots, m, 1] bool
    slots: int
    m: int


# Pad the segments only while that at most doubles the rows run (8 adapters of 16 decode rows
# each: no padding); a prefill chunk beside a few decode rows runs segment by segment instead.
PAD_MAX_FACTOR = 2
# Below this many adapter rows the stack side by side is as fast or faster (one thread, 8
# adapters of rank 16 on hidden 1024's layers, bf16, 2-core EPYC VM: stack / batched 1.09 /
# 1.12 ms at 16 rows, 1.65 / 1.57 ms at 32, 3.09 / 1.63 ms at 64, 5.81 / 2.13 ms at 128).
BATCH_MIN_ROWS = 32


def pad_route(route: Route) -> Padded | None:
    """The :class:`Padded` form of a SEG route, or ``None`` for fewer than
    :data:`BATCH_MIN_ROWS` rows or where padding would run more than :data:`PAD_MAX_FACTOR`
    times the rows. Once per step, not per layer."""
    if route.mode != SEG:
        return None
    slots = torch.tensor([s for s, _, _ in route.segments], dtype=torch.int64)
    lengths = torch.tensor([c for _, _, c in route.segments], dtype=torch.int64)
    starts = torch.tensor([b for _, b, _ in route.segments], dtype=torch.int64)
    K, m, used = int(slots[-1]) + 1, int(lengths.max()), int(lengths.sum())
    if used < BATCH_MIN_ROWS or K * m > PAD_MAX_FACTOR * used:
        return None
    pos = (torch.repeat_interleave(slots, lengths) * m + torch.arange(used)
           - torch.repeat_interleave(starts, lengths))
    index = torch.zeros(K * m, dtype=torch.int64)
    index[pos] = route.idx
    valid = torch.zeros(K * m, dtype=torch.bool)
    valid[pos] = True
    return Padded(index, valid.view(K, m, 1), K, m)


def batch_covering(batch: Batch | None, padded: Padded | None) -> Batch | None:
    """``batch`` if it holds every slot ``padded`` lays rows out for (a used slot can lie past a
    layer's last non-empty one), else ``None``: the op to run is then the stack or the segments."""
    if batch is None or padded is None or padded.slots > batch.a_t.shape[0]:
        return None
    return batch


def batched_lora_linear(y: torch.Tensor, x: torch.Tensor, batch: Batch, padded: Padded) -> None:
    """:func:`packed_lora_linear` as one ``bmm`` for the shrink and one per slice for the expand,
    over the step's adapter rows padded into one segment per slot (:func:`pad_route`; the
    batch must hold at least ``padded.slots`` slots): each row meets its own slot's weights only
    (at the layer's widest rank), where the stack multiplies every row by every slot. The
    weights must be finite (padding rows' zeros meet them)."""
    K, m = padded.slots, padded.m
    xp = x.index_select(0, padded.index).view(K, m, x.shape[1])
    h = torch.bmm(*_mm_args(xp, batch.a_t[:K]))
    h = torch.where(padded.valid, h, torch.zeros((), dtype=h.dtype))
    res = torch.empty(K, m, y.shape[1], dtype=torch.float32 if y.dtype == torch.float16 else y.dtype)
    for out, width, col, r, b in batch.slices:
        view = res[:, :, out:out + width]
        if b is None:
            view.zero_()
            continue
        hb, bb = _mm_args(h[:, :, col:col + r], b[:K])
        if view.dtype == hb.dtype == bb.dtype:
            view.baddbmm_(hb, bb, beta=0)
        else:
            view.copy_(torch.bmm(hb.to(bb.dtype), bb))
    y.index_add_(0, padded.index, res.view(K * m, -1).to(y.dtype))


def packed_shared_basis_linear(y: torch.Tensor, x: torch.Tensor, packed: Packed, cores,
                               core_idx: torch.Tensor | None, mask: torch.Tensor | None,
                               slot: int) -> None:
    """:func:`shared_basis_linear` for all slices of a layer at once: the basis slice-packed
    (``packed``: the :class:`Packed` of :func:`pack_slices`), ``cores[i]`` [L, r_i, r_i] per
    slice, or one tensor [S, L, r, r] when every slice has rank ``r`` (then the rows' cores of
    every slice are gathered in one op and applied in one ``bmm``). The slices' results are
    joined once and expanded (:func:`_expand_packed`)."""
    pre = _pre(x, packed.a_pre)
    if pre is None:
        h = torch.mm(*_mm_args(x, packed.a_cat.t()))
    else:
        h = x.new_empty(x.shape[0], pre.n)
        _PREPACK.mm(h, x, None, pre.arg)
    if core_idx is not None and isinstance(cores, torch.Tensor):
        # [S, T, r, r]: kilobytes. In fp32: the CPU's bmm of r x r blocks is faster there than
        # in bf16 (0.63 vs 0.77 ms for 4096 rows), and the same once rounded to bf16. One op for
        # all slices: q/k/v at 16 rows 55 -> 26 us (2-core EPYC VM).
        S, T, r = cores.shape[0], h.shape[0], cores.shape[-1]
        c = cores.index_select(1, core_idx).view(S * T, r, r)
        hs = h.view(T, S, r).transpose(0, 1).reshape(S * T, r, 1)
        g = torch.bmm(c.float(), hs.float()).view(S, T, r).transpose(0, 1).reshape(T, S * r)
    else:
        parts, col = [], 0
        for i, r in enumerate(packed.ranks):
            if r == 0:
                continue
            hi = h[:, col:col + r]
            if core_idx is None:
                parts.append(torch.mm(*_mm_args(hi, cores[i][slot].t())))
            else:
                c = cores[i].index_select(0, core_idx)
                parts.append(torch.bmm(c.float(), hi.float().unsqueeze(-1)).squeeze(-1))
            col += r
        g = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if mask is not None:
        g = torch.where(mask, g, torch.zeros((), dtype=g.dtype))
    _expand_packed(y, g.to(packed.b_bd.dtype), packed)


def shared_basis_linear(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        cores: torch.Tensor, core_idx: torch.Tensor | None,
                        mask: torch.Tensor | None, slot: int, y_offset: int = 0) -> None:
    """``y[t, off:off+d_out] += B C_t A x[t]`` for the group's rows, ``C_t = cores[core_idx[t]]``.

    ``a`` [r, d_in], ``b`` [d_out, r]: one basis, cut to its rank; ``cores`` [L, r, r].
    ``core_idx=None``: every row uses ``cores[slot]`` (one small GEMM, no gather). ``mask``
    [T, 1] bool marks the group's rows (``None``: all); the others get exactly zero, whatever
    their gathered core holds."""
    packed_shared_basis_linear(y[:, y_offset:y_offset + b.shape[0]], x, Packed(a, b, (a.shape[0],)),
                               [cores], core_idx, mask, slot)
