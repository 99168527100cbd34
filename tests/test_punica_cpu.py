"""The CPU punica wrapper on its own: routes built once per step, logits / embedding LoRA
skipped unless a slot of the step has weights there, and its entry points traced by
torch.compile as one opaque op that reads the current step at run time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _wrapper(mapping, slot_ids):
    from vllm.lora.layers import LoRAMapping

    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    w = NoraPunicaWrapperCPU(64, 16, "cpu")
    w.update_metadata(LoRAMapping(mapping, mapping, is_prefill=True), slot_ids, len(slot_ids), 100)
    return w


@pytest.mark.parametrize("route_mode", ["all", "seg"])
def test_logits_lora_only_where_a_slot_has_weights(route_mode):
    """Slot 1 has lm_head weights, slot 0 none: a step of slot-0 rows skips the logits LoRA
    (its slot is all zero anyway), a step with slot-1 rows applies it to exactly those rows."""
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(2, 1, 4, 16)
    b = torch.zeros(2, 1, 32, 4)
    a[1, 0] = torch.randn(4, 16, generator=g)
    b[1, 0] = torch.randn(32, 4, generator=g)
    mapping = (5, 5, 5) if route_mode == "all" else (5, 7, 0)
    w = _wrapper(mapping, [5, 7])
    x = torch.randn(3, 16, generator=g)
    y = torch.zeros(3, 32)
    w.add_lora_logits(y, x, a, b, 1.0)
    want = torch.zeros(3, 32)
    if route_mode == "seg":
        want[1] = x[1] @ a[1, 0].T @ b[1, 0].T
    torch.testing.assert_close(y, want)
    # The live check is cached per (stack, slot, adapter id) and sees new weights under a new id.
    assert not w._any_live(b, [0]) and w._any_live(b, [1])


def test_dense_slot_heads_read_the_dense_index_not_the_slot():
    """With the dense-slot embedding and logits layers (``layers.DenseSlotsMixin``) the stacks
    are indexed by dense index: rows of slot 5 (dense index 1) get index 1's weights, rows of a
    shared-basis adapter (slot 3, no dense index) and of the base get nothing, and index 0 (held
    by no adapter of the step) is never read."""
    from vllm.lora.layers import LoRAMapping

    from nora_serve.serving.state import WorkerState
    from nora_serve.serving.storage import SlotPlan
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    state = WorkerState()
    plan = state.plan = SlotPlan(8, 2, 1, 4, "cpu")
    plan.dense_of_slot[5], plan._dense_owner[1], plan.dense_ranks[1] = 1, 11, 4
    state.dense_heads = True
    w = NoraPunicaWrapperCPU(64, 16, "cpu", state=state)
    ids = [None] * 8
    ids[5], ids[3] = 11, 12
    mapping = (11, 12, 11, 0)
    w.update_metadata(LoRAMapping(mapping, mapping, is_prefill=True), ids, 8, 100)
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([0, 2])

    emb_a, emb_b = torch.randn(2, 10, 4, generator=g), torch.randn(2, 1, 6, 4, generator=g)
    tokens = torch.tensor([2, 7, 3, 9])
    y = torch.zeros(4, 6)
    w.add_dense_embedding(y, tokens, emb_a, emb_b)
    want = torch.zeros(4, 6)
    want[rows] = emb_a[1, tokens[rows]] @ emb_b[1, 0].T
    torch.testing.assert_close(y, want)

    a, b = torch.randn(2, 1, 4, 6, generator=g), torch.randn(2, 1, 10, 4, generator=g)
    x = torch.randn(4, 6, generator=g)
    y = torch.zeros(4, 10)
    w.add_lora_logits(y, x, a, b, 1.0)
    want = torch.zeros(4, 10)
    want[rows] = x[rows] @ a[1, 0].T @ b[1, 0].T
    torch.testing.assert_close(y, want)


def _layer_case(dtype=torch.float32):
    """(wrapper, layer weights registered for the compiled graph's op, a layer forward as vLLM
    calls it: our shared-basis layer's ``_apply_lora_to_output`` on a stand-in layer)."""
    from types import SimpleNamespace

    import nora_layer_cases as cases

    from nora_serve.vllm_plugin.layers import SharedBasisLayerMixin
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    lay, plan, want = cases.build(dtype)
    w = NoraPunicaWrapperCPU(64, 16, "cpu")  # sets the kernels' prepacked GEMM before packing
    lw = cases.weights(cases.pack_like_layers(lay))  # registered for the op, as layers.py registers its own
    layer = SimpleNamespace(punica_wrapper=w, nora=lw)

    def layer_forward(x):
        y = torch.zeros(x.shape[0], sum(cases.SLICES), dtype=x.dtype)
        return SharedBasisLayerMixin._apply_lora_to_output(layer, x, y) * 1.0

    return w, lw, want, layer_forward


def _map(w, mapping):
    import nora_layer_cases as cases
    from vllm.lora.layers import LoRAMapping

    w.update_metadata(LoRAMapping(mapping, mapping, is_prefill=False), cases.SLOT_IDS,
                      cases.MAX_LORAS, 100)


def test_compiled_graph_reads_each_steps_routes():
    """torch.compile(fullgraph=True) of a layer call: the graph holds the opaque op, and one
    compiled function serves two steps with different adapters exactly as eager does."""
    import nora_layer_cases as cases

    w, lw, want, layer_forward = _layer_case()
    rows = len(cases.MAPPING)
    x = torch.randn(rows, cases.D_IN, generator=torch.Generator().manual_seed(3))
    graphs = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(layer_forward, fullgraph=True, dynamic=True, backend=backend)
    for mapping in (cases.MAPPING, tuple(reversed(cases.MAPPING))):
        _map(w, mapping)
        eager = layer_forward(x)
        torch.testing.assert_close(compiled(x), eager)
        assert eager.abs().sum() > 0
        if mapping == cases.MAPPING:
            torch.testing.assert_close(eager.double(), cases.reference(x, want, rows), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any("nora.cpu_nora_linear" in t for t in targets), targets
    assert not any("mm" in t.split(".")[-2:][0] for t in targets), targets  # no GEMM traced in


# -- how deep the forward is: vLLM's layer -> the first GEMM of the adapter ---------------------
GEMMS = {"mm", "addmm", "addmm_", "matmul", "__matmul__", "bmm", "baddbmm", "einsum", "linear",
         "onednn_mm"}  # the last: vLLM's oneDNN GEMM on a reordered weight (bf16 shrinks)
REPO = str(Path(__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)


def _calls_to_first_gemm(fn, *args) -> tuple[int, list[str], str]:
    """Run ``fn(*args)`` under ``sys.setprofile``; at the first GEMM (a torch builtin), the
    plugin's Python calls on the stack between the layer and it: frames of this repository
    (not tests), counted up from the one that calls the GEMM until the layer method
    (``_apply_lora_to_output``, ours or vLLM's) or code that is not ours (vLLM's layer, or a
    compiled graph and torch's op dispatch). Returns (count, their names, the GEMM's name)."""
    found: list = []

    def profile(frame, event, arg):
        if found or event != "c_call" or getattr(arg, "__name__", "") not in GEMMS:
            return
        chain = []
        f = frame
        while f is not None:
            path = f.f_code.co_filename
            if f.f_code.co_name == "_apply_lora_to_output":
                break
            if "/torch/" in path:  # torch's own Python (Tensor.__matmul__, op dispatch)
                if chain:
                    break
                f = f.f_back
                continue
            if not path.startswith(REPO) or path.startswith(TESTS) or "/.venv/" in path:
                break
            chain.append(f"{Path(path).name}:{f.f_code.co_name}")
            f = f.f_back
        found.append((chain[::-1], arg.__name__))

    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    assert found, "no GEMM ran"
    return len(found[0][0]), found[0][0], found[0][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("step", ["mixed", "one-dense", "one-basis"])
def test_decode_step_reaches_first_gemm_in_three_calls(compiled, step, dtype):
    """A decode step of a shared-basis layer (slice-packed weights, as the CPU server holds
    them): at most three Python calls from vLLM's layer method to the adapter's first GEMM, in
    eager mode (layer -> wrapper's add_nora_linear -> punica_cpu.nora_linear -> cpu_step op)
    and compiled (graph -> the op's function -> cpu_step op). In bf16 that GEMM is vLLM's
    oneDNN one on the reordered weight, where this vLLM build has it."""
    import nora_layer_cases as cases

    from nora_serve.vllm_plugin.punica_cpu import onednn_prepack

    w, lw, want, layer_forward = _layer_case(dtype)
    mapping = {"mixed": cases.MAPPING, "one-dense": (11,) * 4, "one-basis": (12,) * 4}[step]
    x = torch.randn(len(mapping), cases.D_IN, generator=torch.Generator().manual_seed(4)).to(dtype)
    _map(w, mapping)
    fn = layer_forward
    if compiled:
        fn = torch.compile(layer_forward, fullgraph=True, dynamic=True)
        fn(x)  # trace and compile outside the measurement
    n, chain, gemm = _calls_to_first_gemm(fn, x)
    assert n <= 3, chain
    assert chain[0] == ("punica_cpu.py:nora_linear" if compiled else "punica_cpu.py:add_nora_linear")
    assert chain[-1].startswith("cpu_step.py:"), chain
    if dtype == torch.bfloat16 and step != "mixed" and onednn_prepack() is not None:
        assert gemm == "onednn_mm", (gemm, chain)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stock_layer_reaches_first_gemm_in_three_calls(compiled):
    """vLLM's own ``_apply_lora_to_output`` (a stock linear LoRA layer) on the nora CPU wrapper:
    layer -> add_lora_linear -> punica_cpu.lora_linear -> cpu_step.lora_linear -> GEMM."""
    from types import SimpleNamespace

    from vllm.lora.layers import LoRAMapping
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    g = torch.Generator().manual_seed(5)
    slices = (24, 16)
    layer = SimpleNamespace(
        punica_wrapper=NoraPunicaWrapperCPU(64, 16, "cpu"), output_slices=slices,
        lora_a_stacked=tuple(torch.randn(4, 1, 8, 32, generator=g) for _ in slices),
        lora_b_stacked=tuple(torch.randn(4, 1, n, 8, generator=g) for n in slices))
    mapping = (7, 0, 9, 7)
    layer.punica_wrapper.update_metadata(LoRAMapping(mapping, mapping, is_prefill=False),
                                         [None, 7, None, 9], 4, 100)

    def layer_forward(x):
        y = torch.zeros(x.shape[0], sum(slices))
        return BaseLinearLayerWithLoRA._apply_lora_to_output(layer, x, y) * 1.0

    x = torch.randn(len(mapping), 32, generator=g)
    fn = layer_forward
    if compiled:
        fn = torch.compile(layer_forward, fullgraph=True, dynamic=True)
        torch.testing.assert_close(fn(x), layer_forward(x))
    n, chain, _ = _calls_to_first_gemm(fn, x)
    assert n <= 3, chain
    assert chain[-1] == "cpu_step.py:lora_linear", chain


def test_prepacked_shrinks_give_torch_mm_bits():
    """bf16 shrinks through vLLM's oneDNN GEMM on reordered weights (one adapter's rows, the
    dense stack, a shared basis) give exactly what torch.mm gives: serving outputs do not
    change with it."""
    from nora_serve.kernels import cpu_step
    from nora_serve.vllm_plugin.punica_cpu import onednn_prepack

    prepack = onednn_prepack()
    if prepack is None:
        pytest.skip("this vLLM build has no oneDNN GEMM")
    g = torch.Generator().manual_seed(9)
    slices, d_in, rows = (48, 16, 16), 64, 37

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(torch.bfloat16)

    slots = [([rnd(r, d_in) for r in (8, 4, 8)], [rnd(n, r) for n, r in zip(slices, (8, 4, 8))])
             for _ in range(3)]
    x = rnd(rows, d_in)
    table = torch.tensor([i % 3 for i in range(rows)])
    cores = [rnd(3, r, r) for r in (8, 4, 8)]
    core_idx = table.clone()
    out = {}
    try:
        for name, pre in (("prepacked", prepack), ("torch.mm", None)):
            cpu_step.set_prepack(pre)
            packed = [cpu_step.pack_slices(a, b, slices) for a, b in slots]
            stack = cpu_step.stack_packed(packed)
            assert (packed[0].a_pre is not None and stack.a_pre is not None) == (pre is not None)
            ys = [torch.zeros(rows, sum(slices), dtype=torch.bfloat16) for _ in range(3)]
            cpu_step.packed_lora_linear(ys[0], x, packed, cpu_step.build_route(torch.full((rows,), 1)))
            cpu_step.stacked_lora_linear(ys[1], x, stack, table)
            cpu_step.packed_shared_basis_linear(ys[2], x, packed[2], cores, core_idx, None, -1)
            out[name] = ys
    finally:
        cpu_step.set_prepack(prepack)
    for got, want in zip(out["prepacked"], out["torch.mm"]):
        assert want.abs().sum() > 0
        assert torch.equal(got, want)


@pytest.mark.parametrize("rows", [16, 63, 64, 130])
def test_prepacked_expand_adds_the_torch_mm_product(rows):
    """Below ``PREPACK_EXPAND_ROWS`` rows a packed expand (one adapter's slices, a shared
    basis) runs vLLM's oneDNN GEMM on the reordered ``B`` and adds its result: exactly
    ``y + torch.mm(h, B^T)`` (the product rounded once, then added); from there on the fused
    ``addmm_`` as before. Either way within bf16 rounding of the fp32 product."""
    from nora_serve.kernels import cpu_step
    from nora_serve.vllm_plugin.punica_cpu import onednn_prepack

    prepack = onednn_prepack()
    if prepack is None:
        pytest.skip("this vLLM build has no oneDNN GEMM")
    before = cpu_step._PREPACK
    cpu_step.set_prepack(prepack)
    try:
        _check_prepacked_expand(cpu_step, rows)
    finally:
        cpu_step.set_prepack(before)


def _check_prepacked_expand(cpu_step, rows: int) -> None:
    g = torch.Generator().manual_seed(4)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(torch.bfloat16)

    slices, d_in = (96, 32, 32), 64
    a, b = [rnd(8, d_in) for _ in slices], [rnd(n, 8) for n in slices]
    packed = cpu_step.pack_slices(a, b, slices)
    assert packed.b_pre is not None
    x, y0 = rnd(rows, d_in), rnd(rows, sum(slices))
    y = y0.clone()
    cpu_step.packed_lora_linear(y, x, [packed], cpu_step.build_route(torch.zeros(rows, dtype=torch.int64)))
    h = torch.mm(x, packed.a_cat.t())
    if rows < cpu_step.PREPACK_EXPAND_ROWS:
        assert torch.equal(y, y0 + torch.mm(h, packed.b_bd.t()))
    else:
        want = y0.clone()
        cpu_step._expand_packed(want, h, packed._replace(b_pre=None))
        assert torch.equal(y, want)
    exact = y0.float() + x.float() @ packed.a_cat.float().t() @ packed.b_bd.float().t()
    torch.testing.assert_close(y.float(), exact, atol=0.03, rtol=0.02)
    assert not torch.equal(y, y0)
    # The dense stack (rows of two slots side by side), all rows and only some rows.
    other = cpu_step.pack_slices([rnd(4, d_in) for _ in slices], [rnd(n, 4) for n in slices], slices)
    stack = cpu_step.stack_packed([packed, other])
    assert stack.b_pre is not None
    table = torch.arange(rows) % 2
    keep = cpu_step.stack_keep(stack, table)
    hk = torch.where(keep, torch.mm(x, stack.a_all.t()), torch.zeros((), dtype=torch.bfloat16))
    y = y0.clone()
    cpu_step.stacked_lora_linear(y, x, stack, table)
    y_rows = y0.clone()
    sel = torch.arange(0, rows, 3)
    cpu_step.stacked_lora_linear(y_rows, x, stack, table, rows=sel)
    if rows < cpu_step.PREPACK_EXPAND_ROWS:
        assert torch.equal(y, y0 + torch.mm(hk, stack.b_all.t()))
    else:
        assert torch.equal(y, y0.clone().addmm_(hk, stack.b_all.t()))
    assert torch.equal(y_rows, y0.clone().index_add_(0, sel, torch.mm(hk[sel], stack.b_all.t())))


def test_both_wrappers_implement_the_plugins_ops():
    """One interface (punica_base.NoraPunicaOps), each backend's wrapper defining every op."""
    from nora_serve.vllm_plugin.punica_base import NoraPunicaOps
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    classes = [NoraPunicaWrapperCPU]
    try:
        from nora_serve.vllm_plugin.punica_gpu import NoraPunicaWrapperGPU

        classes.append(NoraPunicaWrapperGPU)
    except Exception:  # vLLM's GPU wrapper does not import everywhere (test_punica_gpu.py)
        pass
    for cls in classes:
        assert issubclass(cls, NoraPunicaOps) and not cls.__abstractmethods__, cls
        assert {"add_lora_linear", "add_nora_linear"} <= set(vars(cls)), cls
