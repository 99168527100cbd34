"""Worker side: convert any supported adapter on load (this covers the offline ``LLM`` path;
the API server converts first, so its requests arrive here already as cache entries)."""

from __future__ import annotations

from pathlib import Path

from .settings import NoraSettings, settings_of

from .log import logger  # noqa: E402

_settings: NoraSettings | None = None
_model_dir: str | None = None
# Largest rank of each loaded adapter (by lora_int_id): the punica wrapper reads no further.
adapter_ranks: dict[int, int] = {}


def record_rank(lora_int_id: int, lora_model) -> None:
    ranks = [getattr(lora_model, "rank", 0) or 0]
    ranks += [getattr(w, "rank", 0) or 0 for w in getattr(lora_model, "loras", {}).values()]
    adapter_ranks[lora_int_id] = int(max(ranks))


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
