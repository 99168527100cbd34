"""The ops nora's punica wrappers add to vLLM's, declared once (as vLLM's ``PunicaWrapperBase``
declares its own): ``punica_cpu.NoraPunicaWrapperCPU`` and ``punica_gpu.NoraPunicaWrapperGPU``
implement them, each on its backend's kernels (``kernels.cpu_step`` / the Triton kernels).

Shapes: ``T`` rows (tokens) of the step, ``d_in`` the layer's input width, ``n_i`` the width of
output slice ``i`` (q/k/v, gate/up), ``L`` = ``max_loras`` slots, ``K`` dense slots of a layer
with shared-basis storage, ``G`` basis groups, ``R`` the plan's core rank. A row's slot comes
from the step's mapping (``update_metadata``); rows without an adapter (slot -1, and padding
rows past the mapping) are never changed by an add, and a slot is read only up to its
adapter's true rank (the stacks are zero past it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nora_serve.serving.storage import LayerWeights


class NoraPunicaOps(ABC):
    """The plugin's ops: dense LoRA, a layer with shared-basis storage, output scale. A wrapper
    lists it after vLLM's class (``class W(PunicaWrapperCPU, NoraPunicaOps)``), so that
    ``super()`` reaches vLLM's ops, not these declarations."""

    @abstractmethod
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer=None, **kwargs: Any) -> None:
        """Dense LoRA (vLLM's stock linear layers), in place:
        ``y[t, slice i] += scale * x[t] A_i[s, :r]^T B_i[s, :, :r]^T``, ``s`` the row's slot.

        ``y`` [T, sum n_i], ``x`` [T, d_in], ``lora_a_stacked[i]`` [L, 1, max_rank, d_in],
        ``lora_b_stacked[i]`` [L, 1, n_i, max_rank]."""

    @abstractmethod
    def add_nora_linear(self, y: torch.Tensor, x: torch.Tensor, w: LayerWeights) -> None:
        """The LoRA part of a layer with shared-basis storage (``layers.py``), in place, per row
        by the storage of its slot (``w.plan``), in this order:

        1. output scale of dense rows holding one (PEFT DoRA): :meth:`scale_output`;
        2. dense LoRA: ``y[t] += x[t] A_d^T B_d^T`` over the ``K`` dense slots
           (``w.lora_a[i]`` [K, 1, r, d_in], ``w.lora_b[i]`` [K, 1, n_i, r]);
        3. shared basis: ``y[t, slice i] += B_g C_s A_g x[t]`` for a row of basis group ``g``
           with its slot's core ``C_s`` (``w.basis_a[i]`` [G, R, d_in], ``w.basis_b[i]``
           [G, n_i, R], ``w.cores[i]`` [L * R * R], slot ``s``'s ``r x r`` core at ``s*R*R``).

        ``y`` [T, sum n_i] holds the base layer's output, ``x`` [T, d_in]."""

    def scale_output(self, y: torch.Tensor, w: LayerWeights, dense_of_row: torch.Tensor) -> None:
        """PEFT DoRA's scale of the base output, in place: ``y[t] *= v_d`` (bias kept unscaled)
        for a row of dense index ``d = dense_of_row[t]`` whose adapter has one; rows at -1 or
        without a scale stay bit for bit (``output_scale.OutputScales``; one implementation for
        every backend: a gather and a multiply)."""
        w.out_scale.apply(y, dense_of_row)
