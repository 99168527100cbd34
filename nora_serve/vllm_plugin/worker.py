"""Worker side: convert any supported adapter on load (this covers the offline ``LLM`` path;
the API server converts first, so its requests arrive here already as cache entries)."""

from __future__ import annotations

from pathlib import Path

import torch

from .settings import NoraSettings, settings_of

from .log import logger  # noqa: E402

_settings: NoraSettings | None = None
_model_dir: str | None = None
# Largest rank of each loaded adapter (by lora_int_id): the punica wrapper reads no further.
adapter_ranks: dict[int, int] = {}
# Rank of an adapter whose rank was not recorded: the kernels clamp it to the stacked rank.
UNKNOWN_RANK = 1 << 30


def slot_ranks(lora_index_to_id) -> list[int]:
    """Rank to read per slot: 0 for an empty slot, the adapter's recorded rank otherwise."""
    return [0 if i is None else adapter_ranks.get(i, UNKNOWN_RANK) for i in lora_index_to_id]


def record_rank(lora_int_id: int, lora_model) -> None:
    ranks = [getattr(lora_model, "rank", 0) or 0]
    ranks += [getattr(w, "rank", 0) or 0 for w in getattr(lora_model, "loras", {}).values()]
    adapter_ranks[lora_int_id] = int(max(ranks))


def settings() -> NoraSettings:
    return _settings or NoraSettings()


def remember_config(vllm_config) -> None:
    global _settings, _model_dir
    _settings = settings_of(vllm_config)
    model = getattr(getattr(vllm_config, "model_config", None), "model", None)
    _model_dir = model if model and Path(model).is_dir() else None


def convert_request(manager, lora_request):
    """The same request, pointing at a stock PEFT LoRA (converted into the cache if needed)."""
    if _settings is None:
        return lora_request
    import msgspec
    from vllm.exceptions import LoRAAdapterNotFoundError
    from vllm.lora.utils import get_adapter_absolute_path

    from .cache import prepare_adapter

    path = get_adapter_absolute_path(lora_request.lora_path)
    try:
        prepared = prepare_adapter(
            path,
            base=_model_dir if _settings.check_base else None,
            max_rank=manager.lora_config.max_lora_rank,
            cache_dir=_settings.cache_path,
        )
    except FileNotFoundError as e:
        raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from e
    if prepared.converted_now:
        logger.info("nora: converted %s adapter %s -> %s", prepared.fmt, path, prepared.path)
    if prepared.path == lora_request.lora_path:
        return lora_request
    return msgspec.structs.replace(lora_request, lora_path=prepared.path)


# -- shared-basis storage ----------------------------------------------------------------------
def _shared_modules(adapter_manager) -> set[str]:
    """Module names served by shared-basis layers in this worker."""
    from .layers import SharedBasisLayerMixin

    return {sub for mod in adapter_manager.modules.values() if isinstance(mod, SharedBasisLayerMixin)
            for sub in (mod.nora_sub_modules or ())}


def load_adapter(manager, orig_load, lora_request):
    """Load through the convert-on-load cache: a native NoRA / IntTune adapter as cores only
    (its basis is shared), anything else as the folded LoRA."""
    from .storage import DENSE, AdapterStorage

    request = convert_request(manager, lora_request)
    model = _load_cores(manager, lora_request, request.lora_path, orig_load, request) if _settings else None
    if model is None:
        model = orig_load(manager, request)
        record_rank(lora_request.lora_int_id, model)
        model.nora_storage = AdapterStorage(DENSE, rank=adapter_ranks[lora_request.lora_int_id],
                                            name=lora_request.lora_name)
    return model


def _load_cores(manager, lora_request, path, orig_load=None, request=None):
    from safetensors.torch import load_file
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights

    from .scheduling import adapter_kind
    from .storage import BASIS, AdapterStorage, current_plan

    if current_plan() is None:
        return None
    # The scheduler admitted this request with the same rule (scheduling.adapter_kind).
    entry = adapter_kind(settings(), manager.lora_config, path)
    if entry is None:
        return None
    cores = load_file(str(entry.cores))
    missing = sorted(set(cores) - _shared_modules(manager._adapter_manager))
    dtype = manager.lora_config.lora_dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    loras = {m: LoRALayerWeights(m, c.shape[0], 1, c.to(dtype), torch.zeros(0, c.shape[0], dtype=dtype),
                                 scaling=1.0) for m, c in cores.items() if m not in missing}
    rank = entry.rank
    if missing:
        # Layers without shared-basis storage keep vLLM's own (one slot per adapter): those
        # modules are served from the folded LoRA, the others as cores. The adapter stays a
        # shared-basis one, as the scheduler counted it.
        folded = orig_load(manager, request)
        for m in missing:
            w = folded.loras.get(m)
            if w is None:
                raise ValueError(f"nora: adapter {lora_request.lora_name}: module {m} is in its cores "
                                 "but not in its folded LoRA")
            loras[m] = w
            rank = max(rank, int(getattr(w, "rank", 0) or 0))
        logger.info("nora: adapter %s: %d modules (e.g. %s) have no shared-basis layer, served "
                    "as LoRA there", lora_request.lora_name, len(missing), missing[0])
    model = LoRAModel(lora_request.lora_int_id, entry.rank, loras)
    model.nora_storage = AdapterStorage(BASIS, rank=entry.rank, basis_key=entry.key,
                                        basis_path=str(entry.basis), name=lora_request.lora_name)
    adapter_ranks[lora_request.lora_int_id] = rank
    size = sum(c.numel() for c in cores.values()) * torch.finfo(dtype).bits // 8
    logger.info("nora: adapter %s: %s with shared basis %s, cores only (%d modules, %.1f KiB)",
                lora_request.lora_name, entry.method, entry.key, len(cores), size / 1024)
    return model


def activate(adapter_manager, orig_activate, lora_id: int) -> bool:
    """``LoRAModelManager.activate_adapter`` with the slot's storage placed first."""
    from .storage import DENSE, EMPTY, AdapterStorage, activating, current_plan

    plan = current_plan()
    if plan is None or lora_id in adapter_manager._active_adapters:
        return orig_activate(adapter_manager, lora_id)

    def first_free_slot():  # the slot vLLM's activate_adapter will take
        return next((i for i, x in enumerate(adapter_manager.lora_index_to_id) if x is None), None)

    if first_free_slot() is None:
        return orig_activate(adapter_manager, lora_id)  # vLLM raises its own error
    model = adapter_manager._registered_adapters[lora_id]
    st = getattr(model, "nora_storage", None)
    if st is None:
        st = AdapterStorage(EMPTY) if getattr(model, "nora_dummy", False) else AdapterStorage(
            DENSE, rank=adapter_ranks.get(lora_id, UNKNOWN_RANK))
    active = {i for i in adapter_manager.lora_index_to_id if i is not None}
    batch = getattr(adapter_manager, "_nora_batch", None)
    act = plan.assign(lora_id, first_free_slot, st, active, batch, adapter_manager.deactivate_adapter)
    with activating(act):
        return orig_activate(adapter_manager, lora_id)
