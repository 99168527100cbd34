"""Index tables for the segmented kernels: tokens sorted by adapter slot.

Everything here is computed with fixed-size tensor ops (sort, scatter, cumsum,
searchsorted), so building the tables on a GPU needs no host sync and works
inside CUDA graph capture. Sizes depend only on the number of tokens and
`max_loras`, never on the values in `token_slot`.

Conventions shared by all kernels in this package:
  * `token_slot[T]` int32: the adapter slot of each token, -1 = no adapter.
    Any value < 0 is "no adapter"; it is never used as an index.
  * `ranks[max_loras]` int32: the true rank of the adapter in each slot
    (0 = empty slot: no work, no reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCK_M = 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_tiles(num_tokens: int, max_loras: int, block_m: int) -> int:
    """Upper bound on row tiles: sum_s ceil(n_s / bm) <= ceil(T / bm) + #segments."""
    if num_tokens == 0:
        return 0
    return _cdiv(num_tokens, block_m) + min(num_tokens, max_loras)


@dataclass(frozen=True)
class SegmentMeta:
    """Tokens grouped by slot, cut into row tiles of at most `block_m` tokens.

    sorted_tokens[T]   token ids ordered by slot (stable); no-adapter tokens last.
    seg_slot[S]        slot of segment i (segments = slots with >= 1 token, in
                       slot order), -1 for unused entries; S = min(T, max_loras).
    seg_start[S]       start of segment i in sorted_tokens.
    seg_len[S]         tokens in segment i (0 for unused entries).
    tile_slot[N]       slot of row tile j, -1 = idle tile (kernels return at once).
    tile_start[N]      start of tile j in sorted_tokens.
    tile_len[N]        tokens in tile j (<= block_m).
    num_adapter_tokens 0-d int32 tensor: tokens with a slot >= 0.
    """

    token_slot: torch.Tensor
    sorted_tokens: torch.Tensor
    seg_slot: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    tile_slot: torch.Tensor
    tile_start: torch.Tensor
    tile_len: torch.Tensor
    num_adapter_tokens: torch.Tensor
    max_loras: int
    block_m: int

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]

    @property
    def num_tiles(self) -> int:
        return self.tile_slot.shape[0]

    def host_segments(self) -> list[tuple[int, int, int]]:
        """(slot, start, length) of the non-empty segments. Syncs: CPU path only."""
        slots = self.seg_slot.tolist()
        starts = self.seg_start.tolist()
        lens = self.seg_len.tolist()
        return [(s, b, n) for s, b, n in zip(slots, starts, lens) if s >= 0 and n > 0]


def build_segment_meta(
    token_slot: torch.Tensor, max_loras: int, block_m: int = DEFAULT_BLOCK_M
) -> SegmentMeta:
    """Group tokens by slot. `token_slot` values must be in [-1, max_loras)."""
    if token_slot.dim() != 1:
        raise ValueError("token_slot must be 1-D")
    dev = token_slot.device
    T = token_slot.shape[0]
    L = max_loras
    i32 = torch.int32
    slot = token_slot.to(torch.int64)
    # No-adapter tokens get key L so they sort after every real slot.
    key = torch.where(slot < 0, torch.full_like(slot, L), slot)
    _, order = torch.sort(key, stable=True)
    sorted_tokens = order.to(i32)

    counts = torch.zeros(L + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:L]
    slot_start = torch.cumsum(counts, 0) - counts
    num_adapter_tokens = counts.sum().to(i32)

    # Compact the non-empty slots into segments without nonzero() (a host sync):
    # scatter each active slot to its rank among active slots, the rest to a
    # dump entry that is cut off afterwards.
    S = min(T, L)
    active = counts > 0
    pos = torch.cumsum(active.to(torch.int64), 0) - 1
    dest = torch.where(active, pos, torch.full_like(pos, S))
    dest = torch.clamp(dest, max=S)  # active slots beyond S cannot exist (<= T tokens)
    seg_slot = torch.full((S + 1,), -1, dtype=torch.int64, device=dev)
    seg_start = torch.zeros(S + 1, dtype=torch.int64, device=dev)
    seg_len = torch.zeros(S + 1, dtype=torch.int64, device=dev)
    ar = torch.arange(L, device=dev)
    seg_slot.scatter_(0, dest, torch.where(active, ar, torch.full_like(ar, -1)))
    seg_start.scatter_(0, dest, torch.where(active, slot_start, torch.zeros_like(ar)))
    seg_len.scatter_(0, dest, counts)
    # The dump entry may have received anything; only [:S] is kept.
    seg_slot, seg_start, seg_len = seg_slot[:S], seg_start[:S], seg_len[:S]
    seg_len = torch.where(seg_slot >= 0, seg_len, torch.zeros_like(seg_len))

    # Row tiles: segment i owns ceil(len_i / block_m) consecutive tiles.
    N = max_tiles(T, L, block_m)
    tiles_per_seg = (seg_len + block_m - 1) // block_m
    cum = torch.cumsum(tiles_per_seg, 0)
    t = torch.arange(N, device=dev)
    seg_of_tile = torch.searchsorted(cum, t, right=True)
    valid = seg_of_tile < S
    seg_c = torch.clamp(seg_of_tile, max=max(S - 1, 0))
    if S > 0:
        first_tile = cum[seg_c] - tiles_per_seg[seg_c]
        row_off = (t - first_tile) * block_m
        tile_slot = torch.where(valid, seg_slot[seg_c], torch.full_like(t, -1))
        tile_start = torch.where(valid, seg_start[seg_c] + row_off, torch.zeros_like(t))
        tile_len = torch.where(
            valid,
            torch.clamp(seg_len[seg_c] - row_off, min=0, max=block_m),
            torch.zeros_like(t),
        )
    else:
        tile_slot = torch.full((N,), -1, dtype=torch.int64, device=dev)
        tile_start = torch.zeros(N, dtype=torch.int64, device=dev)
        tile_len = torch.zeros(N, dtype=torch.int64, device=dev)

    return SegmentMeta(
        token_slot=token_slot.to(i32),
        sorted_tokens=sorted_tokens,
        seg_slot=seg_slot.to(i32),
        seg_start=seg_start.to(i32),
        seg_len=seg_len.to(i32),
        tile_slot=tile_slot.to(i32),
        tile_start=tile_start.to(i32),
        tile_len=tile_len.to(i32),
        num_adapter_tokens=num_adapter_tokens,
        max_loras=L,
        block_m=block_m,
    )


class SegmentMetaBuffers:
    """Persistent tables for CUDA graphs: a captured graph keeps the addresses of the
    tables, so each step rewrites them in place (like vLLM's LoRAKernelMeta).

        bufs = SegmentMetaBuffers(max_tokens, max_loras, device)
        meta = bufs.update(token_slot)     # outside capture, once per step
        meta = bufs.view(num_tokens)       # same storage, for a (captured) batch size

    Tokens of a view past the last update's count belong to no adapter (their tiles
    are idle), so padding a batch up to a captured size needs no extra step.
    """

    def __init__(self, max_tokens: int, max_loras: int, device, block_m: int = DEFAULT_BLOCK_M):
        self.max_tokens, self.max_loras, self.block_m = max_tokens, max_loras, block_m
        i32 = dict(dtype=torch.int32, device=device)
        S, N = min(max_tokens, max_loras), max_tiles(max_tokens, max_loras, block_m)
        self.token_slot = torch.full((max_tokens,), -1, **i32)
        self.sorted_tokens = torch.arange(max_tokens, **i32)
        self.seg_slot = torch.full((S,), -1, **i32)
        self.seg_start = torch.zeros(S, **i32)
        self.seg_len = torch.zeros(S, **i32)
        self.tile_slot = torch.full((N,), -1, **i32)
        self.tile_start = torch.zeros(N, **i32)
        self.tile_len = torch.zeros(N, **i32)
        self.num_adapter_tokens = torch.zeros((), **i32)

    def update(self, token_slot: torch.Tensor) -> SegmentMeta:
        T = token_slot.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens > max_tokens={self.max_tokens}")
        m = build_segment_meta(token_slot, self.max_loras, self.block_m)
        for name in ("token_slot", "sorted_tokens", "seg_slot", "seg_start", "seg_len",
                     "tile_slot", "tile_start", "tile_len"):
            src = getattr(m, name)
            getattr(self, name)[: src.shape[0]].copy_(src, non_blocking=True)
        self.num_adapter_tokens.copy_(m.num_adapter_tokens, non_blocking=True)
        # Entries past this step's tables go idle, so a graph captured for more tokens
        # than this step's runs no stale tile.
        self.tile_slot[m.num_tiles :].fill_(-1)
        self.tile_len[m.num_tiles :].zero_()
        self.seg_slot[m.seg_slot.shape[0] :].fill_(-1)
        self.seg_len[m.seg_len.shape[0] :].zero_()
        self.token_slot[T:].fill_(-1)
        return self.view(T)

    def view(self, num_tokens: int) -> SegmentMeta:
        S, N = min(num_tokens, self.max_loras), max_tiles(num_tokens, self.max_loras, self.block_m)
        return SegmentMeta(
            token_slot=self.token_slot[:num_tokens],
            sorted_tokens=self.sorted_tokens[:num_tokens],
            seg_slot=self.seg_slot[:S],
            seg_start=self.seg_start[:S],
            seg_len=self.seg_len[:S],
            tile_slot=self.tile_slot[:N],
            tile_start=self.tile_start[:N],
            tile_len=self.tile_len[:N],
            num_adapter_tokens=self.num_adapter_tokens,
            max_loras=self.max_loras,
            block_m=self.block_m,
        )
