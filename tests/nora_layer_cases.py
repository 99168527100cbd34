"""A layer with shared-basis storage as ``layers.py`` fills it (two slices, dense slots, two
basis groups, cores per slot), and its per-token reference: shared by the CPU and GPU punica
wrapper tests of ``add_nora_linear``."""

from __future__ import annotations

from types import SimpleNamespace

import torch

D_IN, SLICES, R_CORE, DENSE_R = 32, (24, 16), 8, 8
# slot -> (lora id, storage): slot 2 is empty, slot 5 a warm-up dummy.
SLOTS = {0: (11, "dense"), 1: (12, "basis:k1"), 2: (None, None), 3: (14, "basis:k2"),
         4: (15, "basis:k1"), 5: (16, "empty"), 6: (17, "dense")}
MAX_LORAS = 8
RANK = {11: 3, 12: 8, 14: 5, 15: 6, 17: 8}
MAPPING = (11, 0, 12, 14, 15, 12, 0, 16, 17, 14, 11, 15)
SLOT_IDS = [SLOTS.get(s, (None, None))[0] for s in range(MAX_LORAS)]


def build(dtype=torch.float32, device="cpu", seed=0):
    """(layer, plan, per-slot weights ``{slot: (P, Q)}`` with ΔW = P Q, per slice)."""
    from nora_serve.serving.storage import AdapterStorage, SlotPlan

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(dtype)

    plan = SlotPlan(MAX_LORAS, 2, 2, R_CORE, device)
    lay = SimpleNamespace(
        nora_plan=plan, output_slices=SLICES,
        lora_a_stacked=tuple(torch.zeros(2, 1, DENSE_R, D_IN, dtype=dtype) for _ in SLICES),
        lora_b_stacked=tuple(torch.zeros(2, 1, n, DENSE_R, dtype=dtype) for n in SLICES),
        nora_basis_a=[torch.zeros(2, R_CORE, D_IN, dtype=dtype) for _ in SLICES],
        nora_basis_b=[torch.zeros(2, n, R_CORE, dtype=dtype) for n in SLICES],
        nora_cores=[torch.zeros(MAX_LORAS * R_CORE**2, dtype=dtype) for _ in SLICES],
        nora_core_ranks=torch.zeros(len(SLICES), MAX_LORAS, dtype=torch.int32),
        nora_group_rank=[[R_CORE, R_CORE] for _ in SLICES],
        base_layer=SimpleNamespace(bias=None), tp_size=1, n_slices=len(SLICES),
    )
    bases = {k: [(rnd(R_CORE, D_IN), rnd(n, R_CORE)) for n in SLICES] for k in ("k1", "k2")}
    want: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    ids = [i for i in SLOT_IDS]
    for slot in sorted(SLOTS):
        lid, kind = SLOTS[slot]
        if lid is None:
            continue
        if kind == "dense":
            st = AdapterStorage("dense", rank=RANK[lid])
        elif kind == "empty":
            st = AdapterStorage("empty")
        else:
            st = AdapterStorage("basis", rank=R_CORE, basis_key=kind[6:])
        act = plan.assign(lid, lambda s=slot: s, st, {i for i in ids[:slot] if i is not None}, None,
                          lambda _: None)
        per_slice = []
        for i, n in enumerate(SLICES):
            if kind == "dense":
                r = RANK[lid]
                a, b = rnd(r, D_IN), rnd(n, r)
                lay.lora_a_stacked[i][act.dense, 0, :r] = a
                lay.lora_b_stacked[i][act.dense, 0, :, :r] = b
                per_slice.append((b, a))
            elif kind.startswith("basis"):
                r = RANK[lid] if lid != 12 else R_CORE
                A, B = bases[kind[6:]][i]
                lay.nora_basis_a[i][act.group] = A
                lay.nora_basis_b[i][act.group] = B
                c = rnd(r, r)
                # As set_lora stores it: zero-padded to the group's basis rank.
                block = lay.nora_cores[i][slot * R_CORE**2 : (slot + 1) * R_CORE**2].view(R_CORE, R_CORE)
                block[:r, :r] = c
                lay.nora_core_ranks[i, slot] = R_CORE
                per_slice.append((B[:, :r] @ c, A[:r]))
        if per_slice:
            want[slot] = per_slice
    for t in [*lay.lora_a_stacked, *lay.lora_b_stacked, *lay.nora_basis_a, *lay.nora_basis_b, *lay.nora_cores]:
        t.data = t.data.to(device)
    lay.nora_core_ranks = lay.nora_core_ranks.to(device)
    from nora_serve.vllm_plugin.output_scale import OutputScales

    lay.nora_out_scale = OutputScales(lay, plan.dense_slots)  # all 1 (no DoRA adapter)
    return lay, plan, want


def pack_like_layers(lay, stacked: bool = True, batched: bool = False):
    """Slice-pack ``lay``'s dense slots and bases as ``layers.py`` does on the CPU (the server's
    path: dense index d up to its rank, group g up to its basis rank); the per-slice tensors stay
    as they are. ``stacked``: the dense slots also side by side in one stack; ``batched``: also
    as bmm batches (the server keeps both)."""
    from nora_serve.kernels.cpu_step import batch_packed, pack_slices, stack_packed

    lay.nora_cpu = True
    lay.nora_packed_dense = [pack_slices([a[d, 0] for a in lay.lora_a_stacked],
                                         [b[d, 0] for b in lay.lora_b_stacked], SLICES)
                             for d in range(2)]
    lay.nora_packed_basis = [pack_slices([a[g] for a in lay.nora_basis_a],
                                         [b[g] for b in lay.nora_basis_b], SLICES)
                             for g in range(2)]
    lay.nora_dense_finite = [True, True]
    stack = stack_packed(lay.nora_packed_dense) if stacked else None
    lay.nora_dense_stack = lambda: stack
    batch = batch_packed(lay.nora_packed_dense, SLICES) if batched else None
    lay.nora_dense_batch = lambda: batch
    return lay


def weights(lay):
    """The ``LayerWeights`` the layer hands the punica wrapper, from the layer above as it is now,
    registered for the CPU wrapper's ops as ``layers.py`` registers its own."""
    from nora_serve.serving.storage import LayerWeights
    from nora_serve.vllm_plugin import opaque

    lw = LayerWeights(
        key=0, plan=lay.nora_plan, output_slices=tuple(lay.output_slices),
        lora_a=tuple(lay.lora_a_stacked), lora_b=tuple(lay.lora_b_stacked), basis_a=lay.nora_basis_a,
        basis_b=lay.nora_basis_b, cores=lay.nora_cores, core_ranks=lay.nora_core_ranks,
        group_rank=lay.nora_group_rank, out_scale=lay.nora_out_scale, packed=getattr(lay, "nora_cpu", False),
        packed_dense=getattr(lay, "nora_packed_dense", []), dense_finite=getattr(lay, "nora_dense_finite", []),
        packed_basis=getattr(lay, "nora_packed_basis", []),
        dense_stack=getattr(lay, "nora_dense_stack", lambda: None),
        dense_batch=getattr(lay, "nora_dense_batch", lambda: None))
    lw.key = opaque.register(lw)
    return lw


def reference(x: torch.Tensor, want, rows: int) -> torch.Tensor:
    """y[t] = ΔW_slot(t) x[t] for the mapped rows (lora id 0 and padding rows: nothing)."""
    slot_of = {lid: s for s, (lid, _) in SLOTS.items() if lid is not None}
    y = torch.zeros(rows, sum(SLICES), dtype=torch.float64)
    for t, lid in enumerate(MAPPING):
        s = slot_of.get(lid)
        if s is None or s not in want:
            continue
        off = 0
        for (p, q), n in zip(want[s], SLICES):
            y[t, off:off + n] = p.double() @ (q.double() @ x[t].double())
            off += n
    return y
