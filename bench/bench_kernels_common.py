"""Shared pieces of the kernel benchmarks: Llama-3-8B layer shapes, adapter batches,
byte counts, the base GEMMs, the segment kernels' variants (GPU), adapter storage and the
table printer."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

from nora_serve.kernels import lora_linear, shared_basis_linear

# Llama-3-8B decoder layer, grouped as vLLM runs it: merged qkv and gate_up GEMMs
# with one LoRA slice per original projection (seven projections in all).
LLAMA3_8B = {
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
MIXED_RANKS = (4, 8, 16, 32, 64)
MAX_RANK = 64


@dataclass
class Case:
    batch: int
    n_adapters: int
    rank_mode: str  # "uniform" (all max rank: vLLM's best case) or "mixed"

    def ranks(self) -> list[int]:
        if self.rank_mode == "uniform":
            return [MAX_RANK] * self.n_adapters
        return [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(self.n_adapters)]

    def token_slots(self, seed: int = 0) -> torch.Tensor:
        # Every adapter gets ceil(T/n) or floor(T/n) tokens, in random order.
        g = torch.Generator().manual_seed(seed)
        slots = torch.arange(self.batch) % self.n_adapters
        return slots[torch.randperm(self.batch, generator=g)].to(torch.int32)


def layer_groups(names: list[str]) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(n, *LLAMA3_8B[n]) for n in names]


def active_ranks(case: Case) -> list[int]:
    rk = case.ranks()
    return [rk[s] for s in sorted(set(case.token_slots().tolist()))]


def bytes_base(T, d_in, d_outs, eb):
    return (sum(d_outs) * d_in + T * d_in + T * sum(d_outs)) * eb


def bytes_vllm(T, d_in, d_outs, n_act, eb):
    """Padded A/B of each active slot, x, fp32 buffer write+read, y read+write."""
    S = len(d_outs)
    w = n_act * MAX_RANK * (S * d_in + sum(d_outs)) * eb
    return w + T * d_in * eb + 2 * S * T * MAX_RANK * 4 + 2 * T * sum(d_outs) * eb


def bytes_ours(T, d_in, d_outs, act_ranks, eb):
    """A/B of each active slot up to its true rank, x, y read+write (fused, no buffer)."""
    S = len(d_outs)
    w = sum(act_ranks) * (S * d_in + sum(d_outs)) * eb
    return w + T * d_in * eb + 2 * T * sum(d_outs) * eb


def bytes_shared(T, d_in, d_outs, act_ranks, eb, basis_rank=MAX_RANK):
    """Basis once per slice, r x r cores of the active slots, x, y read+write."""
    S = len(d_outs)
    w = basis_rank * (S * d_in + sum(d_outs)) * eb + S * sum(r * r for r in act_ranks) * eb
    return w + T * d_in * eb + 2 * T * sum(d_outs) * eb


def layer_bytes(T, groups, act_ranks, eb) -> tuple[float, float, float, float]:
    """Bytes moved by the base GEMMs, vLLM's ops, ours and the shared basis over `groups`."""
    return (
        sum(bytes_base(T, d, o, eb) for _, d, o in groups),
        sum(bytes_vllm(T, d, o, len(act_ranks), eb) for _, d, o in groups),
        sum(bytes_ours(T, d, o, act_ranks, eb) for _, d, o in groups),
        sum(bytes_shared(T, d, o, act_ranks, eb) for _, d, o in groups),
    )


def base_gemms(layers):
    """The base GEMMs over `layers` (tuples d_in, d_outs, x, w, ..., y), a closure to time."""

    def base():
        for _, _, x, w, *_r, y in layers:
            torch.mm(x, w.t(), out=y)

    return base


def nora_variants(layers, meta, ranks) -> dict:
    """The base GEMMs, our fused LoRA op and the shared-basis op of the segment (Triton)
    kernels over `layers` (tuples d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y), as
    closures to time (the GPU benchmark; the CPU one times the server's ``cpu_step``)."""

    def ours():
        for d_in, d_outs, x, w, a, b, *_r, y in layers:
            lora_linear(y, x, a, b, meta, ranks)

    def shared():
        for d_in, d_outs, x, w, a, b, a_sh, b_sh, cores, y in layers:
            off = 0
            for s, n in enumerate(d_outs):
                flat, offs, rk = cores[s]
                shared_basis_linear(y, x, a_sh[s], b_sh[s], flat, offs, rk, meta, 1.0, off)
                off += n

    return {"base": base_gemms(layers), "ours": ours, "shared": shared}


def storage_table(eb: int = 2) -> list[str]:
    """Adapters resident per GiB for one full set of the seven Llama-3-8B projections
    (the ratio is the same for the whole model: every layer scales both sides)."""
    dims = sum(S_din + sum(douts) for S_din, douts in
               [(len(d) * din, d) for din, d in LLAMA3_8B.values()])
    n_proj = sum(len(d) for _, d in LLAMA3_8B.values())
    basis = MAX_RANK * dims * eb
    gib = 2**30
    vllm_per = MAX_RANK * dims * eb
    lines = [
        f"| adapters | vLLM bytes/adapter (padded to {MAX_RANK}) | shared-basis bytes/adapter "
        f"| vLLM adapters/GiB | shared adapters/GiB (after the {basis / 2**20:.1f} MiB basis) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, ranks in [("uniform r=64", [64]), ("uniform r=32", [32]), ("uniform r=16", [16]),
                         ("uniform r=8", [8]), ("mixed 4..64", list(MIXED_RANKS))]:
        per = n_proj * eb * sum(r * r for r in ranks) / len(ranks)
        v = gib / vllm_per
        s = (gib - basis) / per
        lines.append(f"| {label} | {vllm_per:,.0f} | {per:,.0f} | {v:,.1f} | {s:,.0f} | {s / v:,.0f}x |")
    # NoRA inner pair stacked at r' <= 16 in an R=64 basis: 2 * R * r'max per projection.
    per = n_proj * eb * 2 * MAX_RANK * 16
    v, s = gib / vllm_per, (gib - basis) / per
    lines.append(f"| NoRA inner pair r'<=16 (stacked) | {vllm_per:,.0f} | {per:,.0f} | {v:,.1f} | {s:,.0f} | {s / v:,.0f}x |")
    return lines


def median_time(fn, reps: int, warmup: int, timer) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timer(fn) for _ in range(reps))


def interleaved_medians(fns, reps: int, warmup: int, timer) -> list[float]:
    """Median time of each fn, the fns run round-robin so that load from other
    processes hits them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            times[i].append(timer(fn))
    return [statistics.median(t) for t in times]


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--adapters", type=int, nargs="+")
    p.add_argument("--ranks", nargs="+", default=["uniform", "mixed"], choices=["uniform", "mixed"])
    p.add_argument("--layers", nargs="+", choices=list(LLAMA3_8B))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int)
    p.add_argument("--full", action="store_true", help="the full sweep (all layers, batches, adapters)")


HEADER = (
    "| batch | adapters | ranks | base ms | vLLM +ms (ovh) | ours +ms (ovh) | shared +ms (ovh) "
    "| ours vs vLLM | base MB (%BW) | vLLM MB (%BW) | ours MB (%BW) | shared MB (%BW) |"
)
SEP = "|" + "---|" * 12


def row(case, t_base, t_v, t_o, t_s, b_base, b_v, b_o, b_s, peak_bw) -> str:
    def pct(b, t):
        if t is None:
            return "n/a"
        return f"{b / 1e6:,.1f} ({100 * b / (t * peak_bw):.0f}%)" if t > 0 else f"{b / 1e6:,.1f}"

    def ovh(t):
        return "n/a" if t is None else f"{t * 1e3:.3f} ({100 * t / t_base:.1f}%)"

    vs = "n/a" if t_v is None else f"{t_v / t_o:.2f}x"

    return (
        f"| {case.batch} | {case.n_adapters} | {case.rank_mode} | {t_base * 1e3:.3f} | {ovh(t_v)} "
        f"| {ovh(t_o)} | {ovh(t_s)} | {vs} | {pct(b_base, t_base)} | {pct(b_v, t_v)} "
        f"| {pct(b_o, t_o)} | {pct(b_s, t_s)} |"
    )
