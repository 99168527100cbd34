"""Worker side: convert any supported adapter on load (this covers the offline ``LLM`` path;
the API server converts first, so its requests arrive here already as cache entries), store
native shared-basis adapters (NoRA, LoRA-XS, IntTune) as cores on a shared basis, and place slots on activation.

Every function takes the worker's :class:`~.state.WorkerState`; ``hooks.py`` calls them."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from .log import logger
from nora_serve.serving.state import UNKNOWN_RANK, WorkerState
from nora_serve.serving.storage import BASIS, DENSE, EMPTY, AdapterStorage


def convert_request(state: WorkerState, manager, lora_request, *, folded: bool = False):
    """``(request, entry)``: the same request, pointing at its cache entry (converted into the
    cache if needed): a stock PEFT LoRA, or for a shared-basis adapter its cores (``folded``:
    its PEFT LoRA); ``entry`` the entry's directory, checked by ``prepare_adapter`` (``None``
    without nora)."""
    if state.settings is None:
        return lora_request, None
    import msgspec
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.utils import get_adapter_absolute_path

    from nora_serve.serving.cache.build import prepare_adapter

    path = get_adapter_absolute_path(lora_request.lora_path)
    try:
        prepared = prepare_adapter(
            path,
            base=state.model_dir if state.settings.check_base else None,
            max_rank=manager.lora_config.max_lora_rank,
            cache_dir=state.settings.cache_path,
            served_model=state.model_dir,
            folded=folded,
        )
    except FileNotFoundError as e:
        raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from e
    if prepared.converted_now:
        logger.info("nora: converted %s adapter %s -> %s", prepared.fmt, path, prepared.path)
    entry = Path(prepared.path).parent
    if prepared.path == lora_request.lora_path:
        return lora_request, entry
    return msgspec.structs.replace(lora_request, lora_path=prepared.path), entry


# -- shared-basis storage ----------------------------------------------------------------------
def _shared_modules(state: WorkerState, adapter_manager) -> set[str]:
    """Module names served by shared-basis layers in this worker (found once: the layers are
    built once)."""
    from .layers import SharedBasisLayerMixin

    if state.shared_modules is None:
        state.shared_modules = {sub for mod in adapter_manager.modules.values()
                                if isinstance(mod, SharedBasisLayerMixin) for sub in (mod.nora_sub_modules or ())}
    return state.shared_modules


def load_adapter(state: WorkerState, manager, orig_load, lora_request):
    """Load through the convert-on-load cache: a native shared-basis adapter (NoRA, LoRA-XS,
    IntTune) as cores only (its basis is shared), anything else as the folded LoRA. The cache's
    lock is held shared meanwhile, so that no eviction removes the entry between its
    preparation and its reading."""
    if state.settings is None:
        return _load(state, manager, orig_load, lora_request)
    from nora_serve.serving.cache.bound import reading

    with reading(state.settings.cache_path):
        return _load(state, manager, orig_load, lora_request)


def _load(state: WorkerState, manager, orig_load, lora_request):
    request, entry = convert_request(state, manager, lora_request)
    lid = lora_request.lora_int_id
    model = _load_cores(state, manager, lora_request, orig_load, request, entry) if state.settings else None
    if model is None:
        model = orig_load(manager, _dense(state, manager, lora_request, request))
        rank = state.record_rank(lid, model)
        from nora_serve.serving.cache.trust import output_scales

        state.adapter_storage[lid] = AdapterStorage(DENSE, rank=rank, name=lora_request.lora_name,
                                                    output_scale=output_scales(request.lora_path))
    _record_loaded(state, lid, model)
    return model


def _record_loaded(state: WorkerState, lid: int, model) -> None:
    state.adapter_bytes[lid] = _weight_bytes(model)
    state.reported_residency = None  # report again after this step


def _dense(state: WorkerState, manager, lora_request, request):
    """``request`` as a PEFT LoRA vLLM can load: a cores-only entry is folded first (once, into
    an entry of its own), only now that this adapter needs a dense slot."""
    if state.settings is None or (Path(request.lora_path) / "adapter_config.json").is_file():
        return request
    return convert_request(state, manager, lora_request, folded=True)[0]


def _weight_bytes(lora_model) -> int:
    n = 0
    for w in getattr(lora_model, "loras", {}).values():
        for t in (getattr(w, "lora_a", None), getattr(w, "lora_b", None)):
            for part in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(part, torch.Tensor):
                    n += part.nbytes
    return n


def report_residency(state: WorkerState, adapter_manager) -> None:
    """The residency gauges (serving/metrics.py), when what this worker holds changed."""
    from nora_serve.serving import metrics

    ids = adapter_manager._registered_adapters
    # A load resets this (load_adapter); removals change the count.
    key = (len(ids), len(state.bases))
    if key == state.reported_residency:
        return
    state.reported_residency = key
    kinds = [state.adapter_storage.get(i) for i in ids]
    cores = sum(1 for k in kinds if k is not None and k.kind == BASIS)
    dense = sum(1 for k in kinds if k is not None and k.kind == DENSE)
    memory = sum(state.adapter_bytes.get(i, 0) for i in ids) + state.bases.nbytes()
    metrics.residency(dense=dense, cores=cores, bases=len(state.bases), memory_bytes=memory)


def mark_dummy(state: WorkerState, lora_int_id: int) -> None:
    """A warm-up dummy adapter: no storage, no effect."""
    state.adapter_storage[lora_int_id] = AdapterStorage(EMPTY)


def _load_cores(state: WorkerState, manager, lora_request, orig_load, request, checked):
    from nora_serve.serving.cache.cores_file import read_cores
    from nora_serve.serving.scheduling import adapter_kind

    if state.plan is None:
        return None
    # The scheduler admitted this request with the same rule (scheduling.adapter_kind).
    # ``checked``: the entry prepare_adapter just checked, under the cache lock load_adapter holds.
    entry = adapter_kind(state.settings, manager.lora_config, request.lora_path, trusted=checked)
    if entry is None:
        return None
    return _cores_model(state, manager, lora_request, orig_load, request, entry,
                        read_cores(entry.cores, _lora_dtype(manager)))


def _lora_dtype(manager) -> torch.dtype:
    dtype = manager.lora_config.lora_dtype
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _cores_model(state: WorkerState, manager, lora_request, orig_load, request, entry, cores):
    """vLLM's ``LoRAModel`` of a shared-basis adapter from its cores (``entry``: its
    ``SharedBasisEntry``), its storage recorded in ``state``."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    from .layers import DenseSlotsMixin

    dtype = _lora_dtype(manager)
    missing = sorted(set(cores) - _shared_modules(state, manager._adapter_manager))
    no_b = {}  # the cores' empty B, one per rank: nothing reads it (set_lora takes the core as A)
    loras = {m: LoRALayerWeights(m, c.shape[0], 1, c,
                                 no_b.setdefault(c.shape[0], torch.zeros(0, c.shape[0], dtype=dtype)),
                                 scaling=1.0) for m, c in cores.items() if m not in missing}
    heads = [m for m in missing if isinstance(manager._adapter_manager.modules.get(m), DenseSlotsMixin)]
    if heads:
        raise ValueError(f"nora: adapter {lora_request.lora_name}: module {heads[0]} (embedding / lm_head) "
                         "has a shared-basis core; those layers serve dense adapters only (fold it with "
                         "nora-convert)")
    rank = entry.rank
    if missing:
        # Layers without shared-basis storage keep vLLM's own (one slot per adapter): those
        # modules are served from the folded LoRA, the others as cores. The adapter stays a
        # shared-basis one, as the scheduler counted it.
        folded = orig_load(manager, _dense(state, manager, lora_request, request))
        for m in missing:
            w = folded.loras.get(m)
            if w is None:
                raise ValueError(f"nora: adapter {lora_request.lora_name}: module {m} is in its cores "
                                 "but not in its folded LoRA")
            loras[m] = w
            rank = max(rank, int(getattr(w, "rank", 0) or 0))
        logger.info("nora: adapter %s: %d modules (e.g. %s) have no shared-basis layer, served "
                    "as LoRA there", lora_request.lora_name, len(missing), missing[0])
    lid = lora_request.lora_int_id
    model = LoRAModel(lid, entry.rank, loras)
    state.adapter_storage[lid] = AdapterStorage(BASIS, rank=entry.rank, basis_key=entry.key,
                                                basis_path=str(entry.basis), name=lora_request.lora_name)
    state.adapter_ranks[lid] = rank
    if not state.preloading:
        size = sum(c.numel() for c in cores.values()) * torch.finfo(dtype).bits // 8
        logger.info("nora: adapter %s: %s with shared basis %s, cores only (%d modules, %.1f KiB)",
                    lora_request.lora_name, entry.method, entry.key, len(cores), size / 1024)
    return model


def activate(state: WorkerState, adapter_manager, orig_activate, lora_id: int) -> bool:
    """``LoRAModelManager.activate_adapter`` with the slot's storage placed first."""
    plan = state.plan
    if plan is None or lora_id in adapter_manager._active_adapters:
        return orig_activate(adapter_manager, lora_id)

    slots = adapter_manager.lora_index_to_id

    def first_free_slot():  # the slot vLLM's activate_adapter will take (list.index: no Python loop)
        # A preload fills slots in order and frees none: from where the last one went (scanning
        # from 0 each time was quadratic over thousands of activations).
        start = state.free_slot_hint if state.preloading and state.free_slot_hint < len(slots) else 0
        try:
            i = slots.index(None, start)
        except ValueError:
            return None
        state.free_slot_hint = i
        return i

    if first_free_slot() is None:
        return orig_activate(adapter_manager, lora_id)  # vLLM raises its own error
    st = state.adapter_storage.get(lora_id) or AdapterStorage(
        DENSE, rank=state.adapter_ranks.get(lora_id, UNKNOWN_RANK))
    # The adapters holding a slot: vLLM's own table of them (a set built from every slot here
    # cost O(--max-loras) per activation, quadratic over thousands of loads).
    act = plan.assign(lora_id, first_free_slot, st, adapter_manager._active_adapters, state.step_adapters,
                      adapter_manager.deactivate_adapter)
    state.activation = act
    try:
        return orig_activate(adapter_manager, lora_id)
    finally:
        state.activation = None


# -- --nora-preload-store ----------------------------------------------------------------------
def preload(state: WorkerState, worker, entries) -> list[tuple[str, str]]:
    """Load the store's adapters in bulk (``serving.preload_store`` sends ``entries``: name,
    id, cache entry path, and for a shared-basis adapter its cores as the API server read them
    from the entry it checked: ``(SharedBasisEntry fields, stacks)``, else ``None``): each is
    made from the cores sent, or read as on a first request (``_load_adapter``, through the
    cache), added to vLLM's LRU cache of adapters and put in a free slot while there
    is one, as vLLM's ``add_lora`` does, without its per-adapter engine call and its scan of every
    registered adapter. Nothing is evicted for it: once ``--max-cpu-loras`` adapters are held,
    the rest are left to their first request, and an adapter whose slot storage (a dense index,
    a basis group) is taken stays resident without a slot until a step needs it. The cores of
    all ``entries`` reach their slots in one indexed copy per layer slice (``nora_flush_cores``).
    ``(name, error)`` per entry, error ``""`` when it is resident; an adapter that fails is that
    adapter's error, never the engine's."""
    from nora_serve.serving.cache.bound import reading

    from .layers import SharedBasisLayerMixin

    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager
    errors: dict[str, str] = {}
    state.preloading, state.free_slot_hint = True, 0
    activated: list[tuple[str, int]] = []
    sent_used = 0
    # No cyclic garbage collection meanwhile: its full passes over the growing heap of loaded
    # adapters (dozens of objects each) slowed every load as thousands came in.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with reading(state.settings.cache_path):  # once for all of them (each load would take it)
            sent_used = _preload(state, manager, adapters, entries, errors, activated)
    finally:
        if gc_was_enabled:
            gc.enable()
        state.preloading = False
        try:
            for mod in adapters.modules.values():
                if isinstance(mod, SharedBasisLayerMixin):
                    mod.nora_flush_cores()
        except Exception as e:  # their cores never reached the slots: none of them may serve
            for name, lid in activated:
                adapters.remove_adapter(lid)
                errors[name] = f"its cores could not be written into the slots: {e}"
    report_residency(state, adapters)
    logger.info("nora: %d adapters loaded in bulk (%d of them from the cores the API server sent), "
                "%d not", len(entries) - len(errors), sent_used, len(errors))
    return [(name, errors.get(name, "")) for name, *_ in entries]


def _preload(state: WorkerState, manager, adapters, entries, errors, activated) -> int:
    """The bulk load itself; how many were made from the cores sent."""
    from vllm.lora.request import LoRARequest

    sent_used = 0
    for name, lid, path, sent in entries:
        added = False
        try:
            if lid not in adapters._registered_adapters:
                if len(adapters) >= adapters.capacity:
                    errors[name] = f"the workers hold --max-cpu-loras {adapters.capacity} adapters already"
                    continue
                request = LoRARequest(lora_name=name, lora_int_id=int(lid), lora_path=path)
                model = _sent_cores_model(state, manager, request, sent) if sent is not None else None
                from_sent = model is not None
                if model is None:
                    model = manager._load_adapter(request)
                added = adapters.add_adapter(model)
                sent_used += from_sent and bool(added)
            # A slot while one is free and its storage fits without evicting another adapter
            # (a step that needs it places it otherwise, as for any resident adapter).
            st = state.adapter_storage.get(lid)
            if (lid not in adapters._active_adapters and len(adapters._active_adapters) < adapters.lora_slots
                    and (state.plan is None or st is None or state.plan.fits(st, adapters._active_adapters))):
                adapters.activate_adapter(lid)
                activated.append((name, lid))
        except Exception as e:  # this adapter's fault: it is left to its first request
            errors[name] = " ".join(str(e).split())[:500] or type(e).__name__
            if added:  # never half in place (a slot without all its cores)
                adapters.remove_adapter(lid)
    return sent_used


def _sent_cores_model(state: WorkerState, manager, request, sent):
    """The adapter's model from the cores the API server sent (it read them from the entry it
    had just checked, so the entry is not read and hashed again here), or ``None`` where this
    worker stores it otherwise (read as on a first request then). Its modules must all have
    shared-basis layers (those without need its folded LoRA: the first-request way)."""
    from nora_serve.serving.cache.cores_file import stacks_from_wire, unstack
    from nora_serve.serving.cache.trust import SharedBasisEntry
    from nora_serve.serving.scheduling import kept_as_cores

    fields, stacks = sent
    entry = SharedBasisEntry(*fields)
    # The rule the scheduler admitted it by, as _load_cores applies it to an entry it reads.
    if state.plan is None or not kept_as_cores(state.settings, manager.lora_config, entry):
        return None
    cores = unstack(stacks_from_wire(stacks), _lora_dtype(manager))
    if not set(cores) <= _shared_modules(state, manager._adapter_manager):
        return None
    model = _cores_model(state, manager, request, None, request, entry, cores)
    _record_loaded(state, request.lora_int_id, model)
    return model


class NoraWorkerExtension:
    """Mixed into vLLM's worker class by vLLM itself (``--worker-extension-cls``, set by
    ``--nora-preload-store``): the workers' ``collective_rpc`` methods of the plugin.
    ``nora_state``: the worker's state, given by ``hooks.install_worker``."""

    nora_state: WorkerState | None = None

    def nora_preload_store(self, entries):
        state = NoraWorkerExtension.nora_state
        if state is None or state.settings is None:
            return [(name, "nora is not on in this worker") for name, *_ in entries]
        return preload(state, self, entries)
