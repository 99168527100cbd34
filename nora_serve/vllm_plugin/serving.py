"""API-server side: convert (and check against the base) before vLLM sees an adapter, so that a
bad adapter is a clear 4xx answer and never reaches the engine; the adapter store resolver."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from .cache import prepare_adapter
from .settings import NoraSettings, settings_of

from .log import logger  # noqa: E402


class NoraStoreResolver(LoRAResolver):
    """Resolves a model name to ``<adapter_dir>/<name>`` if that directory exists."""

    def __init__(self, adapter_dir: str):
        self.adapter_dir = Path(adapter_dir)

    def path_for(self, lora_name: str) -> Path | None:
        # A name is one path component: no way out of the store.
        if not lora_name or lora_name in (".", "..") or "/" in lora_name or "\\" in lora_name:
            return None
        p = self.adapter_dir / lora_name
        return p if p.is_dir() else None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        p = self.path_for(lora_name)
        if p is None:
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(p))


def _settings(models) -> NoraSettings | None:
    return getattr(models, "_nora_settings", None)


def after_init(models) -> None:
    models._nora_settings = settings_of(getattr(models.engine_client, "vllm_config", None))
    models._nora_sources = {}
    s = models._nora_settings
    if s is not None and s.adapter_dir:
        models.lora_resolvers.insert(0, NoraStoreResolver(s.adapter_dir))


def _error(message: str, status: HTTPStatus, err_type: str):
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=status)


def _prepare_blocking(models, lora_path: str):
    from vllm.lora.utils import get_adapter_absolute_path

    s = _settings(models)
    model = models.model_config.model
    base = model if s.check_base and Path(model).is_dir() else None
    lora_config = getattr(models.engine_client.vllm_config, "lora_config", None)
    max_rank = lora_config.max_lora_rank if lora_config is not None else None
    return prepare_adapter(get_adapter_absolute_path(lora_path), base=base, max_rank=max_rank,
                           cache_dir=s.cache_path)


async def _prepare(models, lora_name: str, lora_path: str):
    """``Prepared`` or an ``ErrorResponse`` (404 missing, 400 anything wrong with the adapter)."""
    try:
        prepared = await asyncio.to_thread(_prepare_blocking, models, lora_path)
    except FileNotFoundError as e:
        return _error(f"LoRA adapter '{lora_name}': {e}", HTTPStatus.NOT_FOUND, "NotFoundError")
    except Exception as e:  # the adapter's content is at fault: refuse it, keep serving
        logger.warning("nora: refused adapter %s (%s): %s", lora_name, lora_path, e)
        return _error(f"LoRA adapter '{lora_name}' refused: {_relative(str(e), models, lora_path)}",
                      HTTPStatus.BAD_REQUEST, "BadRequestError")
    if prepared.converted_now:
        logger.info("nora: converted %s adapter %s -> %s", prepared.fmt, lora_path, prepared.path)
    models._nora_sources[prepared.path] = prepared.source
    return prepared


def _relative(msg: str, models, lora_path: str) -> str:
    """vLLM scrubs absolute paths from error messages; keep the file names inside the adapter
    (and the base) readable by making them relative."""
    for root, name in ((lora_path, "the adapter directory"), (models.model_config.model, "the base model")):
        for p in {str(Path(root)), str(Path(root).resolve())}:
            msg = msg.replace(p + "/", "").replace(p, name)
    return msg


def _is_error(obj) -> bool:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return isinstance(obj, ErrorResponse)


def _as_bad_request(resp):
    # The engine refusing a converted adapter (e.g. a module the model does not have) is the
    # adapter's fault, not the server's.
    if _is_error(resp) and resp.error.code == HTTPStatus.INTERNAL_SERVER_ERROR.value:
        return _error(resp.error.message, HTTPStatus.BAD_REQUEST, "BadRequestError")
    return resp


async def load_lora_adapter(models, orig, request, base_model_name=None):
    if _settings(models) is None or not request.lora_name or not request.lora_path:
        return await orig(models, request, base_model_name)
    if not request.load_inplace and request.lora_name in models.lora_requests:
        return await orig(models, request, base_model_name)  # vLLM's own "already loaded" answer
    prepared = await _prepare(models, request.lora_name, request.lora_path)
    if _is_error(prepared):
        return prepared
    converted = request.model_copy(update={"lora_path": prepared.path})
    return _as_bad_request(await orig(models, converted, base_model_name))


async def resolve_lora(models, orig, lora_name: str):
    s = _settings(models)
    store = next((r for r in models.lora_resolvers if isinstance(r, NoraStoreResolver)), None)
    if s is None or store is None or store.path_for(lora_name) is None:
        return await orig(models, lora_name)
    async with models.lora_resolver_lock[lora_name]:
        if lora_name in models.lora_requests:
            return models.lora_requests[lora_name]
        prepared = await _prepare(models, lora_name, str(store.path_for(lora_name)))
        if _is_error(prepared):
            return prepared
        lora_request = LoRARequest(lora_name=lora_name, lora_int_id=models.lora_id_counter.inc(1),
                                   lora_path=prepared.path)
        try:
            await models.engine_client.add_lora(lora_request)
        except Exception as e:
            return _error(f"LoRA adapter '{lora_name}' could not be loaded: {e}",
                          HTTPStatus.BAD_REQUEST, "BadRequestError")
        models.lora_requests[lora_name] = lora_request
        logger.info("nora: resolved adapter '%s' from the store %s", lora_name, store.adapter_dir)
        return lora_request


def show_sources(models, model_list):
    """``/v1/models``: show each adapter's own directory, not its cache entry."""
    sources = getattr(models, "_nora_sources", {})
    for card in model_list.data:
        if card.root in sources:
            card.root = sources[card.root]
    return model_list
