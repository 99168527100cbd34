"""Which storage each adapter slot uses: dense (padded LoRA, ``K`` of them) or a shared basis
(one of ``G`` resident bases, plus the adapter's own ``R x R`` cores in its slot).

vLLM gives every active adapter one of ``max_loras`` slots. Here only ``K <= max_loras`` of
them have full LoRA storage; shared-basis adapters need none. The plan maps each slot to its
dense index or basis group, decided once per activation (in the model manager's
``activate_adapter``, see ``vllm_plugin/hooks.py``) and read by every layer's ``set_lora`` and
by the punica wrapper at forward time. The worker's plan and bases live in its ``WorkerState``
(``state.py``). No vLLM import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .log import logger

DENSE, BASIS, EMPTY = "dense", "basis", "empty"


@dataclass(frozen=True)
class AdapterStorage:
    """How one loaded adapter is stored (``WorkerState.adapter_storage``, by adapter id)."""

    kind: str  # DENSE | BASIS | EMPTY (warm-up dummies: no weights anywhere)
    rank: int = 0
    basis_key: str | None = None
    basis_path: str | None = None
    name: str = ""
    # Served-not-folded methods (PEFT DoRA): each module's scale of the base output
    # (vllm_plugin/output_scale.py).
    output_scale: dict | None = None


@dataclass
class LayerWeights:
    """What the punica wrappers read of one layer with shared-basis storage. The layer builds it
    once (``vllm_plugin/layers.py``) and keeps filling these same tensors and lists; a wrapper
    is handed this, never the layer (as vLLM's own wrappers get only the stacked tensors)."""

    key: int  # the layer's key for the compiled graph's opaque op (vllm_plugin/opaque.py)
    plan: "SlotPlan"
    output_slices: tuple[int, ...]
    lora_a: tuple  # vLLM's stacked dense slots, per slice [K, 1, r, d_in]
    lora_b: tuple  # per slice [K, 1, d_out_i, r]
    basis_a: list  # per slice [G, R, d_in]
    basis_b: list  # per slice [G, d_out_i, R]
    cores: list  # per slice [max_loras * R * R], slot s's core at s * R * R
    core_ranks: torch.Tensor  # [n_slices, max_loras] int32
    group_rank: list  # [slice][group]: rank of the resident basis
    out_scale: object  # vllm_plugin/output_scale.OutputScales (PEFT DoRA)
    # CPU: slice-packed copies (kernels.cpu_step.pack_slices); the GPU reads the tensors above.
    packed: bool = False
    packed_dense: list = field(default_factory=list)
    dense_finite: list = field(default_factory=list)
    packed_basis: list = field(default_factory=list)
    dense_stack: Callable[[], object] = lambda: None
    dense_batch: Callable[[], object] = lambda: None
    # [n_slices, max_loras * R * R] whose rows are ``cores`` (one allocation), or None.
    cores_all: torch.Tensor | None = None


@dataclass(frozen=True)
class Activation:
    """The slot being filled right now, and where its weights go."""

    slot: int
    storage: AdapterStorage
    dense: int = -1
    group: int = -1


class StorageFull(RuntimeError):
    pass


class SlotPlan:
    """Slot -> dense index / basis group, as device tables the kernels index.

    ``dense_of_slot[max_loras]`` and ``group_of_slot[max_loras]`` (int32, -1 = none),
    ``dense_ranks[K]`` (the adapter's rank: kernels read no further), ``core_offsets[max_loras]``
    (slot s keeps its cores at ``s * R * R`` in each layer's flat core buffer). Tables are
    updated in place, so their addresses never change (CUDA graphs)."""

    def __init__(self, max_loras: int, dense_slots: int, max_groups: int, core_rank: int,
                 device: torch.device | str):
        self.max_loras = max_loras
        self.dense_slots = dense_slots
        self.max_groups = max_groups
        self.core_rank = core_rank
        self.device = torch.device(device)
        i32 = dict(dtype=torch.int32, device=self.device)
        self.dense_of_slot = torch.full((max_loras,), -1, **i32)
        self.group_of_slot = torch.full((max_loras,), -1, **i32)
        self.dense_ranks = torch.zeros(dense_slots, **i32)
        self.core_offsets = torch.arange(max_loras, dtype=torch.int64, device=self.device) * core_rank**2
        self._dense_owner: list[int | None] = [None] * dense_slots
        self._group_key: list[str | None] = [None] * max_groups
        self._group_members: list[set[int]] = [set() for _ in range(max_groups)]
        self.version = 0  # bumped on every change
        self.refreshed_version = -1  # the version the punica wrapper's metadata was built from

    # -- decisions -------------------------------------------------------------------------
    def assign(self, lora_id: int, slot_fn, storage: AdapterStorage, active: set[int],
               batch: set[int] | None, evict) -> Activation:
        """Place adapter ``lora_id`` and return its activation; ``slot_fn()`` gives the slot it
        goes into, asked after any eviction (evicting may free a lower slot).

        ``active``: adapter ids holding a slot now (anything answering ``in``); ``batch``: ids the
        current step needs (None: unknown); ``evict(lora_id)`` frees an active adapter's slot.
        Raises :class:`StorageFull` when every dense index / basis group is needed by this step."""
        # An adapter holds at most one dense index or group membership: drop what it held
        # before (its earlier activation), so a stale claim can never count as "in use".
        previous_dense = self._forget(lora_id)
        dense = group = -1
        if storage.kind == DENSE:
            dense = self._free_dense(active, batch, evict, prefer=previous_dense)
            self._dense_owner[dense] = lora_id
            self.dense_ranks[dense] = storage.rank
        elif storage.kind == BASIS:
            group = self._group_for(storage, active, batch, evict)
            self._group_members[group].add(lora_id)
        slot = slot_fn()
        self.dense_of_slot[slot] = dense
        self.group_of_slot[slot] = group
        self.version += 1
        return Activation(slot, storage, dense, group)

    def dense_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Per-row dense index (int64, -1: none) of a per-row slot table (-1: no adapter)."""
        return torch.where(slots >= 0, self.dense_of_slot[slots.clamp(min=0).long()].long(), -1)

    def dense_owner(self, dense: int) -> int | None:
        """The adapter id holding dense index ``dense`` (None: free)."""
        return self._dense_owner[dense]

    def fits(self, storage: AdapterStorage, active) -> bool:
        """Whether :meth:`assign` would place ``storage`` without evicting an active adapter (a
        free dense index, or its basis's group or a free one): a bulk load activates only those."""
        if storage.kind == DENSE:
            return self._unused_dense(active) is not None
        if storage.kind == BASIS:
            return any(key == storage.basis_key or not self._has_live(g, active)
                       for g, key in enumerate(self._group_key))
        return True

    def _unused_dense(self, active) -> int | None:
        """A dense index no active adapter holds, if any."""
        return next((d for d, owner in enumerate(self._dense_owner) if owner is None or owner not in active), None)

    def _has_live(self, g: int, active) -> bool:
        # A group's members can be thousands of adapters: whether one of them is active is asked
        # member by member until one is (not a set of them all per activation).
        return any(m in active for m in self._group_members[g])

    def _forget(self, lora_id: int) -> int:
        previous = -1
        for d, owner in enumerate(self._dense_owner):
            if owner == lora_id:
                self._dense_owner[d] = None
                previous = d
        for members in self._group_members:
            members.discard(lora_id)
        return previous

    def _free_dense(self, active, batch, evict, prefer: int = -1) -> int:
        if prefer >= 0 and self._dense_owner[prefer] is None:
            return prefer
        unused = self._unused_dense(active)
        if unused is not None:
            return unused
        for d, owner in enumerate(self._dense_owner):  # an adapter this step does not need
            if batch is None or owner not in batch:
                evict(owner)
                self._dense_owner[d] = None
                return d
        raise StorageFull(
            f"nora: all {self.dense_slots} dense adapter slots (--nora-dense-loras) are used by "
            f"this step; raise --nora-dense-loras")

    def _group_for(self, storage, active, batch, evict) -> int:
        def live(g: int) -> set[int]:
            return {m for m in self._group_members[g] if m in active}

        for g, key in enumerate(self._group_key):
            if key == storage.basis_key and self._has_live(g, active):
                return g
        free = next((g for g in range(self.max_groups) if not self._has_live(g, active)), None)
        if free is None:
            free = next((g for g in range(self.max_groups)
                         if batch is None or not (live(g) & batch)), None)
            if free is None:
                raise StorageFull(
                    f"nora: all {self.max_groups} shared bases (--nora-max-bases) are used by this "
                    f"step; raise --nora-max-bases")
            for m in sorted(live(free)):
                evict(m)
        self._group_key[free] = storage.basis_key
        self._group_members[free] = set()
        logger.info("nora: shared basis %s (rank %d) -> group %d", storage.basis_key, storage.rank, free)
        return free


# -- shared bases, read once per process ---------------------------------------------------
class BasisStore:
    """Basis tensors by key, loaded from the cache's ``bases/`` file on first use."""

    def __init__(self):
        self._bases: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, key: str, path: str | Path) -> dict[str, torch.Tensor]:
        if key not in self._bases:
            from safetensors.torch import load_file

            self._bases[key] = load_file(str(path))
        return self._bases[key]

    def __len__(self) -> int:
        return len(self._bases)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._bases.values() for t in b.values())

    def module(self, key: str, path: str | Path, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        t = self.get(key, path)
        if f"{module}.A" not in t:
            return None
        return t[f"{module}.A"], t[f"{module}.B"]
