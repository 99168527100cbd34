"""Shared-basis path: adapters that share frozen outer factors (NoRA outer pair,
IntTune's A/B slices of W0) and own only a small core.

    y[t] += scale * B_sh[:, :r] C_slot A_sh[:r] x[t]

The two big products are dense GEMMs done once for the whole batch; only the
r x r core (or NoRA's inner pair) is gathered per token. Cores live packed in
one flat tensor with a per-slot offset table, so a rank-r adapter stores r*r
numbers, not max_rank^2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metadata import SegmentMeta
from .triton_ops import core_gather, lora_expand, lora_shrink


def pack_cores(
    cores: Sequence[torch.Tensor | None], dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack per-slot square cores (None = empty slot) into (cores_flat, core_offsets, ranks).

    cores_flat: [sum r_i^2] row-major cores back to back; core_offsets: [L] int64;
    ranks: [L] int32 (0 for empty slots).
    """
    offs, rks, parts, pos = [], [], [], 0
    for c in cores:
        if c is None:
            offs.append(0)
            rks.append(0)
            continue
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"core must be square, got {tuple(c.shape)}")
        r = c.shape[0]
        offs.append(pos)
        rks.append(r)
        parts.append(c.reshape(-1))
        pos += r * r
    if parts:
        flat = torch.cat(parts)
    else:
        flat = torch.zeros(1)
    if dtype is not None:
        flat = flat.to(dtype)
    dev = device if device is not None else flat.device
    return (
        flat.to(dev),
        torch.tensor(offs, dtype=torch.int64, device=dev),
        torch.tensor(rks, dtype=torch.int32, device=dev),
    )


def shared_basis_linear(
    y: torch.Tensor, x: torch.Tensor, a_shared: torch.Tensor, b_shared: torch.Tensor,
    cores_flat: torch.Tensor, core_offsets: torch.Tensor, ranks: torch.Tensor,
    meta: SegmentMeta, scale: float = 1.0, y_offset: int = 0,
) -> None:
    """y[:, y_offset:y_offset+d_out] += scale * B_sh[:, :r] C_slot A_sh[:r] x, per token.

    a_shared [R, d_in], b_shared [d_out, R] (the basis, in x's dtype); cores packed
    by `pack_cores`; `meta.token_slot` = slot of each token's core, -1 for tokens
    that do not use this basis (their rows of y are not changed).
    """
    # GPU: dense over all tokens (static shapes, no sync); idle tokens get g = 0.
    h = x @ a_shared.t()
    g = torch.empty(x.shape[0], a_shared.shape[0], dtype=torch.float32, device=x.device)
    core_gather(h, cores_flat, core_offsets, ranks, g, meta, scale)
    y[:, y_offset : y_offset + b_shared.shape[0]] += g.to(b_shared.dtype) @ b_shared.t()


def shared_basis_inner_linear(
    y: torch.Tensor, x: torch.Tensor, a_shared: torch.Tensor, b_shared: torch.Tensor,
    inner_a: torch.Tensor, inner_b: torch.Tensor, ranks: torch.Tensor, meta: SegmentMeta,
    scale: float = 1.0, y_offset: int = 0,
) -> None:
    """NoRA: y[t] += scale * B_o B_i[:, :r'] A_i[:r'] A_o x[t].

    a_shared = A_o [R, d_in], b_shared = B_o [d_out, R]; inner_a = A_i stacked
    [L, (1,) max_r', R], inner_b = B_i stacked [L, (1,) R, max_r']; ranks = r' per slot.
    The inner pair runs through the rank-aware shrink/expand in the R-dim space.
    """
    T, R = x.shape[0], a_shared.shape[0]
    h = x @ a_shared.t()
    max_r = inner_a.shape[-2]
    buf = torch.empty(1, T, max_r, dtype=torch.float32, device=x.device)
    lora_shrink(h, [inner_a], buf, meta, ranks, scale)
    g = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    lora_expand(buf, [inner_b], g, meta, ranks, 0, add_inputs=False)
    y[:, y_offset : y_offset + b_shared.shape[0]] += g.to(b_shared.dtype) @ b_shared.t()
