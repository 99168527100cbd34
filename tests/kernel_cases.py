"""Test data shared by test_kernels_cpu.py and test_kernels_triton.py (CPU tensors;
the Triton tests move them to their device). Import after
``sys.path.insert(0, <tests dir>)``: tests run with --import-mode=importlib."""

from __future__ import annotations

import torch


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Max abs error at most rtol times the reference's max magnitude."""
    got = got.float().cpu()
    scale = max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"max err {err} vs scale {scale}"


def lora_case(T, L, max_rank, d_in, d_outs, ranks, dtype, seed, none_frac=0.25):
    """Token slots (about none_frac of them -1), x, per-slice stacked A / B in vLLM's
    layout ([L, 1, max_rank, d_in] / [L, 1, n, max_rank]) and int32 ranks."""
    g = torch.Generator().manual_seed(seed)
    slot = torch.randint(0, L, (T,), generator=g, dtype=torch.int32)
    slot[torch.rand(T, generator=g) < none_frac] = -1
    x = torch.randn(T, d_in, generator=g).to(dtype)
    # Scaled so products stay O(1) in fp16.
    a = [(torch.randn(L, 1, max_rank, d_in, generator=g) / d_in**0.5).to(dtype) for _ in d_outs]
    b = [(torch.randn(L, 1, n, max_rank, generator=g) / max_rank**0.5).to(dtype) for n in d_outs]
    return slot, x, a, b, torch.tensor(ranks, dtype=torch.int32)


def random_cores(g, core_ranks, dtype):
    """One r x r core per slot, None for rank 0 (as pack_cores takes them)."""
    return [None if r == 0 else (torch.randn(r, r, generator=g) / r**0.5).to(dtype) for r in core_ranks]


def shared_basis_case(g, L, T, R, d_in, d_out, dtype):
    """Token slots in -1..L-1, x, and a shared basis A [R, d_in], B [d_out, R]."""
    slot = torch.randint(-1, L, (T,), generator=g, dtype=torch.int32)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    a_sh = (torch.randn(R, d_in, generator=g) / d_in**0.5).to(dtype)
    b_sh = (torch.randn(d_out, R, generator=g) / R**0.5).to(dtype)
    return slot, x, a_sh, b_sh


def inner_pair(g, L, R, rmax, dtype):
    """NoRA's stacked inner pair: A_i [L, 1, rmax, R], B_i [L, 1, R, rmax]."""
    a_i = (torch.randn(L, 1, rmax, R, generator=g) / R**0.5).to(dtype)
    b_i = (torch.randn(L, 1, R, rmax, generator=g) / rmax**0.5).to(dtype)
    return a_i, b_i
