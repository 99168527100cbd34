"""Plain PyTorch references: one token at a time, fp32, obviously correct.

These define the semantics that the CPU and Triton paths must match. They are
slow on purpose (a Python loop over tokens) and meant for tests only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_3d(w: torch.Tensor) -> torch.Tensor:
    """vLLM stacks per-slot weights as [max_loras, 1, a, b]; accept that or [max_loras, a, b]."""
    if w.dim() == 4:
        if w.shape[1] != 1:
            raise ValueError(f"expected [max_loras, 1, a, b], got {tuple(w.shape)}")
        return w[:, 0]
    if w.dim() != 3:
        raise ValueError(f"expected a 3-D or 4-D stacked weight, got {tuple(w.shape)}")
    return w


# The references share only these small lookups; each keeps its own loop so that
# it still reads as the formula in its docstring.


def _adapter_tokens(token_slot: torch.Tensor, T: int):
    """(t, slot) for each token t < T that has an adapter (slot -1: none)."""
    for t in range(T):
        slot = int(token_slot[t])
        if slot >= 0:
            yield t, slot


def _slice_rank(ranks: torch.Tensor, s: int, slot: int) -> int:
    """ranks is [L] (all slices alike) or [S, L] (per slice)."""
    return int(ranks[s, slot] if ranks.dim() == 2 else ranks[slot])


def _core(cores_flat: torch.Tensor, core_offsets: torch.Tensor, slot: int, r: int) -> torch.Tensor:
    """The slot's r x r core, fp32 on the CPU."""
    off = int(core_offsets[slot])
    return cores_flat[off : off + r * r].float().cpu().view(r, r)


def ref_lora_shrink(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    token_slot: torch.Tensor,
    ranks: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """out[s, t, :r] = scale * x[t] @ A_s[slot, :r].T with r = ranks[slot]; 0 elsewhere.

    lora_a[s]: [L, (1,) max_rank, d_in]; ranks: [L], or [S, L] for per-slice ranks.
    Returns fp32 [S, T, max_rank].
    """
    a = [as_3d(w) for w in lora_a]
    T = x.shape[0]
    R = a[0].shape[1]
    out = torch.zeros(len(a), T, R, dtype=torch.float32)
    for t, slot in _adapter_tokens(token_slot, T):
        for s, w in enumerate(a):
            r = _slice_rank(ranks, s, slot)
            out[s, t, :r] = scale * (w[slot, :r].float().cpu() @ x[t].float().cpu())
    return out


def ref_lora_expand(
    buf: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    y: torch.Tensor,
    token_slot: torch.Tensor,
    ranks: torch.Tensor,
    offset_start: int = 0,
    add_inputs: bool = True,
) -> torch.Tensor:
    """Returns a new y: y[t, off_s:off_s+n_s] (+)= buf[s, t, :r] @ B_s[slot, :, :r].T.

    lora_b[s]: [L, (1,) n_s, max_rank]; slices are laid out back to back from
    offset_start. Rows of no-adapter tokens are left as they are.
    """
    b = [as_3d(w) for w in lora_b]
    out = y.detach().clone().float().cpu()
    for t, slot in _adapter_tokens(token_slot, y.shape[0]):
        off = offset_start
        for s, w in enumerate(b):
            r = _slice_rank(ranks, s, slot)
            n = w.shape[1]
            d = w[slot, :, :r].float().cpu() @ buf[s, t, :r].float().cpu()
            out[t, off : off + n] = (out[t, off : off + n] if add_inputs else 0) + d
            off += n
    return out


def ref_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    token_slot: torch.Tensor,
    ranks: torch.Tensor,
    scale: float = 1.0,
    offset_start: int = 0,
) -> torch.Tensor:
    """y + per-slice scale * B[:, :r] A[:r] x, i.e. shrink then expand (add)."""
    buf = ref_lora_shrink(x, lora_a, token_slot, ranks, scale)
    return ref_lora_expand(buf, lora_b, y, token_slot, ranks, offset_start, True)


def ref_core_gather(
    h: torch.Tensor,
    cores_flat: torch.Tensor,
    core_offsets: torch.Tensor,
    ranks: torch.Tensor,
    token_slot: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """g[t, :r] = scale * C_slot @ h[t, :r], C_slot = cores_flat[off:off+r*r].view(r, r).

    Returns fp32 [T, R] (R = h.shape[1]); zeros past r and for no-adapter tokens.
    """
    T, R = h.shape
    g = torch.zeros(T, R, dtype=torch.float32)
    for t, slot in _adapter_tokens(token_slot, T):
        r = int(ranks[slot])
        c = _core(cores_flat, core_offsets, slot, r)
        g[t, :r] = scale * (c @ h[t, :r].float().cpu())
    return g


def ref_shared_basis_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a_shared: torch.Tensor,
    b_shared: torch.Tensor,
    cores_flat: torch.Tensor,
    core_offsets: torch.Tensor,
    ranks: torch.Tensor,
    token_slot: torch.Tensor,
    scale: float = 1.0,
    y_offset: int = 0,
) -> torch.Tensor:
    """y[t, off:off+d_out] += scale * B_sh[:, :r] C_slot A_sh[:r] x[t] (adapter tokens only).

    a_shared: [R, d_in], b_shared: [d_out, R]; the adapter in a slot of rank r
    uses the first r basis vectors and an r x r core (IntTune's N, LoRA-XS' R,
    or a folded NoRA inner product).
    """
    out = y.detach().clone().float().cpu()
    d_out = b_shared.shape[0]
    for t, slot in _adapter_tokens(token_slot, x.shape[0]):
        r = int(ranks[slot])
        c = _core(cores_flat, core_offsets, slot, r)
        h = a_shared[:r].float().cpu() @ x[t].float().cpu()
        out[t, y_offset : y_offset + d_out] += scale * (b_shared[:, :r].float().cpu() @ (c @ h))
    return out


def ref_shared_basis_inner_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    a_shared: torch.Tensor,
    b_shared: torch.Tensor,
    inner_a: torch.Tensor,
    inner_b: torch.Tensor,
    ranks: torch.Tensor,
    token_slot: torch.Tensor,
    scale: float = 1.0,
    y_offset: int = 0,
) -> torch.Tensor:
    """NoRA: y[t] += scale * B_o B_i[:, :r'] A_i[:r'] A_o x[t].

    inner_a: [L, (1,) max_r', R] (A_i), inner_b: [L, (1,) R, max_r'] (B_i); ranks are r'.
    """
    ia, ib = as_3d(inner_a), as_3d(inner_b)
    out = y.detach().clone().float().cpu()
    d_out = b_shared.shape[0]
    for t, slot in _adapter_tokens(token_slot, x.shape[0]):
        r = int(ranks[slot])
        h = a_shared.float().cpu() @ x[t].float().cpu()
        g = ib[slot, :, :r].float().cpu() @ (ia[slot, :r].float().cpu() @ h)
        out[t, y_offset : y_offset + d_out] += scale * (b_shared.float().cpu() @ g)
    return out
