"""Layer-level decode benchmark on the CPU: base GEMMs vs vLLM's CPU LoRA ops
(vllm.lora.ops.torch_ops, called the way PunicaWrapperCPU calls them in decode)
vs the CPU server's path, ``nora_serve.kernels.cpu_step``, called as the nora CPU wrapper calls
it for a layer with shared-basis storage: every slot's slices packed up to its rank, one step
route, then ``batched_lora_linear`` (several slots in segments even enough to pad),
``stacked_lora_linear`` (while the stack is narrow) or ``packed_lora_linear`` (ours), and
``packed_shared_basis_linear`` (shared, every row its own core).

    python bench/bench_kernels_cpu.py            # reduced sweep, a couple of minutes on 2 cores
    python bench/bench_kernels_cpu.py --full     # all seven projections, batch 1..256, 1..1024 adapters

Times are medians of --reps calls, adapter ops timed apart from the base GEMMs
(overhead = adapter time / base time). The token->slot map and its route are built once per
step in serving, so they are timed once, apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels_common as C  # noqa: E402

from nora_serve.kernels import cpu_step  # noqa: E402


def _timer(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_bandwidth() -> float:
    a = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB
    b = torch.empty_like(a)
    a.fill_(1.0)
    t = C.median_time(lambda: b.copy_(a), 5, 1, _timer)
    return 2 * a.numel() * 4 / t


def check_outputs_agree(dtype) -> float:
    """Our CPU path and vLLM's CPU ops give the same delta on an all-adapter batch."""
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    g = torch.Generator().manual_seed(0)
    L, T, d_in, d_out = 8, 16, 512, 256
    ranks = torch.tensor([C.MIXED_RANKS[i % 5] for i in range(L)], dtype=torch.int32)
    a = torch.randn(L, 1, C.MAX_RANK, d_in, generator=g) / d_in**0.5
    b = torch.randn(L, 1, d_out, C.MAX_RANK, generator=g) / 8
    for i, r in enumerate(ranks.tolist()):  # vLLM stores a rank-r adapter zero-padded
        a[i, :, r:] = 0
        b[i, :, :, r:] = 0
    a, b = a.to(dtype), b.to(dtype)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    slot = torch.randint(0, L, (T,), generator=g, dtype=torch.int32)
    y_v = torch.zeros(T, d_out, dtype=dtype)
    buf = torch.zeros(T, C.MAX_RANK, dtype=torch.float32)
    bgmv_shrink(x, a, buf, slot.long(), 1.0)
    bgmv_expand_slice(buf, b, y_v, slot.long(), 0, d_out, True)
    y_o = torch.zeros(T, d_out, dtype=dtype)
    cpu_step.lora_linear(y_o, x, [a], [b], cpu_step.build_route(slot), [ranks.tolist()])
    return ((y_o.float() - y_v.float()).abs().max() / y_v.float().abs().max()).item()


def server_variants(layers, slot: torch.Tensor, ranks_l: list[int]) -> dict:
    """The base GEMMs, and the CPU server's dense and shared-basis ops over ``layers`` (tuples
    d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y), as closures to time; weights packed as
    ``layers.py`` packs them (only the slots the batch uses: the others are not read)."""
    route = cpu_step.build_route(slot)
    padded = cpu_step.pad_route(route)
    table = slot.long()
    used = set(route.slots)
    prepared = []
    for d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y in layers:
        packed = [cpu_step.pack_slices([t[s, 0, :r] for t in a], [t[s, 0, :, :r] for t in b], d_outs)
                  if s in used else None for s, r in enumerate(ranks_l)]
        # The wrapper's choice (punica_cpu.nora_linear): batches, else the stack, else segments.
        batch = cpu_step.batch_covering(cpu_step.batch_packed(packed, d_outs), padded) if padded else None
        stack = cpu_step.stack_packed(packed) if batch is None else None
        if route.mode != cpu_step.SEG or (stack is not None and stack.width > cpu_step.STACK_MAX_COLUMNS):
            stack = None
        basis = cpu_step.pack_slices(a_sh, b_sh, d_outs)
        prepared.append((x, y, packed, batch, stack, basis, cores))
    core_idx = None if route.mode == cpu_step.ALL else table  # every row has an adapter here

    def ours():
        for x, y, packed, batch, stack, *_ in prepared:
            if batch is not None:
                cpu_step.batched_lora_linear(y, x, batch, padded)
            elif stack is not None:
                cpu_step.stacked_lora_linear(y, x, stack, table)
            else:
                cpu_step.packed_lora_linear(y, x, packed, route)

    def shared():
        for x, y, _p, _b, _s, basis, cores in prepared:
            cpu_step.packed_shared_basis_linear(y, x, basis, cores, core_idx, None, route.slot)

    return {"base": C.base_gemms(layers), "ours": ours, "shared": shared}


def run_case(case: C.Case, groups, dtype, reps, peak_bw):
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    eb = torch.finfo(dtype).bits // 8
    T, L = case.batch, case.n_adapters
    g = torch.Generator().manual_seed(T * 7919 + L)
    ranks_l = case.ranks()
    slot = case.token_slots()
    idx = slot.long()
    act = C.active_ranks(case)

    layers = []
    for name, d_in, d_outs in groups:
        x = torch.randn(T, d_in, generator=g).to(dtype)
        w = (torch.randn(sum(d_outs), d_in, generator=g) / d_in**0.5).to(dtype)
        a = [(torch.randn(L, 1, C.MAX_RANK, d_in, generator=g) / d_in**0.5).to(dtype) for _ in d_outs]
        b = [(torch.randn(L, 1, n, C.MAX_RANK, generator=g) / 8).to(dtype) for n in d_outs]
        for i, r in enumerate(ranks_l):  # vLLM stores a rank-r adapter zero-padded
            for t in a:
                t[i, :, r:] = 0
            for t in b:
                t[i, :, :, r:] = 0
        a_sh = [(torch.randn(C.MAX_RANK, d_in, generator=g) / d_in**0.5).to(dtype) for _ in d_outs]
        b_sh = [(torch.randn(n, C.MAX_RANK, generator=g) / 8).to(dtype) for n in d_outs]
        # Each slot's r x r core zero-padded to the basis rank, as a layer stores it: [L, R, R].
        cores = []
        for _ in d_outs:
            c = torch.zeros(L, C.MAX_RANK, C.MAX_RANK, dtype=dtype)
            for i, r in enumerate(ranks_l):
                c[i, :r, :r] = torch.randn(r, r, generator=g).to(dtype) / r**0.5
            cores.append(c)
        y = torch.zeros(T, sum(d_outs), dtype=dtype)
        layers.append((d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y))

    fns = server_variants(layers, slot, ranks_l)

    def vllm_lora():  # PunicaWrapperCPU.add_lora_linear, decode path
        for d_in, d_outs, x, w, a, b, *_r, y in layers:
            bufs = [torch.zeros(T, C.MAX_RANK, dtype=torch.float32) for _ in d_outs]
            for s in range(len(d_outs)):
                bgmv_shrink(x, a[s], bufs[s], idx, 1.0)
            off = 0
            for s, n in enumerate(d_outs):
                bgmv_expand_slice(bufs[s], b[s], y, idx, off, n, True)
                off += n

    t_base, t_v, t_o, t_s = C.interleaved_medians(
        [fns["base"], vllm_lora, fns["ours"], fns["shared"]], reps, 1, _timer)
    return C.row(case, t_base, t_v, t_o, t_s, *C.layer_bytes(T, groups, act, eb), peak_bw), t_v / t_o


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: OpenMP barriers stall badly on a loaded 2-core box")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.full:
        layers = args.layers or list(C.LLAMA3_8B)
        batches = args.batches or [1, 16, 64, 256]
        adapters = args.adapters or [1, 16, 64, 256, 1024]
    else:
        layers = args.layers or ["qkv", "down"]
        batches = args.batches or [1, 16, 64]
        adapters = args.adapters or [1, 16, 64]
    reps = args.reps or 7
    groups = C.layer_groups(layers)

    bw = measure_bandwidth()
    print(f"# CPU decode benchmark: {torch.get_num_threads()} threads, dtype {args.dtype}, "
          f"layers {layers} ({sum(len(o) for _, _, o in groups)} projections), "
          f"max rank {C.MAX_RANK}, measured copy bandwidth {bw / 1e9:.1f} GB/s")
    print(f"# vLLM CPU ops vs ours on one batch: max rel diff {check_outputs_agree(dtype):.2e}")
    T = max(batches)
    slot = C.Case(T, max(adapters), "mixed").token_slots()
    t_meta = C.median_time(lambda: cpu_step.build_route(slot), reps, 1, _timer)
    print(f"# step route for {T} tokens / {max(adapters)} slots: {t_meta * 1e3:.3f} ms (once per step)")
    print()
    print(C.HEADER)
    print(C.SEP)
    speedups = []
    for rank_mode in args.ranks:
        for B in batches:
            for n in adapters:
                line, sp = run_case(C.Case(B, n, rank_mode), groups, dtype, reps, bw)
                speedups.append(sp)
                print(line, flush=True)
    print()
    print(f"# ours vs vLLM CPU ops (adapter time): min {min(speedups):.2f}x, "
          f"median {sorted(speedups)[len(speedups) // 2]:.2f}x over {len(speedups)} cases")
    print()
    print("# adapters resident per GiB (bf16), from storage sizes")
    for line in C.storage_table():
        print(line)


if __name__ == "__main__":
    main()
