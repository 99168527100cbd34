"""Per-process state of the plugin, in one object per process kind, handed to whoever needs it.

``WorkerState`` (a worker process): the settings, the served model, each loaded adapter's
rank and storage, the slot plan, the resident bases, the step's adapters, the activation in
progress and the prompt-logprobs hidden states. ``vllm_plugin/hooks.py`` makes one per
process and gives it to the punica wrapper (constructor argument), to the shared-basis layer
classes (class attribute ``nora_state``) and to the worker-side wrappers. No vLLM import here.
"""

from __future__ import annotations

from typing import Any

from .log import logger
from .served_base import served_base_dir
from .settings import NoraSettings, settings_of
from .storage import AdapterStorage, BasisStore, SlotPlan

# Rank of an adapter whose rank was not recorded: the kernels clamp it to the stacked rank.
UNKNOWN_RANK = 1 << 30


class WorkerState:
    def __init__(self, settings: NoraSettings | None = None, model_dir: str | None = None):
        self.settings = settings  # None: nora is off in this process
        self.model_dir = model_dir  # the served model, where it is a local directory
        # Largest rank of each loaded adapter (by lora_int_id): the punica wrappers read no further.
        self.adapter_ranks: dict[int, int] = {}
        # How each loaded adapter is stored (by lora_int_id); warm-up dummies are EMPTY.
        self.adapter_storage: dict[int, AdapterStorage] = {}
        self.plan: SlotPlan | None = None  # the slot plan of this worker's LoRA model manager
        self.shared_modules: set[str] | None = None  # modules with shared-basis layers (once known)
        self.bases = BasisStore()  # shared bases, read once per process
        # Adapter ids the current step needs (set around vLLM's _apply_adapters), None: unknown.
        self.step_adapters: set[int] | None = None
        # The slot being filled by the activation in progress (read by the layers' set_lora).
        self.activation = None
        # The hidden states whose row slices vLLM hands to compute_logits while it computes
        # prompt logprobs (row i is scheduled token i); None outside that call.
        self.prompt_hidden_states = None
        # Bytes of each loaded adapter's weights, and what the metrics last reported (metrics.py).
        self.adapter_bytes: dict[int, int] = {}
        self.reported_residency: tuple | None = None
        # --nora-preload-store's bulk load in progress: one summary line, not a line per adapter.
        self.preloading = False
        # Where the next free slot is looked for first (slots fill in order during a preload).
        self.free_slot_hint = 0
        # The embedding and logits LoRA layers hold the dense slots only (vllm_plugin.layers
        # DenseSlotsMixin; set where they are installed): the CPU wrapper then indexes them by
        # dense index, not by slot.
        self.dense_heads = False

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "WorkerState":
        model = getattr(getattr(vllm_config, "model_config", None), "model", None)
        s = settings_of(vllm_config)
        # A Hub id resolves to its snapshot in the local cache; logs once what the base check covers.
        return cls(s, served_base_dir(model, s.check_base, logger) if s else None)

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    def settings_or_default(self) -> NoraSettings:
        return self.settings or NoraSettings()

    # -- ranks -------------------------------------------------------------------------------
    def slot_ranks(self, lora_index_to_id) -> list[int]:
        """Rank to read per slot: 0 for an empty slot, the adapter's recorded rank otherwise."""
        return [0 if i is None else self.adapter_ranks.get(i, UNKNOWN_RANK) for i in lora_index_to_id]

    def record_rank(self, lora_int_id: int, lora_model) -> int:
        ranks = [getattr(lora_model, "rank", 0) or 0]
        ranks += [getattr(w, "rank", 0) or 0 for w in getattr(lora_model, "loras", {}).values()]
        self.adapter_ranks[lora_int_id] = int(max(ranks))
        return self.adapter_ranks[lora_int_id]

    # -- slot plan ---------------------------------------------------------------------------
    def plan_for(self, max_loras: int, device) -> SlotPlan:
        """The plan of this worker's model manager (one per process), made on first use."""
        if self.plan is None or self.plan.max_loras != max_loras:
            s = self.settings_or_default()
            self.plan = SlotPlan(max_loras, s.dense_slots(max_loras), s.max_bases, s.core_rank, device)
        return self.plan
