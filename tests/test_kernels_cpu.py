"""CPU path of nora_serve.kernels against the per-token PyTorch reference, at real sizes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nora_serve.kernels import (
    build_segment_meta,
    lora_expand,
    lora_linear,
    lora_shrink,
    max_tiles,
    pack_cores,
    shared_basis_inner_linear,
    shared_basis_linear,
)
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_in,d_outs", REAL_SIZES)
def test_shrink_expand_real_sizes(dtype, d_in, d_outs):
    L = len(RANKS_64)
    slot, x, a, b, ranks = kc.lora_case(24, L, 64, d_in, d_outs, RANKS_64, dtype, seed=d_in)
    meta = build_segment_meta(slot, L)
    buf = torch.full((len(d_outs), 24, 64), float("nan"))
    lora_shrink(x, a, buf, meta, ranks, scale=0.5)
    want = ref.ref_lora_shrink(x, a, slot, ranks, 0.5)
    _close(buf, want, dtype)
    # Columns past the rank and no-adapter rows are exactly zero.
    for t, s in enumerate(slot.tolist()):
        r = int(ranks[s]) if s >= 0 else 0
        assert (buf[:, t, r:] == 0).all()

    y0 = torch.randn(24, sum(d_outs) + 8).to(dtype)
    y = y0.clone()
    lora_expand(want, b, y, meta, ranks, offset_start=8, add_inputs=True)
    _close(y, ref.ref_lora_expand(want, b, y0, slot, ranks, 8, True), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    assert torch.equal(y[:, :8], y0[:, :8])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_matches_reference(dtype):
    L = len(RANKS_64)
    slot, x, a, b, ranks = kc.lora_case(40, L, 64, 4096, [4096, 1024, 1024], RANKS_64, dtype, seed=7)
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(40, 6144).to(dtype)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks, scale=2.0)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 2.0), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])


def test_expand_without_add_inputs_overwrites_adapter_rows_only():
    L = 4
    slot, x, a, b, ranks = kc.lora_case(16, L, 16, 64, [32], [3, 16, 0, 5], torch.float32, seed=3)
    meta = build_segment_meta(slot, L)
    buf = ref.ref_lora_shrink(x, a, slot, ranks)
    y0 = torch.randn(16, 32)
    y = y0.clone()
    lora_expand(buf, b, y, meta, ranks, add_inputs=False)
    want = ref.ref_lora_expand(buf, b, y0, slot, ranks, 0, False)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_reads_nothing_past_rank():
    """Garbage (NaN) past each slot's rank must not reach the output."""
    L = 3
    ranks = [5, 64, 1]
    slot, x, a, b, rk = kc.lora_case(12, L, 64, 256, [128], ranks, torch.float32, seed=11)
    for s, r in enumerate(ranks):
        a[0][s, 0, r:] = float("nan")
        b[0][s, 0, :, r:] = float("nan")
    meta = build_segment_meta(slot, L)
    y0 = torch.zeros(12, 128)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, rk)
    assert torch.isfinite(y).all()
    a_clean = [torch.nan_to_num(a[0], nan=0.0)]
    b_clean = [torch.nan_to_num(b[0], nan=0.0)]
    _close(y, ref.ref_lora_linear(y0, x, a_clean, b_clean, slot, rk), torch.float32)
    buf = torch.empty(1, 12, 64)
    lora_shrink(x, a, buf, meta, rk)
    assert torch.isfinite(buf).all()
    y2 = y0.clone()
    lora_expand(buf, b, y2, meta, rk)
    assert torch.isfinite(y2).all()


def test_all_tokens_without_adapter_is_a_no_op():
    L = 4
    slot, x, a, b, ranks = kc.lora_case(8, L, 16, 64, [64], [16] * 4, torch.float32, seed=5)
    slot[:] = -1
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(8, 64)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks)
    assert torch.equal(y, y0)
    buf = torch.full((1, 8, 16), 3.0)
    lora_shrink(x, a, buf, meta, ranks)
    assert (buf == 0).all()


def test_minus_one_is_never_an_index():
    """A no-adapter token batched with a token of the last slot must get no delta.

    Python indexing turns -1 into the last slot; vLLM 0.32's CPU bgmv does
    exactly that (checked below when vLLM is importable)."""
    L = 3
    slot = torch.tensor([-1, L - 1], dtype=torch.int32)
    _, x, a, b, ranks = kc.lora_case(2, L, 8, 32, [32], [8, 8, 8], torch.float32, seed=1, none_frac=0)
    meta = build_segment_meta(slot, L)
    y = torch.zeros(2, 32)
    lora_linear(y, x, a, b, meta, ranks)
    assert (y[0] == 0).all() and (y[1] != 0).any()
    try:
        from vllm.lora.ops.torch_ops import bgmv_shrink
    except Exception:  # vLLM not installed: only our half of the check runs
        return
    buf = torch.zeros(2, 8)
    bgmv_shrink(x, a[0], buf, slot.long(), 1.0)
    # Documents the upstream behaviour the plugin must work around.
    assert torch.allclose(buf[0], a[0][L - 1, 0] @ x[0]), "vLLM CPU bgmv no longer wraps -1"


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_basis_real_sizes(dtype):
    g = torch.Generator().manual_seed(0)
    L, T, R, d_in, d_out = 10, 32, 64, 4096, 1024
    core_ranks = [4, 64, 0, 16, 1, 32, 8, 63, 2, 24]
    flat, offs, ranks = pack_cores(kc.random_cores(g, core_ranks, dtype))
    assert flat.numel() == sum(r * r for r in core_ranks)
    slot, x, a_sh, b_sh = kc.shared_basis_case(g, L, T, R, d_in, d_out, dtype)
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(T, d_out + 16).to(dtype)
    y = y0.clone()
    shared_basis_linear(y, x, a_sh, b_sh, flat, offs, ranks, meta, scale=0.5, y_offset=16)
    _close(y, ref.ref_shared_basis_linear(y0, x, a_sh, b_sh, flat, offs, ranks, slot, 0.5, 16), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_basis_inner_pair(dtype):
    g = torch.Generator().manual_seed(1)
    L, T, R, d_in, d_out, rmax = 6, 20, 64, 4096, 4096, 16
    inner_ranks = torch.tensor([1, 16, 0, 8, 3, 12], dtype=torch.int32)
    slot, x, a_o, b_o = kc.shared_basis_case(g, L, T, R, d_in, d_out, dtype)
    a_i, b_i = kc.inner_pair(g, L, R, rmax, dtype)
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(T, d_out).to(dtype)
    y = y0.clone()
    shared_basis_inner_linear(y, x, a_o, b_o, a_i, b_i, inner_ranks, meta, scale=2.0)
    want = ref.ref_shared_basis_inner_linear(y0, x, a_o, b_o, a_i, b_i, inner_ranks, slot, 2.0)
    _close(y, want, dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])


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


def test_custom_ops_registered_and_pass_opcheck():
    assert hasattr(torch.ops.nora, "lora_shrink") and hasattr(torch.ops.nora, "lora_linear")
    L = 3
    slot, x, a, b, ranks = kc.lora_case(6, L, 8, 32, [16], [2, 8, 0], torch.float32, seed=2)
    meta = build_segment_meta(slot, L)
    from nora_serve.kernels.triton_ops import meta_args

    buf = torch.zeros(1, 6, 8)
    torch.library.opcheck(
        torch.ops.nora.lora_shrink,
        (x, a, buf, *meta_args(meta), ranks, 1.0, meta.block_m),
        test_utils=("test_schema", "test_faketensor"),
    )
    y = torch.zeros(6, 16)
    torch.library.opcheck(
        torch.ops.nora.lora_linear,
        (y, x, a, b, *meta_args(meta), ranks, 1.0, 0, meta.block_m),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_slice_ranks(dtype):
    """Merged qkv whose slices have different ranks per adapter (dynamic-rank DoRA)."""
    L = 4
    slot, x, a, b, _ = kc.lora_case(20, L, 64, 4096, [4096, 1024, 1024], [0] * L, dtype, seed=13)
    ranks = torch.tensor([[64, 3, 0, 17], [1, 64, 8, 0], [32, 2, 64, 5]], dtype=torch.int32)
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(20, 6144).to(dtype)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks, scale=0.5)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 0.5), dtype)
    buf = torch.empty(3, 20, 64)
    lora_shrink(x, a, buf, meta, ranks, 0.5)
    want = ref.ref_lora_shrink(x, a, slot, ranks, 0.5)
    _close(buf, want, dtype)
    y = y0.clone()
    lora_expand(want, b, y, meta, ranks)
    _close(y, ref.ref_lora_expand(want, b, y0, slot, ranks), dtype)


def test_meta_buffers_update_in_place():
    """Persistent tables (for CUDA graphs): same storage every step, same results as
    freshly built tables, also when a step has fewer tokens than the last."""
    from nora_serve.kernels import SegmentMetaBuffers

    L = 6
    bufs = SegmentMetaBuffers(32, L, "cpu")
    ptrs = None
    for T, seed in [(32, 0), (9, 1), (32, 2)]:
        slot, x, a, b, ranks = kc.lora_case(T, L, 16, 64, [48], [1, 16, 0, 5, 9, 16], torch.float32, seed)
        meta = bufs.update(slot)
        now = [t.data_ptr() for t in (meta.sorted_tokens, meta.seg_slot, meta.tile_slot)]
        assert ptrs is None or now == ptrs
        ptrs = now
        fresh = build_segment_meta(slot, L)
        assert meta.host_segments() == fresh.host_segments()
        y0 = torch.randn(T, 48)
        y = y0.clone()
        lora_linear(y, x, a, b, meta, ranks)
        torch.testing.assert_close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks), rtol=1e-5, atol=1e-5)


def test_meta_buffers_view_past_update_is_idle():
    from nora_serve.kernels import SegmentMetaBuffers

    L = 4
    bufs = SegmentMetaBuffers(24, L, "cpu")
    slot, x, a, b, ranks = kc.lora_case(24, L, 16, 32, [32], [16, 16, 16, 16], torch.float32, 3,
                                        none_frac=0)
    bufs.update(slot)
    bufs.update(slot[:5])
    meta = bufs.view(24)  # e.g. a graph captured for 24 tokens, replayed with 5 real ones
    y0 = torch.randn(24, 32)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks)
    assert torch.equal(y[5:], y0[5:])
    want = ref.ref_lora_linear(y0[:5], x[:5], a, b, slot[:5], ranks)
    torch.testing.assert_close(y[:5], want, rtol=1e-5, atol=1e-5)
