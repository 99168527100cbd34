"""The CPU path of nora_serve.kernels, the server's (``kernels/cpu_step.py``), against the
per-token PyTorch reference, at real sizes; and the segment tables the GPU path reads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nora_serve.kernels import build_segment_meta, cpu_step, max_tiles, pack_cores
from nora_serve.kernels import reference as ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_cases as kc  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="CPU-path tests; with TRITON_INTERPRET=1 CPU tensors go to Triton",
)

torch.set_num_threads(min(2, torch.get_num_threads()))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max abs error relative to the reference's max magnitude.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    kc.assert_close(got, want, RTOL[dtype])


# Every rank 1..64 appears across the slots; slot 3 is rank 0 (empty slot).
RANKS_64 = [1, 64, 7, 0, 16, 33, 2, 63, 8, 4, 32, 5]
REAL_SIZES = [(4096, [4096]), (4096, [4096, 1024, 1024]), (14336, [4096])]


def _ranks(ranks: torch.Tensor, n_slices: int) -> list[list[int]]:
    """``cpu_step``'s ranks (per slice, per slot) from the reference's [L] or [S, L] table."""
    return [(ranks[s] if ranks.dim() == 2 else ranks).tolist() for s in range(n_slices)]


def _packed(a, b, ranks: torch.Tensor, d_outs):
    """Every slot slice-packed up to its rank, as ``layers.py`` packs a dense slot."""
    L = a[0].shape[0]
    rk = _ranks(ranks, len(d_outs))
    return [cpu_step.pack_slices([t[s, 0, :rk[i][s]] if rk[i][s] else None for i, t in enumerate(a)],
                                 [t[s, 0, :, :rk[i][s]] if rk[i][s] else None for i, t in enumerate(b)],
                                 d_outs)
            for s in range(L)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_outs", REAL_SIZES)
def test_lora_linear_real_sizes(dtype, d_in, d_outs):
    L = len(RANKS_64)
    slot, x, a, b, ranks = kc.lora_case(24, L, 64, d_in, d_outs, RANKS_64, dtype, seed=d_in)
    y0 = torch.randn(24, sum(d_outs) + 8).to(dtype)
    y = y0.clone()
    route = cpu_step.build_route(slot)
    assert route.mode == cpu_step.SEG
    cpu_step.lora_linear(y, x, a, b, route, _ranks(ranks, len(d_outs)), scale=0.5, offset_start=8)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 0.5, 8), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    assert torch.equal(y[:, :8], y0[:, :8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["all", "seg"])
def test_packed_and_stacked_match_reference(dtype, mode):
    """The slice-packed ops of the shared-basis layers' dense stack: one GEMM pair per segment,
    and every slot side by side (``stacked_lora_linear``); one adapter: two GEMMs on views."""
    L, d_outs = 8, [1024, 256, 256]
    ranks_l = [8, 16, 0, 4, 12, 1, 16, 5]
    slot, x, a, b, ranks = kc.lora_case(40, L, 16, 1024, d_outs, ranks_l, dtype, seed=7)
    if mode == "all":
        slot[:] = 4
    for i, r in enumerate(ranks_l):  # the stacks are zero past each rank, as vLLM stores them
        for t in a:
            t[i, :, r:] = 0
        for t in b:
            t[i, :, :, r:] = 0
    packed = _packed(a, b, ranks, d_outs)
    route = cpu_step.build_route(slot)
    assert route.mode == (cpu_step.ALL if mode == "all" else cpu_step.SEG)
    y0 = torch.randn(40, sum(d_outs)).to(dtype)
    want = ref.ref_lora_linear(y0, x, a, b, slot, ranks)
    y = y0.clone()
    cpu_step.packed_lora_linear(y, x, packed, route)
    _close(y, want, dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    stack = cpu_step.stack_packed(packed)
    assert stack.width == sum(ranks_l) * len(d_outs)
    y = y0.clone()
    cpu_step.stacked_lora_linear(y, x, stack, slot.long())
    _close(y, want, dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    if mode == "seg":
        # Only the rows with a slot, gathered and added back (a mixed step's dense rows), with
        # the column mask built once for them (the step's cache) or from the whole table.
        assert route.idx.numel() < slot.numel()
        keep = cpu_step.stack_keep(stack, slot.long().index_select(0, route.idx))
        for kw in ({"keep": keep}, {"table": slot.long()}):
            y = y0.clone()
            cpu_step.stacked_lora_linear(y, x, stack, rows=route.idx, **kw)
            _close(y, want, dtype)
            assert torch.equal(y[slot < 0], y0[slot < 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table", ["first-two", "balanced", "subset", "uneven", "few"])
def test_batched_matches_reference(dtype, table):
    """The dense slots as batches (``batched_lora_linear``): rows padded into one segment per
    slot up to the last used one, one bmm per stage on the weights as stored. Two of two
    non-empty slots; every slot, an empty one among them; a subset out of order (unused slots'
    segments masked); segments too uneven to pad and too few rows (``pad_route`` declines).
    Slots of different ranks and a slice no slot has: the reference's delta, other rows
    untouched."""
    L, d_outs = 6, [192, 64, 64]
    ranks_l = [8, 16, 0, 4, 12, 1]
    slot, x, a, b, ranks = kc.lora_case(48, L, 16, 128, d_outs, ranks_l, dtype, seed=5)
    for i, r in enumerate(ranks_l):
        for t in a:
            t[i, :, r:] = 0
        for t in b:
            t[i, :, :, r:] = 0
    for t in (a[2], b[2]):  # the last slice: no slot has weights there
        t.zero_()
    ranks = ranks.repeat(len(d_outs), 1)
    ranks[2] = 0
    if table == "first-two":
        slot = torch.arange(48, dtype=torch.int32) % 2
        slot[::5] = -1
    elif table == "balanced":
        slot = torch.arange(48, dtype=torch.int32) % L
        slot[::7] = -1
    elif table == "subset":
        slot = torch.tensor([4, 1, 4, -1, 1, 3] * 8, dtype=torch.int32)
    elif table == "uneven":
        slot = torch.tensor([0] * 40 + [1, 3, 4, 5, -1, 1, 3, 4], dtype=torch.int32)
    else:
        slot = torch.tensor([0, 1, 3, -1] * 8 + [-1] * 16, dtype=torch.int32)
    packed = _packed(a, b, ranks, d_outs)
    if table == "first-two":  # only slots 0 and 1 hold an adapter
        packed[2:] = [None] * (L - 2)
    batch = cpu_step.batch_packed(packed, d_outs)
    assert batch.a_t.shape[0] == (2 if table == "first-two" else L) and batch.slices[2][4] is None
    route = cpu_step.build_route(slot)
    padded = cpu_step.pad_route(route)
    if table in ("uneven", "few"):
        assert padded is None
        return
    assert padded.slots == int(slot.max()) + 1
    y0 = torch.randn(48, sum(d_outs)).to(dtype)
    y = y0.clone()
    cpu_step.batched_lora_linear(y, x, batch, padded)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    assert torch.equal(y[:, 256:], y0[:, 256:])


def test_batch_declines_mostly_empty_slots():
    """A batch up to slot 5 for one adapter there would be mostly zeros: none is built (the
    stack or the segments serve it)."""
    _, _, a, b, ranks = kc.lora_case(4, 6, 16, 64, [64], [16] * 6, torch.float32, seed=1)
    packed = _packed(a, b, ranks, [64])
    assert cpu_step.batch_packed([None] * 5 + packed[5:], [64]) is None
    assert cpu_step.batch_packed([None] * 3 + packed[3:], [64]).a_t.shape[0] == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_expand_block_by_block(dtype):
    """A prefill-sized step (at least ``BLOCK_EXPAND_ROWS`` rows, one adapter): the packed
    expand runs slice block by slice block; the same delta as the reference, an empty middle
    slice's columns untouched."""
    T, L, d_outs = cpu_step.BLOCK_EXPAND_ROWS + 44, 3, [256, 64, 96]
    slot, x, a, b, _ = kc.lora_case(T, L, 16, 256, d_outs, [0] * L, dtype, seed=21)
    slot[:] = 2
    ranks = torch.tensor([[16, 3, 9], [0, 8, 0], [4, 16, 12]], dtype=torch.int32)
    for i, t in enumerate(a):  # zero past each rank, as vLLM stores them
        for s_, r in enumerate(ranks[i].tolist()):
            t[s_, :, r:] = 0
            b[i][s_, :, :, r:] = 0
    packed = _packed(a, b, ranks, d_outs)
    assert len(packed[2].blocks) == 2
    route = cpu_step.build_route(slot)
    assert route.mode == cpu_step.ALL
    y0 = torch.randn(T, sum(d_outs)).to(dtype)
    y = y0.clone()
    cpu_step.packed_lora_linear(y, x, packed, route, scale=0.5)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 0.5), dtype)
    assert torch.equal(y[:, 256:320], y0[:, 256:320])


def test_reads_nothing_past_rank():
    """Garbage (NaN) past each slot's rank must not reach the output."""
    L = 3
    ranks = [5, 64, 1]
    slot, x, a, b, rk = kc.lora_case(12, L, 64, 256, [128], ranks, torch.float32, seed=11)
    for s, r in enumerate(ranks):
        a[0][s, 0, r:] = float("nan")
        b[0][s, 0, :, r:] = float("nan")
    y0 = torch.zeros(12, 128)
    y = y0.clone()
    cpu_step.lora_linear(y, x, a, b, cpu_step.build_route(slot), _ranks(rk, 1))
    assert torch.isfinite(y).all()
    a_clean = [torch.nan_to_num(a[0], nan=0.0)]
    b_clean = [torch.nan_to_num(b[0], nan=0.0)]
    want = ref.ref_lora_linear(y0, x, a_clean, b_clean, slot, rk)
    _close(y, want, torch.float32)
    y = y0.clone()
    cpu_step.packed_lora_linear(y, x, _packed(a, b, rk, [128]), cpu_step.build_route(slot))
    assert torch.isfinite(y).all()
    _close(y, want, torch.float32)


def test_all_rows_without_adapter_is_a_no_op():
    L = 4
    slot, x, a, b, ranks = kc.lora_case(8, L, 16, 64, [64], [16] * 4, torch.float32, seed=5)
    slot[:] = -1
    route = cpu_step.build_route(slot)
    assert route.mode == cpu_step.NONE and route.slots == []
    y0 = torch.randn(8, 64)
    y = y0.clone()
    cpu_step.lora_linear(y, x, a, b, route, _ranks(ranks, 1))
    cpu_step.packed_lora_linear(y, x, _packed(a, b, ranks, [64]), route)
    assert torch.equal(y, y0)


def test_minus_one_is_never_an_index():
    """A no-adapter row batched with a row of the last slot must get no delta.

    Python indexing turns -1 into the last slot; vLLM 0.32's CPU bgmv does
    exactly that (checked below when vLLM is importable)."""
    L = 3
    slot = torch.tensor([-1, L - 1], dtype=torch.int32)
    _, x, a, b, ranks = kc.lora_case(2, L, 8, 32, [32], [8, 8, 8], torch.float32, seed=1, none_frac=0)
    y = torch.zeros(2, 32)
    cpu_step.lora_linear(y, x, a, b, cpu_step.build_route(slot), _ranks(ranks, 1))
    assert (y[0] == 0).all() and (y[1] != 0).any()
    y = torch.zeros(2, 32)
    stack = cpu_step.stack_packed(_packed(a, b, ranks, [32]))
    cpu_step.stacked_lora_linear(y, x, stack, slot.long())
    assert (y[0] == 0).all() and (y[1] != 0).any()
    try:
        from vllm.lora.ops.torch_ops import bgmv_shrink
    except Exception:  # vLLM not installed: only our half of the check runs
        return
    buf = torch.zeros(2, 8)
    bgmv_shrink(x, a[0], buf, slot.long(), 1.0)
    # Documents the upstream behaviour the plugin must work around.
    assert torch.allclose(buf[0], a[0][L - 1, 0] @ x[0]), "vLLM CPU bgmv no longer wraps -1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_slice_ranks(dtype):
    """Merged qkv whose slices have different ranks per adapter (dynamic-rank DoRA)."""
    L = 4
    slot, x, a, b, _ = kc.lora_case(20, L, 64, 4096, [4096, 1024, 1024], [0] * L, dtype, seed=13)
    ranks = torch.tensor([[64, 3, 0, 17], [1, 64, 8, 0], [32, 2, 64, 5]], dtype=torch.int32)
    y0 = torch.randn(20, 6144).to(dtype)
    y = y0.clone()
    cpu_step.lora_linear(y, x, a, b, cpu_step.build_route(slot), _ranks(ranks, 3), scale=0.5)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 0.5), dtype)


def _cores(flat, offs, ranks, R: int) -> torch.Tensor:
    """Each slot's core zero-padded to ``R`` x ``R`` as a layer stores it ([L, R, R])."""
    L = offs.numel()
    out = torch.zeros(L, R, R, dtype=flat.dtype)
    for s in range(L):
        r = int(ranks[s])
        out[s, :r, :r] = flat[int(offs[s]):int(offs[s]) + r * r].view(r, r)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["rows", "one-slot"])
def test_shared_basis_real_sizes(dtype, mode):
    """Two dense GEMMs over the rows, each row's core gathered in between (``core_idx``), rows
    outside the group masked to exactly zero; one slot: its core as one small GEMM."""
    g = torch.Generator().manual_seed(0)
    L, T, R, d_in, d_out = 10, 32, 64, 4096, 1024
    core_ranks = [4, 64, 0, 16, 1, 32, 8, 63, 2, 24]
    flat, offs, ranks = pack_cores(kc.random_cores(g, core_ranks, dtype))
    assert flat.numel() == sum(r * r for r in core_ranks)
    slot, x, a_sh, b_sh = kc.shared_basis_case(g, L, T, R, d_in, d_out, dtype)
    if mode == "one-slot":
        slot[:] = 5
    cores = _cores(flat, offs, ranks, R)
    y0 = torch.randn(T, d_out + 16).to(dtype)
    y = y0.clone()
    if mode == "rows":
        cpu_step.shared_basis_linear(y, x, a_sh, b_sh, cores, slot.long().clamp(min=0),
                                     (slot >= 0).unsqueeze(1), -1, y_offset=16)
    else:
        cpu_step.shared_basis_linear(y, x, a_sh, b_sh, cores, None, None, 5, y_offset=16)
    _close(y, ref.ref_shared_basis_linear(y0, x, a_sh, b_sh, flat, offs, ranks, slot, 1.0, 16), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    assert torch.equal(y[:, :16], y0[:, :16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [20, cpu_step.BLOCK_EXPAND_ROWS + 12])
def test_packed_shared_basis_matches_per_slice(dtype, T):
    """All slices of a layer in one GEMM pair (``packed_shared_basis_linear``) = each slice on
    its own against the reference; at prefill sizes the expand runs block by block."""
    g = torch.Generator().manual_seed(2)
    L, R, d_in, d_outs = 6, 16, 512, [512, 128, 128]
    slot = torch.randint(-1, L, (T,), generator=g, dtype=torch.int32)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    parts, cores, refs = [], [], []
    for n in d_outs:
        _, _, a_sh, b_sh = kc.shared_basis_case(g, L, T, R, d_in, n, dtype)
        flat, offs, rk = pack_cores(kc.random_cores(g, [R, 3, 0, 16, 7, R], dtype))
        parts.append((a_sh, b_sh))
        cores.append(_cores(flat, offs, rk, R))
        refs.append((flat, offs, rk))
    packed = cpu_step.pack_slices([p[0] for p in parts], [p[1] for p in parts], d_outs)
    y0 = torch.randn(T, sum(d_outs)).to(dtype)
    y = y0.clone()
    cpu_step.packed_shared_basis_linear(y, x, packed, cores, slot.long().clamp(min=0),
                                        (slot >= 0).unsqueeze(1), -1)
    want, off = y0.float(), 0
    for (a_sh, b_sh), (flat, offs, rk), n in zip(parts, refs, d_outs):
        want = ref.ref_shared_basis_linear(want, x, a_sh, b_sh, flat, offs, rk, slot, 1.0, off)
        off += n
    _close(y, want, dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    # Every slice at one rank: the cores as one [S, L, r, r] tensor (one gather, one bmm for all
    # slices) give the same bits as slice by slice.
    y1 = y0.clone()
    cpu_step.packed_shared_basis_linear(y1, x, packed, torch.stack(cores), slot.long().clamp(min=0),
                                        (slot >= 0).unsqueeze(1), -1)
    assert torch.equal(y1, y)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 70), L=st.integers(1, 40), data=st.data())
def test_route_invariants(T, L, data):
    """A route: NONE without adapter rows, ALL when every row has the same slot, else SEG with
    the adapter rows in slot order, one segment per slot present, each exactly that slot's rows."""
    slots = data.draw(st.lists(st.integers(-1, L - 1), min_size=T, max_size=T))
    route = cpu_step.build_route(torch.tensor(slots, dtype=torch.int32))
    used = sorted({s for s in slots if s >= 0})
    assert route.rows == T and route.slots == used
    if not used:
        assert route.mode == cpu_step.NONE
    elif len(used) == 1 and -1 not in slots:
        assert route.mode == cpu_step.ALL and route.slot == used[0]
    else:
        assert route.mode == cpu_step.SEG
        rows = route.idx.tolist()
        assert sorted(rows) == [i for i in range(T) if slots[i] >= 0]
        for s, b, n in route.segments:
            assert n == slots.count(s) and rows[b:b + n] == [i for i in range(T) if slots[i] == s]


@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(0, 70),
    L=st.integers(1, 40),
    block_m=st.sampled_from([1, 4, 16]),
    data=st.data(),
)
def test_segment_meta_invariants(T, L, block_m, data):
    slots = data.draw(st.lists(st.integers(-1, L - 1), min_size=T, max_size=T))
    token_slot = torch.tensor(slots, dtype=torch.int32)
    m = build_segment_meta(token_slot, L, block_m)
    # Shapes depend only on (T, L, block_m): what makes the GPU path capture-safe.
    S = min(T, L)
    assert m.seg_slot.shape == (S,) and m.tile_slot.shape == (max_tiles(T, L, block_m),)
    assert sorted(m.sorted_tokens.tolist()) == list(range(T))
    keys = [slots[i] if slots[i] >= 0 else L for i in m.sorted_tokens.tolist()]
    assert keys == sorted(keys)
    want = sorted({s for s in slots if s >= 0})
    segs = m.host_segments()
    assert [s for s, _, _ in segs] == want
    for s, b, n in segs:
        assert n == slots.count(s)
        assert all(slots[i] == s for i in m.sorted_tokens[b : b + n].tolist())
    assert int(m.num_adapter_tokens) == sum(1 for s in slots if s >= 0)
    # Tiles cover every adapter token exactly once, within one slot, <= block_m rows.
    covered = []
    for s, b, n in zip(m.tile_slot.tolist(), m.tile_start.tolist(), m.tile_len.tolist()):
        if s < 0:
            assert n == 0
            continue
        assert 1 <= n <= block_m
        toks = m.sorted_tokens[b : b + n].tolist()
        assert all(slots[i] == s for i in toks)
        covered += toks
    assert sorted(covered) == sorted(i for i in range(T) if slots[i] >= 0)


def test_meta_buffers_update_in_place():
    """Persistent tables (for CUDA graphs): same storage every step, the same tables as freshly
    built ones, also when a step has fewer tokens than the last (the kernels on them:
    ``test_kernels_triton.py``)."""
    from nora_serve.kernels import SegmentMetaBuffers

    L = 6
    bufs = SegmentMetaBuffers(32, L, "cpu")
    ptrs = None
    for T, seed in [(32, 0), (9, 1), (32, 2)]:
        slot = kc.lora_case(T, L, 16, 64, [48], [1, 16, 0, 5, 9, 16], torch.float32, seed)[0]
        meta = bufs.update(slot)
        now = [t.data_ptr() for t in (meta.sorted_tokens, meta.seg_slot, meta.tile_slot)]
        assert ptrs is None or now == ptrs
        ptrs = now
        fresh = build_segment_meta(slot, L)
        assert meta.host_segments() == fresh.host_segments()
        assert torch.equal(meta.sorted_tokens, fresh.sorted_tokens)


def test_segment_kernels_refuse_plain_cpu_tensors():
    """One CPU path: the segment-table ops are Triton's; on CPU tensors they say where to go."""
    from nora_serve.kernels import lora_linear

    L = 3
    slot, x, a, b, ranks = kc.lora_case(6, L, 8, 32, [16], [2, 8, 0], torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="cpu_step"):
        lora_linear(torch.zeros(6, 16), x, a, b, build_segment_meta(slot, L), ranks)
