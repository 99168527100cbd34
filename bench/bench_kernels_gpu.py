"""Layer-level decode benchmark on a CUDA GPU: base GEMMs vs vLLM's Triton LoRA ops
(vllm.lora.ops.triton_ops.lora_shrink / lora_expand with LoRAKernelMeta, called as
PunicaWrapperGPU.add_lora_linear calls them) vs nora_serve.kernels (rank-aware
fused, and shared-basis), Llama-3-8B shapes.

    python bench/bench_kernels_gpu.py                 # all 7 projections, batch 1..256, 1..1024 adapters
    python bench/bench_kernels_gpu.py --batches 64 --adapters 64 --ranks mixed
    TRITON_INTERPRET=1 python bench/bench_kernels_gpu.py --smoke   # CPU: plumbing + agreement check

Each variant is captured in a CUDA graph (as vLLM decodes) and replayed; --eager
times plain launches instead. Adapter ops are timed apart from the base GEMMs and
all variants share the same stacked weights. The segment tables are built once per
step (for all layers), timed apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels_common as C  # noqa: E402

from nora_serve.kernels import build_segment_meta, pack_cores  # noqa: E402


def vllm_ops():
    from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink

    return LoRAKernelMeta, lora_shrink, lora_expand


def vllm_missing() -> str | None:
    """Why vLLM's Triton LoRA ops cannot be timed here (``None``: they can). A machine with
    torch and Triton but no vLLM still times ours against the base GEMMs."""
    try:
        vllm_ops()
        from vllm.lora.utils import get_captured_lora_counts  # noqa: F401
    except Exception as e:  # ImportError, or vLLM failing to import on this platform
        return f"{type(e).__name__}: {e}"
    return None


def measure_bandwidth(dev) -> float:
    a = torch.empty(256 * 2**20, dtype=torch.float32, device=dev)  # 1 GiB
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), 10, 3)
    return 2 * a.numel() * 4 / t


def cuda_time(fn, iters: int, reps: int) -> float:
    """Median over reps of the mean time of `iters` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) / 1e3 / iters)
    return statistics.median(out)


def as_graph(fn):
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def build_case(case: C.Case, groups, dtype, dev, seed=0):
    T, L = case.batch, case.n_adapters
    g = torch.Generator(device=dev).manual_seed(seed)
    ranks_l = case.ranks()
    layers = []
    for name, d_in, d_outs in groups:
        def r(*shape, s=1.0):
            return (torch.randn(*shape, generator=g, device=dev) * s).to(dtype)

        x = r(T, d_in)
        w = r(sum(d_outs), d_in, s=d_in**-0.5)
        # vLLM's layout, zero-padded past each adapter's rank as vLLM loads it.
        a, b = [], []
        for n in d_outs:
            wa = torch.zeros(L, 1, C.MAX_RANK, d_in, dtype=dtype, device=dev)
            wb = torch.zeros(L, 1, n, C.MAX_RANK, dtype=dtype, device=dev)
            for rk in sorted(set(ranks_l)):
                sl = [i for i, q in enumerate(ranks_l) if q == rk]
                wa[sl, :, :rk] = (r(len(sl), 1, rk, d_in, s=d_in**-0.5))
                wb[sl, :, :, :rk] = r(len(sl), 1, n, rk, s=1 / 8)
            a.append(wa)
            b.append(wb)
        a_sh = [r(C.MAX_RANK, d_in, s=d_in**-0.5) for _ in d_outs]
        b_sh = [r(n, C.MAX_RANK, s=1 / 8) for n in d_outs]
        cores = [pack_cores([torch.randn(q, q, generator=g, device=dev) / q for q in ranks_l],
                            dtype=dtype, device=dev)
                 for _ in d_outs]
        y = torch.zeros(T, sum(d_outs), dtype=dtype, device=dev)
        layers.append((d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y))
    return layers


def variants(case: C.Case, layers, dev, with_vllm=True, specialize=False):
    T, L = case.batch, case.n_adapters
    slot = case.token_slots().to(dev)
    ranks = torch.tensor(case.ranks(), dtype=torch.int32, device=dev)
    meta = build_segment_meta(slot, L)

    out = C.nora_variants(layers, meta, ranks)
    if with_vllm:
        LoRAKernelMeta, lora_shrink, lora_expand = vllm_ops()
        from vllm.lora.utils import get_captured_lora_counts

        vmeta = LoRAKernelMeta.make(L, T, device=dev,
                                    captured_lora_counts=get_captured_lora_counts(L, specialize))
        vmeta.prepare_tensors(slot)
        args = vmeta.meta_args(T, specialize)
        bufs = {len(d): torch.empty(len(d), T, C.MAX_RANK, dtype=torch.float32, device=dev)
                for _, d, *_r in layers}

        def vllm():  # PunicaWrapperGPU.add_lora_linear
            for d_in, d_outs, x, w, a, b, *_r, y in layers:
                buf = bufs[len(d_outs)]
                lora_shrink(x, a, buf, *args, 1.0)
                lora_expand(buf, b, y, *args, offset_start=0, add_inputs=True)

        out["vllm"] = vllm
    return out, meta


def smoke() -> None:
    """CPU + TRITON_INTERPRET=1, tiny shapes: runs every variant's plumbing and checks
    our kernels against vLLM's Triton ops when those can run (they cannot without
    CUDA in vLLM 0.32), else against the PyTorch reference."""
    from nora_serve.kernels.reference import ref_lora_linear

    dev, dtype = "cpu", torch.float16
    groups = [("qkv", 64, (64, 32, 32)), ("down", 96, (64,))]
    for mode in ("uniform", "mixed"):
        case = C.Case(6, 4, mode)
        layers = build_case(case, groups, dtype, dev)
        fns, _ = variants(case, layers, dev, with_vllm=False)
        fns["ours"]()
        y_ours = torch.cat([lay[-1].float().flatten() for lay in layers])
        for lay in layers:
            lay[-1].zero_()
        try:
            fns_v, _ = variants(case, layers, dev, with_vllm=True)
            fns_v["vllm"]()
            y_want = torch.cat([lay[-1].float().flatten() for lay in layers])
            what = "vLLM Triton ops (interpreted)"
        except Exception as e:  # vLLM's Triton ops need CUDA
            print(f"smoke {mode}: vLLM Triton ops not runnable here ({type(e).__name__})")
            slot = case.token_slots()
            ranks = torch.tensor(case.ranks(), dtype=torch.int32)
            y_want = torch.cat([
                ref_lora_linear(torch.zeros_like(y), x, a, b, slot, ranks).flatten()
                for _, _, x, _, a, b, *_r, y in layers])
            what = "PyTorch reference"
        err = ((y_ours - y_want).abs().max() / y_want.abs().max()).item()
        print(f"smoke {mode}: ours vs {what}: max rel diff {err:.2e}")
        assert err < 1e-2
        fns["shared"]()
        fns["base"]()
    print("smoke ok")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.common_args(p)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-bw", type=float, help="GB/s; default: measured device copy bandwidth")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-vllm", action="store_true",
                   help="do not time vLLM's ops (default: timed where vLLM imports)")
    p.add_argument("--vllm-specialize", action="store_true",
                   help="vLLM grid sized by active adapters (specialize_active_lora=True; default False)")
    args = p.parse_args(argv)
    if args.smoke:
        smoke()
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device (use --smoke with TRITON_INTERPRET=1 for a CPU plumbing check)")
    dev = "cuda"
    dtype = getattr(torch, args.dtype)
    layers_n = args.layers or list(C.LLAMA3_8B)
    batches = args.batches or [1, 4, 16, 64, 256]
    adapters = args.adapters or [1, 16, 64, 256, 1024]
    reps = args.reps or 5
    groups = C.layer_groups(layers_n)
    why = "--no-vllm" if args.no_vllm else vllm_missing()
    with_vllm = why is None
    eb = torch.finfo(dtype).bits // 8
    bw = args.peak_bw * 1e9 if args.peak_bw else measure_bandwidth(dev)
    print(f"# GPU decode benchmark: {torch.cuda.get_device_name()}, dtype {args.dtype}, "
          f"layers {layers_n}, max rank {C.MAX_RANK}, {'eager' if args.eager else 'CUDA graphs'}, "
          f"bandwidth for %BW {bw / 1e9:.0f} GB/s")
    if not with_vllm:
        print(f"# vLLM's Triton LoRA ops not timed ({why}): their columns read n/a")
    print()
    print(C.HEADER)
    print(C.SEP)
    for mode in args.ranks:
        for n in adapters:
            layers = build_case(C.Case(max(batches), n, mode), groups, dtype, dev)
            for B in batches:
                case = C.Case(B, n, mode)
                sub = [(d_in, d_outs, x[:B], w, a, b, a_sh, b_sh, cores, y[:B])
                       for d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y in layers]
                fns, _ = variants(case, sub, dev, with_vllm=with_vllm, specialize=args.vllm_specialize)
                order = ["base", "vllm", "ours", "shared"] if with_vllm else ["base", "ours", "shared"]
                run = {k: (fns[k] if args.eager else as_graph(fns[k])) for k in order}
                t = {k: cuda_time(run[k], args.iters, reps) for k in order}
                act = C.active_ranks(case)
                print(C.row(case, t["base"], t.get("vllm"), t["ours"], t["shared"],
                            *C.layer_bytes(B, groups, act, eb), bw), flush=True)
            del layers
            torch.cuda.empty_cache()
    slot = C.Case(max(batches), max(adapters), "mixed").token_slots().to(dev)
    t_meta = cuda_time(lambda: build_segment_meta(slot, max(adapters)), args.iters, reps)
    print(f"\n# segment tables, {max(batches)} tokens / {max(adapters)} slots: {t_meta * 1e6:.1f} us per step")
    print("\n# adapters resident per GiB (bf16), from storage sizes")
    for line in C.storage_table():
        print(line)


if __name__ == "__main__":
    main()
