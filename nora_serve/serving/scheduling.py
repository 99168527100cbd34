"""Scheduler side of shared-basis storage: at most ``K`` adapters without a shared basis and at
most ``G`` distinct bases in one step (vLLM itself caps only the adapters, at ``--max-loras``).

A waiting request whose adapter would exceed either cap waits for a later step, exactly as vLLM
defers one that would exceed ``--max-loras``. An adapter's kind is read from its cache entry
(the API server converts adapters before they reach the scheduler) with :func:`adapter_kind`,
the rule the workers' slot plan uses too: what this admits, the plan can hold. No vLLM import
here.
"""

from __future__ import annotations

from pathlib import Path

from . import metrics
from .cache.build import prepare_adapter
from .cache.keys import ADAPTER_SUBDIR, MARKER
from .cache.trust import lookup_entry, shared_basis_entry
from .log import logger

# The kind of an adapter the scheduler cannot see yet (offline: the worker converts it in the
# step that first needs it): counted as a dense adapter *and* as a basis of its own.
UNKNOWN = "?"


def adapter_kind(settings, lora_config, path: str, *, trusted=None):
    """The shared-basis entry an adapter is stored by (cores on a resident basis), or ``None``
    when it takes a dense slot. One rule for the scheduler and the workers. ``trusted``: see
    :func:`~.cache.trust.shared_basis_entry`."""
    if not settings.shared_basis_for(lora_config):
        return None
    entry = shared_basis_entry(path, settings.cache_path, trusted=trusted)
    return entry if kept_as_cores(settings, lora_config, entry) else None


def kept_as_cores(settings, lora_config, entry) -> bool:
    """Whether the shared-basis entry ``entry`` (``None``: none) is stored as its cores in the
    workers of this LoRA config (else in a dense slot): :func:`adapter_kind`'s rule, for an
    entry already read (``--nora-preload-store`` sends the workers its cores)."""
    return entry is not None and settings.shared_basis_for(lora_config) and settings.keeps_as_cores(entry.rank)


def _files_signature(path: str) -> tuple | None:
    """(relative name, size, mtime) of every file below ``path``, hidden ones excluded (the
    files the content key is computed from); ``None`` when it cannot be read."""
    import os

    out = []
    try:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith("."):
                    continue
                st = os.stat(os.path.join(root, f))
                out.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    return tuple(out)


class StepLimits:
    def __init__(self, settings, max_loras: int, lora_config=None, model_dir: str | None = None):
        metrics.declare()
        self.dense_cap = settings.dense_slots(max_loras)
        self.basis_cap = settings.max_bases
        self.settings = settings
        self.lora_config = lora_config
        # The same base and rank limit the API server and the workers convert with.
        self.base = model_dir if settings.check_base and model_dir and Path(model_dir).is_dir() else None
        self.model = model_dir
        # (lora_int_id, path) -> basis key, None = dense
        self._kinds: dict[tuple[int, str], str | None] = {}
        # (lora_int_id, path) -> (its cache entry, the adapter's files' signature): available()
        self._available: dict[tuple[int, str], tuple[Path, tuple | None]] = {}
        self.dense: set[int] = set()
        self.bases: set[str] = set()

    def kind(self, lora_request) -> str | None:
        k = (lora_request.lora_int_id, str(lora_request.lora_path))
        if k not in self._kinds:
            if len(self._kinds) > 65536:
                self._kinds.clear()
            path = str(lora_request.lora_path)
            if self.settings.shared_basis_for(self.lora_config):
                seen = self._available.get(k)  # found by available() a moment ago: not looked up twice
                found = seen[0] if seen is not None and (seen[0] / MARKER).is_file() else lookup_entry(
                    path, base=self.base, cache_dir=self.settings.cache_path,
                    max_rank=getattr(self.lora_config, "max_lora_rank", None))
                if found is None:
                    return UNKNOWN  # asked again next step, once the worker has converted it
                path = str(found / ADAPTER_SUBDIR)
            entry = adapter_kind(self.settings, self.lora_config, path)
            self._kinds[k] = entry.key if entry is not None else None
        return self._kinds[k]

    def available(self, lora_request) -> bool:
        """Whether the adapter's files can be read for the worker: its cache entry is there, or
        is prepared again from the adapter's own directory now (an eviction, another API server
        or an operator may have removed it). ``False``: it cannot (its directory is gone or
        unreadable); that request fails, never the engine.

        Asked for every waiting request at every step: once an entry was found, later calls
        only check that it is still there and that the adapter's own files are unchanged (names,
        sizes, mtimes), not its content key and digest again (a few ms each, on the engine
        core's one thread)."""
        path = str(lora_request.lora_path)
        memo_key = (lora_request.lora_int_id, path)
        seen = self._available.get(memo_key)
        if seen is not None and (seen[0] / MARKER).is_file() and _files_signature(path) == seen[1]:
            return True
        cache_dir = self.settings.cache_path
        max_rank = getattr(self.lora_config, "max_lora_rank", None)
        signature = _files_signature(path)
        entry = lookup_entry(path, base=self.base, cache_dir=cache_dir, max_rank=max_rank)
        if entry is None:
            try:
                prepared = prepare_adapter(path, base=self.base, max_rank=max_rank, cache_dir=cache_dir,
                                           served_model=self.model)
            except Exception as e:
                self._available.pop(memo_key, None)
                logger.error("nora: adapter %s cannot be loaded, its request fails: %s",
                             lora_request.lora_name, e)
                return False
            entry = Path(prepared.path).parent
        if len(self._available) > 65536:
            self._available.clear()
        self._available[memo_key] = (Path(entry), signature)
        return True

    def start_step(self, running) -> None:
        self.dense, self.bases = set(), set()
        for req in running:  # already placed: counted whatever the caps say
            if req.lora_request and req.lora_request.lora_int_id > 0:
                dense, basis = self._needs(req.lora_request)
                if dense:
                    self.dense.add(req.lora_request.lora_int_id)
                if basis:
                    self.bases.add(basis)

    def _needs(self, lora_request) -> tuple[bool, str | None]:
        """(takes a dense slot, the basis it takes) for this request's adapter."""
        key = self.kind(lora_request)
        if key == UNKNOWN:
            return True, f"{UNKNOWN}{lora_request.lora_int_id}"
        return key is None, key

    def admit(self, lora_request) -> bool:
        """Count this request's adapter in the step, or say it must wait."""
        dense, basis = self._needs(lora_request)
        lid = lora_request.lora_int_id
        if dense and lid not in self.dense and len(self.dense) >= self.dense_cap:
            metrics.deferred("dense")
            return False
        if basis and basis not in self.bases and len(self.bases) >= self.basis_cap:
            metrics.deferred("basis")
            return False
        if dense:
            self.dense.add(lid)
        if basis:
            self.bases.add(basis)
        return True
