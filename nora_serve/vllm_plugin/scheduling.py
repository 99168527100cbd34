"""Scheduler side of shared-basis storage: at most ``K`` adapters without a shared basis and at
most ``G`` distinct bases in one step (vLLM itself caps only the adapters, at ``--max-loras``).

A waiting request whose adapter would exceed either cap waits for a later step, exactly as vLLM
defers one that would exceed ``--max-loras``. An adapter's kind is read from its cache entry
(the API server converts adapters before they reach the scheduler). No vLLM import here.
"""

from __future__ import annotations

from .cache import shared_basis_entry


class StepLimits:
    def __init__(self, settings, max_loras: int):
        self.dense_cap = settings.dense_slots(max_loras)
        self.basis_cap = settings.max_bases
        self.settings = settings
        self._kinds: dict[int, str | None] = {}  # lora_int_id -> basis key, None = dense
        self.dense: set[int] = set()
        self.bases: set[str] = set()

    def kind(self, lora_request) -> str | None:
        lid = lora_request.lora_int_id
        if lid not in self._kinds:
            entry = shared_basis_entry(lora_request.lora_path) if self.settings.shared_basis else None
            self._kinds[lid] = entry.key if entry is not None and self.settings.keeps_as_cores(entry.rank) else None
        return self._kinds[lid]

    def start_step(self, running) -> None:
        self.dense, self.bases = set(), set()
        for req in running:  # already placed: counted whatever the caps say
            if req.lora_request and req.lora_request.lora_int_id > 0:
                key = self.kind(req.lora_request)
                if key is None:
                    self.dense.add(req.lora_request.lora_int_id)
                else:
                    self.bases.add(key)

    def admit(self, lora_request) -> bool:
        """Count this request's adapter in the step, or say it must wait."""
        key = self.kind(lora_request)
        if key is None:
            lid = lora_request.lora_int_id
            if lid not in self.dense and len(self.dense) >= self.dense_cap:
                return False
            self.dense.add(lid)
        else:
            if key not in self.bases and len(self.bases) >= self.basis_cap:
                return False
            self.bases.add(key)
        return True
