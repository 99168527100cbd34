"""Triton kernels of nora_serve.kernels against the PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, CPU
tensors, small shapes). The variable must be set before triton is imported and
it reroutes CPU tensors of the whole process to Triton, so in a normal pytest
run the single wrapper test below reruns this file in a child pytest with the
variable set; the kernel tests only run in that child.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_cases as kc  # noqa: E402
from triton_child import CHILD, HAVE_CUDA, RUN_HERE, have_triton, run_child  # noqa: E402

RUN_KERNELS = RUN_HERE


@pytest.mark.skipif(RUN_KERNELS, reason="this is the parent; kernel tests run here directly")
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
@pytest.mark.timeout(600)
def test_triton_kernels_interpreted():
    run_child(__file__, 600)


@pytest.mark.skipif(CHILD or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiles real kernels; not under the interpreter")
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
@pytest.mark.parametrize("dt", ["bf16", "fp16", "fp32"])
def test_triton_kernels_compile_for_sm90(dt):
    """The interpreter does not check what the compiler does (types, tl.dot shapes,
    dynamic loops); compile every kernel down to an H100 cubin, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nora_serve.kernels import triton_ops

    shrink, expand, fused, core = triton_ops._kernels()
    P = "*" + dt
    idx = {"sorted_ptr": "*i32", "tile_slot_ptr": "*i32", "tile_start_ptr": "*i32",
           "tile_len_ptr": "*i32", "ranks_ptr": "*i32", "scale": "fp32"}
    cases = [
        (shrink, {**idx, "x_ptr": P, "w_ptr": P, "out_ptr": "*fp32"},
         dict(BLOCK_M=16, BLOCK_N=triton_ops.SHRINK_BLOCK_N, BLOCK_K=triton_ops.SHRINK_BLOCK_K, DOT_F32=False)),
        (expand, {**idx, "in_ptr": "*fp32", "w_ptr": P, "y_ptr": P},
         dict(BLOCK_M=16, BLOCK_N=triton_ops.EXPAND_BLOCK_N, BLOCK_K=triton_ops.EXPAND_BLOCK_K,
              ADD_INPUTS=True, DOT_F32=False)),
        (expand, {**idx, "in_ptr": "*fp32", "w_ptr": P, "y_ptr": "*fp32"},
         dict(BLOCK_M=16, BLOCK_N=triton_ops.EXPAND_BLOCK_N, BLOCK_K=triton_ops.EXPAND_BLOCK_K,
              ADD_INPUTS=False, DOT_F32=False)),
        (fused, {**idx, "x_ptr": P, "a_ptr": P, "b_ptr": P, "y_ptr": P},
         dict(BLOCK_M=16, BLOCK_R=64, BLOCK_K=triton_ops.FUSED_BLOCK_K,
              BLOCK_N=triton_ops.FUSED_BLOCK_N, DOT_F32=False)),
        (core, {**idx, "h_ptr": P, "c_ptr": P, "coff_ptr": "*i64", "g_ptr": "*fp32"},
         dict(BLOCK_M=16, BLOCK_R=64, DOT_F32=False)),
    ]
    for fn, types, consts in cases:
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32))
        assert k.asm.get("cubin"), fn


# ---- kernel tests (child process under the interpreter, or a CUDA machine) ----------------

kernels = pytest.mark.skipif(not RUN_KERNELS, reason="runs in the TRITON_INTERPRET child")
DEV = "cuda" if HAVE_CUDA and not CHILD else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 2e-5 if CHILD else 5e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _close(got, want, dtype):
    kc.assert_close(got, want, RTOL[dtype])


def _case(T, L, max_rank, d_in, d_outs, ranks, dtype, seed, none_frac=0.25):
    """kc.lora_case on DEV."""
    slot, x, a, b, rk = kc.lora_case(T, L, max_rank, d_in, d_outs, ranks, dtype, seed, none_frac)
    to = lambda t: t.to(DEV)  # noqa: E731
    return to(slot), to(x), [to(w) for w in a], [to(w) for w in b], to(rk)


# Slots cover ranks 1..64 (1, 2, 7, 16, 17, 33, 63, 64) plus an empty (rank 0) slot;
# with 9 slots and 20 tokens some slots also get no token (empty segments).
RANKS = [1, 64, 7, 0, 16, 33, 2, 63, 17]


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_expand(dtype):
    from nora_serve.kernels import build_segment_meta, lora_expand, lora_shrink
    from nora_serve.kernels import reference as ref

    L = len(RANKS)
    slot, x, a, b, ranks = _case(20, L, 64, 96, [80, 48], RANKS, dtype, seed=0)
    meta = build_segment_meta(slot, L)
    assert len(meta.host_segments()) < L  # at least one empty segment
    buf = torch.full((2, 20, 64), float("nan"), device=DEV)
    lora_shrink(x, a, buf, meta, ranks, scale=0.5)
    want = ref.ref_lora_shrink(x, a, slot, ranks, 0.5)
    _close(buf, want, dtype)
    assert (buf[:, slot < 0] == 0).all()
    y0 = torch.randn(20, 136).to(dtype).to(DEV)
    y = y0.clone()
    lora_expand(want.to(DEV), b, y, meta, ranks, offset_start=8, add_inputs=True)
    _close(y, ref.ref_lora_expand(want, b, y0, slot, ranks, 8, True), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0]) and torch.equal(y[:, :8], y0[:, :8])


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear(dtype):
    from nora_serve.kernels import build_segment_meta, lora_linear
    from nora_serve.kernels import reference as ref

    L = len(RANKS)
    # 40 tokens, 3 slots used heavily: segments longer than one 16-row tile.
    slot, x, a, b, ranks = _case(40, 3, 64, 160, [272], [64, 5, 33], dtype, seed=1)
    meta = build_segment_meta(slot, 3)
    y0 = torch.randn(40, 272).to(dtype).to(DEV)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks, scale=2.0)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 2.0), dtype)
    assert torch.equal(y[slot < 0], y0[slot < 0])
    slot, x, a, b, ranks = _case(12, L, 64, 64, [48, 16], RANKS, dtype, seed=2)
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(12, 64).to(dtype).to(DEV)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks, scale=1.0)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 1.0), dtype)


@kernels
def test_per_slice_ranks():
    from nora_serve.kernels import build_segment_meta, lora_expand, lora_linear, lora_shrink
    from nora_serve.kernels import reference as ref

    L = 4
    slot, x, a, b, _ = _case(18, L, 64, 64, [48, 16], [0] * L, torch.float16, seed=8)
    ranks = torch.tensor([[64, 3, 0, 17], [1, 64, 8, 0]], dtype=torch.int32, device=DEV)
    meta = build_segment_meta(slot, L)
    y0 = torch.randn(18, 64).half().to(DEV)
    y = y0.clone()
    lora_linear(y, x, a, b, meta, ranks, 0.5)
    _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks.cpu(), 0.5), torch.float16)
    buf = torch.empty(2, 18, 64, device=DEV)
    lora_shrink(x, a, buf, meta, ranks, 0.5)
    want = ref.ref_lora_shrink(x, a, slot, ranks.cpu(), 0.5)
    _close(buf, want, torch.float16)
    y = y0.clone()
    lora_expand(want.to(DEV), b, y, meta, ranks)
    _close(y, ref.ref_lora_expand(want, b, y0, slot, ranks.cpu()), torch.float16)


@kernels
def test_persistent_meta_buffers():
    """Tables rewritten in place (CUDA graphs); a view past the last update is idle."""
    from nora_serve.kernels import SegmentMetaBuffers, lora_linear
    from nora_serve.kernels import reference as ref

    L = 4
    bufs = SegmentMetaBuffers(24, L, DEV)
    slot, x, a, b, ranks = _case(24, L, 16, 32, [32], [16, 3, 0, 9], torch.float32, 3, none_frac=0)
    bufs.update(slot)
    bufs.update(slot[:5])
    y0 = torch.randn(24, 32, device=DEV)
    y = y0.clone()
    lora_linear(y, x, a, b, bufs.view(24), ranks)
    assert torch.equal(y[5:], y0[5:])
    _close(y[:5], ref.ref_lora_linear(y0[:5], x[:5], a, b, slot[:5], ranks), torch.float32)


@kernels
def test_nothing_past_rank_is_read():
    from nora_serve.kernels import build_segment_meta, lora_expand, lora_linear, lora_shrink

    L = 3
    rk = [5, 64, 1]
    slot, x, a, b, ranks = _case(10, L, 64, 64, [32], rk, torch.float32, seed=3)
    for s, r in enumerate(rk):
        a[0][s, 0, r:] = float("nan")
        b[0][s, 0, :, r:] = float("nan")
    meta = build_segment_meta(slot, L)
    buf = torch.empty(1, 10, 64, device=DEV)
    lora_shrink(x, a, buf, meta, ranks)
    assert torch.isfinite(buf).all()
    y = torch.zeros(10, 32, device=DEV)
    lora_expand(buf, b, y, meta, ranks)
    assert torch.isfinite(y).all()
    y = torch.zeros(10, 32, device=DEV)
    lora_linear(y, x, a, b, meta, ranks)
    assert torch.isfinite(y).all() and (y[slot >= 0] != 0).any()


@kernels
def test_no_adapter_batch_and_minus_one():
    from nora_serve.kernels import build_segment_meta, lora_linear

    L = 3
    slot, x, a, b, ranks = _case(4, L, 16, 32, [32], [16, 16, 16], torch.float16, seed=4)
    slot = torch.tensor([-1, L - 1, -1, -1], dtype=torch.int32, device=DEV)
    y0 = torch.randn(4, 32).half().to(DEV)
    y = y0.clone()
    lora_linear(y, x, a, b, build_segment_meta(slot, L), ranks)
    assert torch.equal(y[slot < 0], y0[slot < 0]) and not torch.equal(y[1], y0[1])
    y = y0.clone()
    lora_linear(y, x, a, b, build_segment_meta(torch.full_like(slot, -1), L), ranks)
    assert torch.equal(y, y0)


@kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_basis(dtype):
    from nora_serve.kernels import build_segment_meta, pack_cores, shared_basis_linear
    from nora_serve.kernels import reference as ref

    g = torch.Generator().manual_seed(5)
    L, T, R, d_in, d_out = 6, 24, 64, 80, 96
    core_ranks = [4, 64, 0, 17, 1, 33]
    flat, offs, ranks = pack_cores(kc.random_cores(g, core_ranks, dtype), device=DEV)
    slot, x, a_sh, b_sh = kc.shared_basis_case(g, L, T, R, d_in, d_out, dtype)
    y0 = torch.randn(T, d_out + 4).to(dtype)
    y = y0.clone().to(DEV)
    meta = build_segment_meta(slot.to(DEV), L)
    shared_basis_linear(y, x.to(DEV), a_sh.to(DEV), b_sh.to(DEV), flat, offs, ranks, meta, 0.5, 4)
    want = ref.ref_shared_basis_linear(y0, x, a_sh, b_sh, flat.cpu(), offs.cpu(), ranks.cpu(), slot, 0.5, 4)
    _close(y, want, dtype)
    assert torch.equal(y[slot.to(DEV) < 0], y0.to(DEV)[slot.to(DEV) < 0])


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_basis_inner_pair(dtype):
    from nora_serve.kernels import build_segment_meta, shared_basis_inner_linear
    from nora_serve.kernels import reference as ref

    g = torch.Generator().manual_seed(6)
    L, T, R, d_in, d_out, rmax = 5, 18, 32, 64, 48, 16
    inner_ranks = torch.tensor([1, 16, 0, 8, 3], dtype=torch.int32)
    slot, x, a_o, b_o = kc.shared_basis_case(g, L, T, R, d_in, d_out, dtype)
    a_i, b_i = kc.inner_pair(g, L, R, rmax, dtype)
    y0 = torch.randn(T, d_out).to(dtype)
    y = y0.clone().to(DEV)
    d = lambda t: t.to(DEV)  # noqa: E731
    shared_basis_inner_linear(y, d(x), d(a_o), d(b_o), d(a_i), d(b_i), d(inner_ranks),
                              build_segment_meta(d(slot), L), 2.0)
    want = ref.ref_shared_basis_inner_linear(y0, x, a_o, b_o, a_i, b_i, inner_ranks, slot, 2.0)
    _close(y, want, dtype)


@kernels
def test_random_batches_match_reference():
    """Random token->slot maps, ranks 0..64 and segment lengths across tile bounds."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nora_serve.kernels import build_segment_meta, lora_linear, lora_shrink
    from nora_serve.kernels import reference as ref

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(T=st.integers(1, 40), L=st.integers(1, 8), seed=st.integers(0, 2**16),
           dtype=st.sampled_from(DTYPES), data=st.data())
    def check(T, L, seed, dtype, data):
        rk = data.draw(st.lists(st.integers(0, 64), min_size=L, max_size=L))
        slot, x, a, b, ranks = _case(T, L, 64, 48, [40], rk, dtype, seed)
        meta = build_segment_meta(slot, L)
        buf = torch.empty(1, T, 64, device=DEV)
        lora_shrink(x, a, buf, meta, ranks, 0.25)
        _close(buf, ref.ref_lora_shrink(x, a, slot, ranks, 0.25), dtype)
        y0 = torch.randn(T, 40).to(dtype).to(DEV)
        y = y0.clone()
        lora_linear(y, x, a, b, meta, ranks, 0.25)
        _close(y, ref.ref_lora_linear(y0, x, a, b, slot, ranks, 0.25), dtype)

    check()


@pytest.mark.skipif(not HAVE_CUDA or CHILD, reason="needs a CUDA device")
def test_gpu_path_has_no_host_sync():
    from nora_serve.kernels import build_segment_meta, lora_linear, pack_cores, shared_basis_linear

    L = 8
    slot, x, a, b, ranks = _case(64, L, 64, 4096, [4096], [8, 64, 4, 16, 0, 32, 1, 63],
                                 torch.bfloat16, seed=9)
    flat, offs, crk = pack_cores([torch.randn(r, r, dtype=torch.bfloat16) if r else None
                                  for r in [8, 64, 4, 16, 0, 32, 1, 63]], device=DEV)
    a_sh = torch.randn(64, 4096, dtype=torch.bfloat16, device=DEV)
    b_sh = torch.randn(4096, 64, dtype=torch.bfloat16, device=DEV)
    y = torch.zeros(64, 4096, dtype=torch.bfloat16, device=DEV)
    lora_linear(y, x, a, b, build_segment_meta(slot, L), ranks)  # compile outside the check
    shared_basis_linear(y, x, a_sh, b_sh, flat, offs, crk, build_segment_meta(slot, L))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta = build_segment_meta(slot, L)
        lora_linear(y, x, a, b, meta, ranks)
        shared_basis_linear(y, x, a_sh, b_sh, flat, offs, crk, meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@kernels
def test_expand_without_add_inputs_overwrites_adapter_rows_only():
    from nora_serve.kernels import build_segment_meta, lora_expand
    from nora_serve.kernels import reference as ref

    L = 4
    slot, x, a, b, ranks = _case(16, L, 16, 64, [32], [3, 16, 0, 5], torch.float32, seed=3)
    meta = build_segment_meta(slot, L)
    buf = ref.ref_lora_shrink(x.cpu(), [w.cpu() for w in a], slot.cpu(), ranks.cpu()).to(DEV)
    y0 = torch.randn(16, 32).to(DEV)
    y = y0.clone()
    lora_expand(buf, b, y, meta, ranks, add_inputs=False)
    want = ref.ref_lora_expand(buf.cpu(), [w.cpu() for w in b], y0.cpu(), slot.cpu(), ranks.cpu(), 0, False)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-5, atol=1e-5)


@kernels
def test_custom_ops_registered_and_pass_opcheck():
    from nora_serve.kernels import build_segment_meta
    from nora_serve.kernels.triton_ops import meta_args

    assert hasattr(torch.ops.nora, "lora_shrink") and hasattr(torch.ops.nora, "lora_linear")
    L = 3
    slot, x, a, b, ranks = _case(6, L, 8, 32, [16], [2, 8, 0], torch.float32, seed=2)
    meta = build_segment_meta(slot, L)
    buf = torch.zeros(1, 6, 8, device=DEV)
    torch.library.opcheck(
        torch.ops.nora.lora_shrink,
        (x, a, buf, *meta_args(meta), ranks, 1.0, meta.block_m),
        test_utils=("test_schema", "test_faketensor"),
    )
    y = torch.zeros(6, 16, device=DEV)
    torch.library.opcheck(
        torch.ops.nora.lora_linear,
        (y, x, a, b, *meta_args(meta), ranks, 1.0, 0, meta.block_m),
        test_utils=("test_schema", "test_faketensor"),
    )
