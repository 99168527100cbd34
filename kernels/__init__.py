"""Multi-adapter gather kernels: tensors and index tables only (no adapters, formats or vLLM).

Public API (all ops add into / write caller-owned tensors, vLLM punica style):

    meta = build_segment_meta(token_slot, max_loras)       # token_slot[T] int32, -1 = no adapter
    bufs = SegmentMetaBuffers(max_tokens, max_loras, device); meta = bufs.update(token_slot)
                                                            # same, in persistent buffers (CUDA graphs)
    lora_shrink(x, lora_a, out, meta, ranks, scale)         # out[S, T, max_rank] fp32, overwritten
    lora_expand(inp, lora_b, y, meta, ranks, offset_start, add_inputs)
    lora_linear(y, x, lora_a, lora_b, meta, ranks, scale, offset_start)   # fused shrink+expand
    shared_basis_linear(y, x, a_shared, b_shared, cores_flat, core_offsets, ranks, meta, scale, y_offset)
    shared_basis_inner_linear(y, x, a_shared, b_shared, inner_a, inner_b, ranks, meta, scale, y_offset)
    core_gather(h, cores_flat, core_offsets, ranks, g, meta, scale)
    pack_cores(cores) -> (cores_flat, core_offsets, ranks)

These run the Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (the
tests); the ops are registered as torch.ops.nora.*. ``reference``: the per-token PyTorch
reference both paths are tested against.

``cpu_step``: the one CPU path, the server's: a route per step (``build_route``) and the layer
ops that read it (``lora_linear``, slice-packed ``packed_lora_linear`` / ``batched_lora_linear``
/ ``stacked_lora_linear`` / ``packed_shared_basis_linear``), used by the plugin's CPU punica
wrapper.
"""

from .metadata import (
    DEFAULT_BLOCK_M,
    SegmentMeta,
    SegmentMetaBuffers,
    build_segment_meta,
    max_tiles,
)
from .shared_basis import pack_cores, shared_basis_inner_linear, shared_basis_linear
from .triton_ops import core_gather, lora_expand, lora_linear, lora_shrink

__all__ = [
    "DEFAULT_BLOCK_M",
    "SegmentMeta",
    "SegmentMetaBuffers",
    "build_segment_meta",
    "max_tiles",
    "lora_shrink",
    "lora_expand",
    "lora_linear",
    "core_gather",
    "pack_cores",
    "shared_basis_linear",
    "shared_basis_inner_linear",
]
