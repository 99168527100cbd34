"""LoRA layers with shared-basis storage: vLLM's column, merged-column, QKV and row-parallel
LoRA layers, whose stacked LoRA weights cover only the ``K`` dense slots, plus per slice

    nora_basis_a[i]  [G, R, d_in]        the resident shared bases (A side), TP-sliced
    nora_basis_b[i]  [G, d_out_i, R]     (B side), TP-sliced
    nora_cores[i]    [max_loras * R * R] each slot's own core, r x r row-major at s * R * R
                     (rows of one ``nora_cores_all`` [n_slices, max_loras * R * R])
    nora_core_ranks  [n_slices, max_loras] int32, 0 = no core in this slot

so a shared-basis adapter costs ``R * R`` numbers per module, not a padded ``A``/``B`` pair.
The forward is one call of the punica wrapper's ``add_nora_linear`` (``punica_base.py``). The
classes are made per worker by :func:`layer_classes`, which gives them the worker's state
(``nora_state``: the slot plan, the activation in progress, the resident bases). Tensor
parallelism: a basis is sliced with the layer's own ``slice_lora_a`` / ``slice_lora_b`` (B by
output rows for column-parallel layers, A by input columns for row-parallel ones); cores stay
whole, and the row-parallel all-reduce completes the sum as for LoRA.
"""

from __future__ import annotations

import contextlib

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    LogitsProcessorWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
    VocabParallelEmbeddingWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

from nora_serve.kernels import cpu_step
from nora_serve.serving import storage
from nora_serve.serving.state import WorkerState
from nora_serve.serving.storage import BASIS, DENSE

from . import opaque
from .output_scale import OutputScales


class SharedBasisLayerMixin:
    """Put in front of a stock linear LoRA layer class (see :func:`layer_classes`)."""

    nora_state: WorkerState  # the worker's state, given once per class by layer_classes()
    nora_sub_modules: list[str] | None = None  # module names per slice (set by the manager hook)

    def _init_lora_stream_context(self) -> None:
        # The dual-stream path calls the stock punica op on the dense stack directly.
        self._enable_aux_cuda_stream = False

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        plan = self.nora_state.plan_for(max_loras, self.device)
        super().create_lora_weights(plan.dense_slots, lora_config, model_config)
        self.nora_plan = plan
        R, G, dt, dev = plan.core_rank, plan.max_groups, lora_config.lora_dtype, self.device
        d_in = self.lora_a_stacked[0].shape[-1]
        self.nora_basis_a = [torch.zeros(G, R, d_in, dtype=dt, device=dev) for _ in range(self.n_slices)]
        self.nora_basis_b = [torch.zeros(G, b.shape[2], R, dtype=dt, device=dev) for b in self.lora_b_stacked]
        # One allocation, a flat view per slice: the CPU op gathers a step's cores of every slice
        # in one op (kernels.cpu_step.packed_shared_basis_linear).
        self.nora_cores_all = torch.zeros(self.n_slices, max_loras * R * R, dtype=dt, device=dev)
        self.nora_cores = list(self.nora_cores_all.unbind(0))
        self.nora_core_ranks = torch.zeros(self.n_slices, max_loras, dtype=torch.int32, device=dev)
        # Rank of each resident basis per slice: every core of that group is stored at it.
        self.nora_group_rank = [[0] * G for _ in range(self.n_slices)]
        self.nora_group_key: list[str | None] = [None] * G
        self._nora_dense_call = False
        # A bulk load's cores by slot, [(core, stored rank) or None per slice], written in one
        # indexed copy per slice by nora_flush_cores (a copy per slot cost a third of the load).
        self._nora_pending: dict[int, list] = {}
        # CPU: each dense index's and each group's weights with the slices packed together
        # (``kernels.cpu_step.pack_slices``), rebuilt when a slot or basis is set.
        self.nora_cpu = torch.device(dev).type == "cpu"
        self.nora_packed_dense: list = [None] * plan.dense_slots
        self.nora_dense_finite: list[bool] = [True] * plan.dense_slots
        self._nora_stack: cpu_step.Stack | None = None
        self._nora_stack_dirty = False
        self._nora_batch: cpu_step.Batch | None = None
        self._nora_batch_dirty = False
        self.nora_packed_basis: list = [None] * G
        self.nora_out_scale = OutputScales(self, plan.dense_slots)  # PEFT DoRA's v per dense index
        # All the punica wrapper reads of this layer (the same tensors and lists, filled below).
        self.nora = storage.LayerWeights(
            key=0, plan=plan, output_slices=tuple(self.output_slices),
            lora_a=tuple(self.lora_a_stacked), lora_b=tuple(self.lora_b_stacked),
            basis_a=self.nora_basis_a, basis_b=self.nora_basis_b, cores=self.nora_cores,
            cores_all=self.nora_cores_all,
            core_ranks=self.nora_core_ranks, group_rank=self.nora_group_rank, out_scale=self.nora_out_scale,
            packed=self.nora_cpu, packed_dense=self.nora_packed_dense, dense_finite=self.nora_dense_finite,
            packed_basis=self.nora_packed_basis, dense_stack=self.nora_dense_stack,
            dense_batch=self.nora_dense_batch)
        self.nora.key = opaque.register(self.nora)  # how the compiled graph's op finds them

    # -- slots -----------------------------------------------------------------------------
    def _activation(self, index: int) -> storage.Activation:
        act = self.nora_state.activation
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

    def _clear_cores(self, index: int) -> None:
        R = self.nora_plan.core_rank
        self._nora_pending.pop(index, None)
        self.nora_core_ranks[:, index] = 0
        for cores in self.nora_cores:  # the CPU path reads a group's cores as whole blocks
            cores[index * R * R:(index + 1) * R * R].zero_()

    def reset_lora(self, index: int):
        if self._nora_dense_call:  # the stock set_lora clearing a dense index
            self._set_packed_dense(index, None)
            self.nora_out_scale.set(index, None)
            return BaseLinearLayerWithLoRA.reset_lora(self, index)
        self._clear_cores(index)
        act = self.nora_state.activation
        if act is not None and act.slot == index and act.dense >= 0:
            self._set_packed_dense(act.dense, None)
            self.nora_out_scale.set(act.dense, None)
            BaseLinearLayerWithLoRA.reset_lora(self, act.dense)

    def _pack_dense(self, d: int, rank: int) -> None:
        """Slice-pack dense index ``d`` as the stock set_lora stored it (TP-sliced), read up to
        the adapter's rank."""
        r = min(rank, self.lora_a_stacked[0].shape[-2])
        a = [t[d, 0, :r] for t in self.lora_a_stacked]
        b = [t[d, 0, :, :r] for t in self.lora_b_stacked]
        self._set_packed_dense(d, cpu_step.pack_slices(a, b, self.output_slices))

    def _set_packed_dense(self, d: int, packed) -> None:
        if not self.nora_cpu:
            return
        self.nora_packed_dense[d] = packed
        # A non-finite adapter never joins the stack (its zeros would not mask it out there).
        self.nora_dense_finite[d] = packed is None or bool(
            torch.isfinite(packed.a_cat).all() and torch.isfinite(packed.b_bd).all())
        self._nora_stack_dirty = self._nora_batch_dirty = True

    def nora_dense_stack(self) -> cpu_step.Stack | None:
        """All finite dense slots side by side (``cpu_step.stacked_lora_linear``), rebuilt
        after a dense slot changed."""
        if self._nora_stack_dirty:
            self._nora_stack = cpu_step.stack_packed(
                [p if ok else None for p, ok in zip(self.nora_packed_dense, self.nora_dense_finite)])
            self._nora_stack_dirty = False
        return self._nora_stack

    def nora_dense_batch(self) -> cpu_step.Batch | None:
        """The dense slots up to the last non-empty one as bmm batches
        (``cpu_step.batched_lora_linear``; ``None`` where most would be empty), rebuilt after a
        dense slot changed."""
        if self._nora_batch_dirty:
            self._nora_batch = cpu_step.batch_packed(self.nora_packed_dense, self.output_slices)
            self._nora_batch_dirty = False
        return self._nora_batch

    def set_lora(self, index: int, lora_a, lora_b):
        act = self._activation(index)
        if act.storage.kind == BASIS and self.nora_state.preloading:
            self._load_basis(act)
            cores = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
            self._nora_pending[index] = [None if c is None else (c, self._stored_rank(i, act, c))
                                         for i, c in enumerate(cores)]
            return
        self._clear_cores(index)
        if act.storage.kind == DENSE:
            with self._dense_call():
                super().set_lora(act.dense, lora_a, lora_b)
            if self.nora_cpu:
                self._pack_dense(act.dense, act.storage.rank or self.lora_a_stacked[0].shape[-2])
            scales = act.storage.output_scale
            if scales:
                self.nora_out_scale.set(act.dense, [scales.get(n) for n in (self.nora_sub_modules or ())])
        elif act.storage.kind == BASIS:
            self._load_basis(act)
            cores = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
            R = self.nora_plan.core_rank
            for i, core in enumerate(cores):
                if core is None:
                    continue
                r = self._stored_rank(i, act, core)
                block = self.nora_cores[i][index * R * R : index * R * R + r * r].view(r, r)
                block[: core.shape[0], : core.shape[1]].copy_(core)
                self.nora_core_ranks[i, index] = r

    def _stored_rank(self, i: int, act: storage.Activation, core: torch.Tensor) -> int:
        """Slice ``i``'s core is stored at its group's basis rank (zero-padded if smaller): one
        size per group."""
        return max(core.shape[0], self.nora_group_rank[i][act.group])

    def nora_flush_cores(self) -> None:
        """Write the cores ``set_lora`` set aside during a bulk load: per slice, the slots' blocks
        cleared, then one indexed copy per (stored rank, core shape), as ``set_lora`` lays them out
        (``r x r`` row-major at ``slot * R * R``, zero-padded up to the group's basis rank)."""
        pending, self._nora_pending = self._nora_pending, {}
        if not pending:
            return
        R, dev = self.nora_plan.core_rank, self.nora_core_ranks.device
        slots = torch.tensor(list(pending), dtype=torch.long, device=dev)
        self.nora_core_ranks[:, slots] = 0
        for i, flat in enumerate(self.nora_cores):
            blocks = flat.view(-1, R * R)
            blocks.index_fill_(0, slots, 0)
            by_shape: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
            for slot, per_slice in pending.items():
                if per_slice[i] is not None:
                    core, r = per_slice[i]
                    group = by_shape.setdefault((r, *core.shape), ([], []))
                    group[0].append(slot)
                    group[1].append(core)
            for (r, h, w), (ss, cs) in by_shape.items():
                idx = torch.tensor(ss, dtype=torch.long, device=dev)
                z = blocks.new_zeros(len(ss), R * R)
                z[:, : r * r].view(-1, r, r)[:, :h, :w] = torch.stack(cs).to(z.device)
                blocks.index_copy_(0, idx, z)
                self.nora_core_ranks[i, idx] = r

    def _load_basis(self, act: storage.Activation) -> None:
        """Copy the activation's basis into its group, unless this layer holds it already."""
        g, st = act.group, act.storage
        if self.nora_group_key[g] == st.basis_key:
            return
        names = self.nora_sub_modules or []
        parts = [self.nora_state.bases.module(st.basis_key, st.basis_path, n) for n in names]
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
            self.nora_group_rank[i][g] = 0
            if a[i] is not None:
                r = a[i].shape[0]
                self.nora_basis_a[i][g, :r].copy_(a[i])
                self.nora_basis_b[i][g, :, :r].copy_(b[i])
                self.nora_group_rank[i][g] = r
        self.nora_group_key[g] = st.basis_key
        if self.nora_cpu:
            rk = [self.nora_group_rank[i][g] for i in range(self.n_slices)]
            self.nora_packed_basis[g] = cpu_step.pack_slices(
                [self.nora_basis_a[i][g, :r] if r else None for i, r in enumerate(rk)],
                [self.nora_basis_b[i][g, :, :r] if r else None for i, r in enumerate(rk)],
                self.output_slices)

    # -- forward ---------------------------------------------------------------------------
    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: [1, T, d]
            output, x = output.flatten(0, 1), x.flatten(0, 1)
        self.punica_wrapper.add_nora_linear(output, x, self.nora)
        return output.reshape(shape)

    def nora_storage_bytes(self) -> dict[str, int]:
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        return {"dense": size(self.lora_a_stacked) + size(self.lora_b_stacked),
                "bases": size(self.nora_basis_a) + size(self.nora_basis_b),
                "cores": size(self.nora_cores) + self.nora_core_ranks.numel() * 4}


class DenseSlotsMixin:
    """vLLM's embedding and logits LoRA layers with stacks for the ``K`` dense slots only.

    Stock, they hold ``[max_loras, vocab, rank]`` twice (embedding A, lm_head B): 3.4 GB zeroed
    at start for 10,240 slots on a 4,096-token vocabulary, 84 GB on a 128k one, for weights that
    only dense adapters have (a shared-basis adapter is cores in the linear layers). Slot ``s``'s
    weights are at dense index ``plan.dense_of_slot[s]``; the CPU wrapper reads them there
    (``punica_cpu``: ``add_dense_embedding``, ``add_lora_logits``)."""

    nora_state: WorkerState
    _nora_direct = False  # the stock set_lora's own reset_lora call: already a dense index

    def reset_lora(self, index: int):
        if self._nora_direct:
            return super().reset_lora(index)
        act = self.nora_state.activation
        # Outside an activation there is nothing to clear: a dense index is reset or set
        # whenever an adapter takes it over (activate_adapter visits every module).
        if act is not None and act.slot == index and act.dense >= 0:
            super().reset_lora(act.dense)

    def set_lora(self, index: int, lora_a, lora_b):
        act = self.nora_state.activation
        if act is None or act.slot != index:
            raise RuntimeError(f"nora: {type(self).__name__}: slot {index} set outside an adapter activation")
        if act.dense < 0:  # worker._load_cores refuses such an adapter first
            raise ValueError(f"nora: adapter {act.storage.name or act.slot}: embedding / lm_head LoRA "
                             "weights are served for dense adapters only")
        self._nora_direct = True
        try:
            super().set_lora(act.dense, lora_a, lora_b)
        finally:
            self._nora_direct = False

    def nora_storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lora_a_stacked, self.lora_b_stacked))


class DenseSlotsLogits(DenseSlotsMixin, LogitsProcessorWithLoRA):
    """vLLM builds the logits layer itself (``from_layer_logits_processor``, not through
    ``from_layer``): the hook there builds the stock layer for the dense slots and gives it a
    worker's class of this one (:func:`dense_slots_logits`)."""


def dense_slots_logits(layer: LogitsProcessorWithLoRA, state: WorkerState) -> LogitsProcessorWithLoRA:
    """``layer``, built by vLLM for the dense slots, as a :class:`DenseSlotsLogits` holding
    ``state``: the same object and stacks, with slots mapped to dense indices."""
    layer.__class__ = type(DenseSlotsLogits.__name__, (DenseSlotsLogits,), {"nora_state": state})
    return layer


class DenseSlotsEmbedding(DenseSlotsMixin, VocabParallelEmbeddingWithLoRA):
    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        plan = self.nora_state.plan_for(max_loras, self.base_layer.weight.device)
        super().create_lora_weights(plan.dense_slots, lora_config, model_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The stock forward looks its A rows up at slot * vocab + token (the wrapper's
        # _embeddings_indices): a slot, not a dense index.
        out = self.base_layer.forward(x)
        flat = out.view(-1, out.shape[-1])
        self.punica_wrapper.add_dense_embedding(flat, x.view(-1), self.lora_a_stacked, self.lora_b_stacked)
        return out


# The stock classes whose storage gets a shared-basis part; vLLM's fully sharded and
# replicated variants stay stock.
STOCK_CLASSES: tuple[type, ...] = (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                                   QKVParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA,
                                   RowParallelLinearWithLoRA)


def layer_classes(state: WorkerState, *, dense_heads: bool = False) -> tuple[type, ...]:
    """The layer classes ``from_layer`` may take in one worker, each holding its ``state``: the
    shared-basis ones and, with ``dense_heads`` (the CPU wrapper reads them), the dense-slot
    embedding (the logits layer: :func:`dense_slots_logits`)."""
    own = tuple(type(f"SharedBasis{c.__name__}", (SharedBasisLayerMixin, c), {"nora_state": state})
                for c in STOCK_CLASSES)
    if dense_heads:
        own += (type(DenseSlotsEmbedding.__name__, (DenseSlotsEmbedding,), {"nora_state": state}),)
    return own
