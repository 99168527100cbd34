"""API-server side: convert (and check against the base) before vLLM sees an adapter, so that a
bad adapter is a clear 4xx answer and never reaches the engine; the adapter store resolver,
which works without vLLM's runtime loading (``/v1/load_lora_adapter``) being open."""

from __future__ import annotations

import asyncio
import os
import re
from http import HTTPStatus
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from . import cache
from .cache import prepare_adapter
from .settings import NoraSettings, settings_of

from .log import logger  # noqa: E402

# A store name is one plain directory name: letters, digits and ._+- (not first), at most 128.
STORE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
# Files whose presence makes a directory "an adapter" (a broken one is a 400, naming the fault);
# a directory with none of them answers exactly as a missing one, so that errors do not tell
# which paths exist on the server.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "model.safetensors", "checkpoint")
NOT_FOUND = "no adapter found at the given path"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class NoraStoreResolver(LoRAResolver):
    """Resolves a model name to ``<adapter_dir>/<name>``: a plain name, whose real path (and the
    real path of everything in it) stays inside the store."""

    def __init__(self, adapter_dir: str):
        self.adapter_dir = Path(adapter_dir)

    def path_for(self, lora_name: str) -> Path | None:
        if not isinstance(lora_name, str) or not STORE_NAME.match(lora_name) or lora_name in (".", ".."):
            return None
        try:
            root = os.path.realpath(self.adapter_dir)
            p = os.path.join(root, lora_name)
            real = os.path.realpath(p)
            if not _inside(real, root) or real == root or not os.path.isdir(real):
                return None
            # Nothing in the adapter may lead out of the store either (a symlinked weight file).
            for dirpath, dirnames, filenames in os.walk(real):
                for n in dirnames + filenames:
                    q = os.path.join(dirpath, n)
                    if os.path.islink(q) and not _inside(os.path.realpath(q), root):
                        logger.warning("nora: store adapter %r refused: %s leads out of the store",
                                       lora_name, os.path.relpath(q, root))
                        return None
        except (OSError, ValueError):
            return None
        return Path(p)

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
    models._nora_pending = {}  # cache key -> prepares between conversion and registration
    s = models._nora_settings
    if s is None:
        return
    if s.adapter_dir:
        models.lora_resolvers.insert(0, NoraStoreResolver(s.adapter_dir))
    removed = cache.clean_stale_temporaries(s.cache_path)
    if removed:
        logger.info("nora: removed %d stale temporaries from the cache %s", len(removed), s.cache_path)
    _enforce_cache_limit(models)


def _in_use(models) -> set[str]:
    """Cache keys of every adapter the server has loaded, or is about to."""
    keys = set(getattr(models, "_nora_pending", {}))
    for req in list(models.lora_requests.values()):
        p = Path(str(req.lora_path))
        if p.name == cache.ADAPTER_SUBDIR:
            keys.add(p.parent.name)
    return keys


def _enforce_cache_limit(models) -> None:
    s = _settings(models)
    try:
        cache.enforce_limit(s.cache_path, s.cache_max_bytes, _in_use(models))
    except Exception as e:  # housekeeping never fails a request
        logger.warning("nora: could not keep the cache %s under its bound: %s", s.cache_path, e)


def _error(message: str, status: HTTPStatus, err_type: str):
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type=err_type, status_code=status)


def _local_adapter_dir(lora_path: str) -> Path:
    """The directory ``lora_path`` names, if it holds adapter files; else FileNotFoundError with
    one message for every case (missing, a file, unreadable, no adapter files in it)."""
    try:
        p = Path(os.path.expanduser(str(lora_path)))
        if p.is_dir() and any((p / n).exists() for n in ADAPTER_FILES):
            return p.resolve()
    except (OSError, ValueError, RuntimeError):
        pass
    raise FileNotFoundError(NOT_FOUND)


def _prepare_blocking(models, lora_path: str):
    s = _settings(models)
    model = models.model_config.model
    base = model if s.check_base and Path(model).is_dir() else None
    lora_config = getattr(models.engine_client.vllm_config, "lora_config", None)
    max_rank = lora_config.max_lora_rank if lora_config is not None else None
    return prepare_adapter(_local_adapter_dir(lora_path), base=base, max_rank=max_rank,
                           cache_dir=s.cache_path)


async def _prepare(models, lora_name: str, lora_path: str):
    """``Prepared`` or an ``ErrorResponse`` (404 no adapter there, 400 anything wrong with it).
    A ``Prepared`` is pending (kept from eviction) until :func:`_settle` is called."""
    try:
        prepared = await asyncio.to_thread(_prepare_blocking, models, lora_path)
    except FileNotFoundError:
        return _error(f"LoRA adapter '{lora_name}': {NOT_FOUND}", HTTPStatus.NOT_FOUND, "NotFoundError")
    except PermissionError:
        return _error(f"LoRA adapter '{lora_name}': {NOT_FOUND}", HTTPStatus.NOT_FOUND, "NotFoundError")
    except Exception as e:  # the adapter's content is at fault: refuse it, keep serving
        logger.warning("nora: refused adapter %s (%s): %s", lora_name, lora_path, e)
        return _error(f"LoRA adapter '{lora_name}' refused: {_relative(str(e), models, lora_path)}",
                      HTTPStatus.BAD_REQUEST, "BadRequestError")
    if prepared.converted_now:
        logger.info("nora: converted %s adapter %s -> %s", prepared.fmt, lora_path, prepared.path)
    models._nora_sources[prepared.path] = prepared.source
    pending = models._nora_pending
    pending[prepared.key] = pending.get(prepared.key, 0) + 1
    return prepared


async def _settle(models, prepared) -> None:
    """The prepared adapter is registered (or refused): keep the cache within its bound."""
    pending = models._nora_pending
    pending[prepared.key] -= 1
    if pending[prepared.key] <= 0:
        del pending[prepared.key]
    if prepared.converted_now and _settings(models).cache_max_bytes:
        await asyncio.to_thread(_enforce_cache_limit, models)


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
    try:
        return _as_bad_request(await orig(models, converted, base_model_name))
    finally:
        await _settle(models, prepared)


def _store(models) -> NoraStoreResolver | None:
    return next((r for r in models.lora_resolvers if isinstance(r, NoraStoreResolver)), None)


async def resolve_lora(models, orig, lora_name: str):
    s = _settings(models)
    store = _store(models)
    if s is None or store is None or store.path_for(lora_name) is None:
        return await orig(models, lora_name)
    return await resolve_from_store(models, store, lora_name)


async def resolve_from_store(models, store: NoraStoreResolver, lora_name: str):
    """A ``LoRARequest`` for the store's adapter ``lora_name``, an ``ErrorResponse``, or ``None``
    when the store has no such adapter."""
    async with models.lora_resolver_lock[lora_name]:
        if lora_name in models.lora_requests:
            return models.lora_requests[lora_name]
        path = store.path_for(lora_name)
        if path is None:
            return None
        prepared = await _prepare(models, lora_name, str(path))
        if _is_error(prepared):
            return prepared
        try:
            lora_request = LoRARequest(lora_name=lora_name, lora_int_id=models.lora_id_counter.inc(1),
                                       lora_path=prepared.path)
            try:
                await models.engine_client.add_lora(lora_request)
            except Exception as e:
                return _error(f"LoRA adapter '{lora_name}' could not be loaded: {e}",
                              HTTPStatus.BAD_REQUEST, "BadRequestError")
            models.lora_requests[lora_name] = lora_request
        finally:
            await _settle(models, prepared)
        logger.info("nora: resolved adapter '%s' from the store %s", lora_name, store.adapter_dir)
        return lora_request


async def check_model(serving, orig, request):
    """``BaseServing._check_model``: a name the server does not know yet is looked up in the
    adapter store, whether or not vLLM's runtime LoRA loading is on (vLLM resolves names only
    when it is)."""
    models = getattr(serving, "models", None)
    name = getattr(request, "model", None)
    if (models is not None and _settings(models) is not None and isinstance(name, str) and name
            and name not in models.lora_requests and not serving._is_model_supported(name)):
        store = _store(models)
        if store is not None:
            found = await resolve_from_store(models, store, name)
            if _is_error(found):
                return found
            if found is not None:
                return None
    return await orig(serving, request)


def show_sources(models, model_list):
    """``/v1/models``: show each adapter's own directory, not its cache entry."""
    sources = getattr(models, "_nora_sources", {})
    for card in model_list.data:
        if card.root in sources:
            card.root = sources[card.root]
    return model_list
