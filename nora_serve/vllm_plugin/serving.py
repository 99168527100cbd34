"""API-server side: convert (and check against the base) before vLLM sees an adapter, so that a
bad adapter is a clear 4xx answer and never reaches the engine; the adapter store, a vLLM
``LoRAResolver`` registered in ``LoRAResolverRegistry``, which also works without vLLM's
runtime loading (``/v1/load_lora_adapter``) being open.

The process's state is one :class:`FrontEnd` (``hooks.py`` makes it and hands it to its
wrappers); the functions below take it and vLLM's ``OpenAIServingModels`` / serving object."""

from __future__ import annotations

import asyncio
import os
import re
from http import HTTPStatus
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from . import cache, metrics
from .cache import prepare_adapter
from nora_serve.converters.base_identity import served_base_dir
from .settings import NoraSettings

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


class AdapterRefused(Exception):
    """An adapter found by the store but refused (its content is at fault): ``response`` is the
    one-line 400 to answer with."""

    def __init__(self, response):
        super().__init__(response.error.message)
        self.response = response


class FrontEnd:
    """The API-server process's state: the settings, the served model and LoRA rank limit,
    each served adapter's own directory (``/v1/models``), and the cache keys between their
    conversion and their registration (kept from eviction)."""

    def __init__(self):
        self.settings: NoraSettings | None = None
        self.store: NoraStoreResolver | None = None
        self.model: str | None = None  # the served model (path or hub id)
        self.max_rank: int | None = None
        self.sources: dict[str, str] = {}  # cache entry's adapter dir -> the adapter's own dir
        self.pending: dict[str, int] = {}  # cache key -> prepares not yet settled
        self.resolved: dict[str, object] = {}  # store name -> its Prepared, until settled

    def configure(self, settings: NoraSettings) -> None:
        """Nora is on in this API server (its engine config says so): clean the cache of what
        killed conversions left and keep it within its bound."""
        self.settings = settings
        metrics.declare()
        if settings.adapter_dir and (self.store is None or str(self.store.adapter_dir) != settings.adapter_dir):
            self.store = NoraStoreResolver(settings.adapter_dir, self)
        removed = cache.clean_stale_temporaries(settings.cache_path)
        if removed:
            logger.info("nora: removed %d stale temporaries from the cache %s", len(removed),
                        settings.cache_path)
        self.enforce_cache_limit(set())

    def bind(self, vllm_config) -> None:
        """The engine config this front end serves (``EngineArgs.create_engine_config``)."""
        self.model = getattr(vllm_config.model_config, "model", None)
        lora = getattr(vllm_config, "lora_config", None)
        self.max_rank = lora.max_lora_rank if lora is not None else None

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    # -- the cache bound ---------------------------------------------------------------------
    def in_use(self, models=None) -> set[str]:
        """Cache keys of every adapter the server has loaded, or is about to."""
        keys = set(self.pending)
        for req in list(getattr(models, "lora_requests", {}).values()):
            p = Path(str(req.lora_path))
            if p.name == cache.ADAPTER_SUBDIR:
                keys.add(p.parent.name)
        return keys

    def enforce_cache_limit(self, in_use: set[str]) -> None:
        """Keep the cache within its bound (if any); it reports the cache's size (metrics.py)."""
        s = self.settings
        try:
            cache.enforce_limit(s.cache_path, s.cache_max_bytes, in_use)
        except Exception as e:  # housekeeping never fails a request
            logger.warning("nora: could not keep the cache %s under its bound: %s", s.cache_path, e)

    # -- converting --------------------------------------------------------------------------
    def _prepare_blocking(self, lora_path: str):
        s = self.settings
        model = self.model
        # A Hub id is checked against its snapshot in the local cache; the scope is logged once.
        base = served_base_dir(model, s.check_base, logger)
        return prepare_adapter(_local_adapter_dir(lora_path), base=base, max_rank=self.max_rank,
                               cache_dir=s.cache_path, served_model=model)

    async def prepare(self, lora_name: str, lora_path: str):
        """``Prepared`` or an ``ErrorResponse`` (404 no adapter there, 400 anything wrong with
        it). A ``Prepared`` is pending (kept from eviction) until :meth:`settle` is called."""
        try:
            prepared = await asyncio.to_thread(self._prepare_blocking, lora_path)
        except (FileNotFoundError, PermissionError):
            metrics.refused("not_found")
            return _error(f"LoRA adapter '{lora_name}': {NOT_FOUND}", HTTPStatus.NOT_FOUND, "NotFoundError")
        except Exception as e:  # the adapter's content is at fault: refuse it, keep serving
            logger.warning("nora: refused adapter %s (%s): %s", lora_name, lora_path, e)
            metrics.refused("invalid")
            return _error(f"LoRA adapter '{lora_name}' refused: {self._relative(str(e), lora_path)}",
                          HTTPStatus.BAD_REQUEST, "BadRequestError")
        if prepared.converted_now:
            logger.info("nora: converted %s adapter %s -> %s", prepared.fmt, lora_path, prepared.path)
        self.sources[prepared.path] = prepared.source
        self.pending[prepared.key] = self.pending.get(prepared.key, 0) + 1
        return prepared

    async def settle(self, models, prepared) -> None:
        """The prepared adapter is registered (or refused): keep the cache within its bound."""
        self.pending[prepared.key] -= 1
        if self.pending[prepared.key] <= 0:
            del self.pending[prepared.key]
        if prepared.converted_now:
            await asyncio.to_thread(self.enforce_cache_limit, self.in_use(models))

    def _relative(self, msg: str, lora_path: str) -> str:
        """vLLM scrubs absolute paths from error messages; keep the file names inside the
        adapter (and the base) readable by making them relative."""
        roots = [(lora_path, "the adapter directory")]
        if self.model:
            roots.append((self.model, "the base model"))
        for root, name in roots:
            for p in {str(Path(root)), str(Path(root).resolve())}:
                msg = msg.replace(p + "/", "").replace(p, name)
        return msg


class NoraStoreResolver(LoRAResolver):
    """The adapter store as a vLLM ``LoRAResolver``: resolves a model name to
    ``<adapter_dir>/<name>`` (a plain name, whose real path, and the real path of everything in
    it, stays inside the store), converted into the cache; the request it returns points at
    the cache entry. A store adapter whose content is at fault raises :class:`AdapterRefused`
    (the 400 naming the fault), where vLLM would only say "could not be loaded"."""

    def __init__(self, adapter_dir: str, front: FrontEnd):
        self.adapter_dir = Path(adapter_dir)
        self.front = front

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
        if p is None or not self.front.enabled:
            return None
        prepared = await self.front.prepare(lora_name, str(p))
        if _is_error(prepared):
            if prepared.error.code == HTTPStatus.NOT_FOUND.value:
                return None
            raise AdapterRefused(prepared)
        previous = self.front.resolved.get(lora_name)
        if previous is not None:  # an earlier resolution nobody settled: release it now
            await self.front.settle(None, previous)
        self.front.resolved[lora_name] = prepared
        logger.info("nora: resolved adapter '%s' from the store %s", lora_name, self.adapter_dir)
        # vLLM's resolve_lora gives it its id and loads it into the engine.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=prepared.path)


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


def _is_error(obj) -> bool:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return isinstance(obj, ErrorResponse)


def _as_bad_request(resp):
    # The engine refusing a converted adapter (e.g. a module the model does not have) is the
    # adapter's fault, not the server's.
    if _is_error(resp) and resp.error.code == HTTPStatus.INTERNAL_SERVER_ERROR.value:
        metrics.refused("load_failed")
        return _error(resp.error.message, HTTPStatus.BAD_REQUEST, "BadRequestError")
    return resp


async def load_lora_adapter(front: FrontEnd, models, orig, request, base_model_name=None):
    """``OpenAIServingModels.load_lora_adapter`` (``--lora-modules``, ``/v1/load_lora_adapter``)
    with the adapter converted and checked first."""
    if not front.enabled or not request.lora_name or not request.lora_path:
        return await orig(models, request, base_model_name)
    if not request.load_inplace and request.lora_name in models.lora_requests:
        return await orig(models, request, base_model_name)  # vLLM's own "already loaded" answer
    prepared = await front.prepare(request.lora_name, request.lora_path)
    if _is_error(prepared):
        return prepared
    converted = request.model_copy(update={"lora_path": prepared.path})
    try:
        return _as_bad_request(await orig(models, converted, base_model_name))
    finally:
        await front.settle(models, prepared)


async def check_model(front: FrontEnd, serving, orig, request):
    """``BaseServing._check_model``: a name the server does not know yet is resolved through
    vLLM's own ``resolve_lora`` (its resolvers, the store among them) whether or not vLLM's
    runtime LoRA loading is on (vLLM consults resolvers only when it is); a store adapter at
    fault is answered with the 400 naming the fault."""
    models = getattr(serving, "models", None)
    name = getattr(request, "model", None)
    store = front.store
    if (store is None or not front.enabled or models is None or not isinstance(name, str) or not name
            or name in models.lora_requests or serving._is_model_supported(name)
            or store.path_for(name) is None):
        return await orig(serving, request)
    try:
        found = await models.resolve_lora(name)
    except AdapterRefused as e:
        return e.response
    finally:
        prepared = front.resolved.pop(name, None)
        if prepared is not None:
            await front.settle(models, prepared)
    if isinstance(found, LoRARequest):
        return None
    if _is_error(found) and found.error.code == HTTPStatus.BAD_REQUEST.value:
        return found  # found, but the engine could not load it
    return await orig(serving, request)


def show_sources(front: FrontEnd, model_list):
    """``/v1/models``: show each adapter's own directory, not its cache entry."""
    for card in model_list.data:
        if card.root in front.sources:
            card.root = front.sources[card.root]
    return model_list
