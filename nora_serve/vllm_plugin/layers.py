"""LoRA layers with shared-basis storage: vLLM's column, merged-column, QKV and row-parallel
LoRA layers, whose stacked LoRA weights cover only the ``K`` dense slots, plus per slice

    nora_basis_a[i]  [G, R, d_in]        the resident shared bases (A side), TP-sliced
    nora_basis_b[i]  [G, d_out_i, R]     (B side), TP-sliced
    nora_cores[i]    [max_loras * R * R] each slot's own core, r x r row-major at s * R * R
    nora_core_ranks  [n_slices, max_loras] int32, 0 = no core in this slot

so a shared-basis adapter costs ``R * R`` numbers per module, not a padded ``A``/``B`` pair.
The forward runs through the punica wrapper's ``add_nora_linear``. Tensor parallelism: a
basis is sliced with the layer's own ``slice_lora_a`` / ``slice_lora_b`` (B by output rows for
column-parallel layers, A by input columns for row-parallel ones); cores stay whole, and the
row-parallel all-reduce completes the sum as for LoRA.
"""

from __future__ import annotations

import contextlib

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

from . import storage
from .storage import BASIS, DENSE


class SharedBasisLayerMixin:
    """Put in front of a stock linear LoRA layer class (see :data:`LAYER_CLASSES`)."""

    nora_sub_modules: list[str] | None = None  # module names per slice (set by the manager hook)

    def _init_lora_stream_context(self) -> None:
        # The dual-stream path calls the stock punica op on the dense stack directly.
        self._enable_aux_cuda_stream = False

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        from .worker import settings

        plan = storage.plan_for(max_loras, settings(), self.device)
        super().create_lora_weights(plan.dense_slots, lora_config, model_config)
        self.nora_plan = plan
        R, G, dt, dev = plan.core_rank, plan.max_groups, lora_config.lora_dtype, self.device
        d_in = self.lora_a_stacked[0].shape[-1]
        self.nora_basis_a = [torch.zeros(G, R, d_in, dtype=dt, device=dev) for _ in range(self.n_slices)]
        self.nora_basis_b = [torch.zeros(G, b.shape[2], R, dtype=dt, device=dev) for b in self.lora_b_stacked]
        self.nora_cores = [torch.zeros(max_loras * R * R, dtype=dt, device=dev) for _ in range(self.n_slices)]
        self.nora_core_ranks = torch.zeros(self.n_slices, max_loras, dtype=torch.int32, device=dev)
        self.nora_group_key: list[str | None] = [None] * G
        self._nora_dense_call = False

    # -- slots -----------------------------------------------------------------------------
    def _activation(self, index: int) -> storage.Activation:
        act = storage.current_activation()
        if act is None or act.slot != index:
            raise RuntimeError(f"nora: set_lora({index}) outside an adapter activation")
        return act

    @contextlib.contextmanager
    def _dense_call(self):
        self._nora_dense_call = True
        try:
            yield
        finally:
            self._nora_dense_call = False

    def reset_lora(self, index: int):
        if self._nora_dense_call:  # the stock set_lora clearing a dense index
            return BaseLinearLayerWithLoRA.reset_lora(self, index)
        self.nora_core_ranks[:, index] = 0
        act = storage.current_activation()
        if act is not None and act.slot == index and act.dense >= 0:
            BaseLinearLayerWithLoRA.reset_lora(self, act.dense)

    def set_lora(self, index: int, lora_a, lora_b):
        act = self._activation(index)
        self.nora_core_ranks[:, index] = 0
        if act.storage.kind == DENSE:
            with self._dense_call():
                super().set_lora(act.dense, lora_a, lora_b)
        elif act.storage.kind == BASIS:
            self._load_basis(act)
            cores = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
            R = self.nora_plan.core_rank
            for i, core in enumerate(cores):
                if core is None:
                    continue
                r = core.shape[0]
                self.nora_cores[i][index * R * R : index * R * R + r * r].copy_(core.reshape(-1))
                self.nora_core_ranks[i, index] = r

    def _load_basis(self, act: storage.Activation) -> None:
        """Copy the activation's basis into its group, unless this layer holds it already."""
        g, st = act.group, act.storage
        if self.nora_group_key[g] == st.basis_key:
            return
        names = self.nora_sub_modules or []
        parts = [storage.bases.module(st.basis_key, st.basis_path, n) for n in names]
        if len(parts) != self.n_slices:
            raise RuntimeError(f"nora: layer has {self.n_slices} slices but {len(parts)} module names")
        a = [p[0] if p else None for p in parts]
        b = [p[1] if p else None for p in parts]
        if self.tp_size > 1:
            if isinstance(self, MergedColumnParallelLinearWithLoRA):
                a, b = self.slice_lora_a(a), self.slice_lora_b(b)
            else:
                a = [self.slice_lora_a(a[0]) if a[0] is not None else None]
                b = [self.slice_lora_b(b[0]) if b[0] is not None else None]
        for i in range(self.n_slices):
            self.nora_basis_a[i][g].zero_()
            self.nora_basis_b[i][g].zero_()
            if a[i] is not None:
                r = a[i].shape[0]
                self.nora_basis_a[i][g, :r].copy_(a[i])
                self.nora_basis_b[i][g, :, :r].copy_(b[i])
        self.nora_group_key[g] = st.basis_key

    # -- forward ---------------------------------------------------------------------------
    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: [1, T, d]
            output, x = output.flatten(0, 1), x.flatten(0, 1)
        self.punica_wrapper.add_nora_linear(output, x, self)
        return output.reshape(shape)

    def nora_storage_bytes(self) -> dict[str, int]:
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        return {"dense": size(self.lora_a_stacked) + size(self.lora_b_stacked),
                "bases": size(self.nora_basis_a) + size(self.nora_basis_b),
                "cores": size(self.nora_cores) + self.nora_core_ranks.numel() * 4}


def _make(stock: type) -> type:
    return type(f"SharedBasis{stock.__name__}", (SharedBasisLayerMixin, stock), {})


# The stock classes whose storage gets a shared-basis part; vLLM's fully sharded and
# replicated variants, logits and embeddings stay stock.
LAYER_CLASSES: tuple[type, ...] = tuple(
    _make(c) for c in (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                       QKVParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA,
                       RowParallelLinearWithLoRA)
)
