"""One :class:`~.adapter_deltas.ModuleEntry` builder per method: its factors (via
:mod:`nora_serve.methods`) and its own forward, shared by every format that stores the method."""

from __future__ import annotations

import torch

from nora_serve.methods import (
    adalora_factors,
    dyrank_factors,
    lora_factors,
    three_matrix_factors,
    vera_factors,
)

from .adapter_deltas import ModuleEntry
from .fold import Chain


def _f64(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype)


def _lora_entry(A, B, scale, rank=None) -> ModuleEntry:
    return ModuleEntry(
        raw={"lora_A": A, "lora_B": B},
        factors=lambda dt: lora_factors(_f64(A, dt), _f64(B, dt), scale),
        forward=lambda x: scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T),
        source_rank=A.shape[0] if rank is None else rank,
        shape=(B.shape[0], A.shape[1]),
    )


def _three_entry(A, N, B, scale) -> ModuleEntry:
    return ModuleEntry(
        raw={"lora_A": A, "lora_N": N, "lora_B": B},
        factors=lambda dt: three_matrix_factors(_f64(A, dt), _f64(N, dt), _f64(B, dt), scale),
        forward=lambda x: scale * (((x @ A.to(x.dtype).T) @ N.to(x.dtype).T) @ B.to(x.dtype).T),
        source_rank=A.shape[0],
        shape=(B.shape[0], A.shape[1]),
        fold_input=lambda dt: Chain(B, scale * N.detach().to(torch.float64), A),
    )


def _dyrank_entry(A, c, B, scale, pruned=None) -> ModuleEntry:
    keep = c != 0
    if pruned is not None:
        keep = keep & ~pruned
    gate = torch.where(keep, c, torch.zeros_like(c))
    raw = {"lora_A": A, "lora_c": c, "lora_B": B}
    if pruned is not None:
        raw["pruned"] = pruned
    return ModuleEntry(
        raw=raw,
        factors=lambda dt: dyrank_factors(_f64(A, dt), _f64(c, dt), _f64(B, dt), scale, pruned),
        forward=lambda x: scale * (((x @ A.to(x.dtype).T) * gate.to(x.dtype)) @ B.to(x.dtype).T),
        source_rank=int(keep.sum()),
        shape=(B.shape[0], A.shape[1]),
    )


def _nora_entry(oA, oB, iA, iB, scale) -> ModuleEntry:
    from nora_serve.methods import nora_factors

    def fwd(x):
        d = x.dtype
        return scale * ((((x @ oA.to(d).T) @ iA.to(d).T) @ iB.to(d).T) @ oB.to(d).T)

    return ModuleEntry(
        raw={"outer_A": oA, "outer_B": oB, "inner_A": iA, "inner_B": iB},
        factors=lambda dt: nora_factors(_f64(oA, dt), _f64(oB, dt), _f64(iA, dt), _f64(iB, dt), scale),
        forward=fwd,
        source_rank=iA.shape[0],
        shape=(oB.shape[0], oA.shape[1]),
    )


def _adalora_entry(A, E, B, alpha, ranknum) -> ModuleEntry:
    scale = alpha / (ranknum + 1e-5)
    return ModuleEntry(
        raw={"lora_A": A, "lora_E": E, "lora_B": B},
        factors=lambda dt: adalora_factors(_f64(A, dt), _f64(E, dt), _f64(B, dt), alpha, ranknum),
        forward=lambda x: (x @ (A.to(x.dtype) * E.to(x.dtype)).T @ B.to(x.dtype).T) * scale,
        source_rank=A.shape[0],
        shape=(B.shape[0], A.shape[1]),
    )


def _vera_entry(vA, vB, ld, lb, d_in) -> ModuleEntry:
    d_out = lb.shape[0]

    def fwd(x):
        d = x.dtype
        h = (x @ vA[:, :d_in].to(d).T) * ld.to(d)
        return (h @ vB[:d_out, :].to(d).T) * lb.to(d)

    return ModuleEntry(
        raw={"vera_lambda_d": ld, "vera_lambda_b": lb},
        factors=lambda dt: vera_factors(_f64(vA, dt), _f64(vB, dt), _f64(ld, dt), _f64(lb, dt), d_in),
        forward=fwd,
        source_rank=ld.shape[0],
        shape=(d_out, d_in),
    )
