"""API-server side: convert (and check against the base) before vLLM sees an adapter, so that a
bad adapter is a clear 4xx answer and never reaches the engine; the adapter store, a vLLM
``LoRAResolver`` registered in ``LoRAResolverRegistry``, which also works without vLLM's
runtime loading (``/v1/load_lora_adapter``) being open.

The process's state is one :class:`FrontEnd` (``hooks.py`` makes it and hands it to its
wrappers); the functions below take it and vLLM's ``OpenAIServingModels`` / serving object.

Identity: every adapter reaches the engine under the id :mod:`nora_serve.serving.adapter_ids`
derives from its cache key (vLLM's own numbering is per API server): vLLM's counter on
``OpenAIServingModels`` is replaced by :class:`IdCounter`, which hands out the id this request's
task set. The request points at the adapter's own directory; the workers read it through the
same cache, and convert it again if its entry was removed meanwhile."""

from __future__ import annotations

import asyncio
import contextvars
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from nora_serve.serving import metrics
from nora_serve.serving.adapter_ids import adapter_id
from nora_serve.serving.cache.bound import enforce_limit
from nora_serve.serving.cache.build import prepare_adapter
from nora_serve.serving.cache.faults import CacheUnavailable, check_writable, inside
from nora_serve.serving.cache.temporaries import clean_stale_temporaries
from nora_serve.serving.served_base import served_base_dir
from nora_serve.serving.settings import NoraSettings

from .log import logger  # noqa: E402

# A store name is one plain directory name: letters, digits and ._+- (not first), at most 128.
STORE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}\Z")
# Files whose presence makes a directory "an adapter" (a broken one is a 400, naming the fault);
# a directory with none of them answers exactly as a missing one, so that errors do not tell
# which paths exist on the server.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "model.safetensors", "checkpoint")
NOT_FOUND = "no adapter found at the given path"
# A store adapter named by a request this recently is not idle: the request has passed the model
# check but may not have reached the engine yet (its entry must not be evicted meanwhile).
BUSY_GRACE_S = 10.0


class AdapterRefused(Exception):
    """An adapter found by the store but refused (its content is at fault): ``response`` is the
    one-line 400 to answer with."""

    def __init__(self, response):
        super().__init__(response.error.message)
        self.response = response


# The id the current request's task hands to vLLM's counter (IdCounter); unset: vLLM's own.
_NEXT_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar("nora_next_lora_id", default=None)


class IdCounter:
    """Stands in for ``OpenAIServingModels.lora_id_counter``: the id the caller set for this
    request (derived from the adapter's cache key), else vLLM's own next number."""

    def __init__(self, fallback):
        self.fallback = fallback

    def inc(self, num: int = 1) -> int:
        lid = _NEXT_ID.get()
        return lid if lid is not None else self.fallback.inc(num)


def _ensure_id_counter(models) -> None:
    if not isinstance(getattr(models, "lora_id_counter", None), IdCounter):
        models.lora_id_counter = IdCounter(models.lora_id_counter)


@dataclass(frozen=True)
class Ticket:
    """An adapter converted (or found) in the cache, its entry pinned until settled."""

    prepared: object  # serving.cache.build.Prepared
    lora_id: int


@dataclass(frozen=True)
class Served:
    key: str  # its cache entry
    from_store: bool  # resolved from the store (evictable when idle) or loaded (kept)


class FrontEnd:
    """The API-server process's state: the settings, the served model and LoRA rank limit,
    the adapters this server serves (their cache keys), the entries pinned between conversion
    and registration, and the requests in flight per adapter (an idle store adapter's entry may
    be evicted, and the adapter is then forgotten and resolved again on its next request)."""

    def __init__(self):
        self.settings: NoraSettings | None = None
        self.store: NoraStoreResolver | None = None
        self.model: str | None = None  # the served model (path or hub id)
        self.max_rank: int | None = None
        self.served: dict[str, Served] = {}  # adapter name -> what it is
        self.pending: Counter[str] = Counter()  # cache key -> prepares not yet settled
        self.inflight: Counter[str] = Counter()  # adapter name -> requests in the engine
        self.seen: dict[str, float] = {}  # adapter name -> last request naming it (monotonic)
        self.resolved: dict[str, Ticket] = {}  # store name -> its ticket, while resolving
        self.max_cpu_loras: int | None = None
        self.preload: StorePreload | None = None  # --nora-preload-store: the store's pass
        self._lock = threading.Lock()  # pending, inflight and served are read from the eviction thread

    def configure(self, settings: NoraSettings) -> None:
        """Nora is on in this API server (its engine config says so): clean the cache of what
        killed conversions left and keep it within its bound."""
        self.settings = settings
        metrics.declare()
        if settings.adapter_dir and (self.store is None or str(self.store.adapter_dir) != settings.adapter_dir):
            self.store = NoraStoreResolver(settings.adapter_dir, self)
        check_writable(settings.cache_path)  # CacheUnavailable: the server does not start
        removed = clean_stale_temporaries(settings.cache_path)
        if removed:
            logger.info("nora: removed %d stale temporaries from the cache %s", len(removed),
                        settings.cache_path)
        self.enforce_cache_limit()

    def bind(self, vllm_config) -> None:
        """The engine config this front end serves (``EngineArgs.create_engine_config``)."""
        self.model = getattr(vllm_config.model_config, "model", None)
        lora = getattr(vllm_config, "lora_config", None)
        self.max_rank = lora.max_lora_rank if lora is not None else None
        self.max_cpu_loras = getattr(lora, "max_cpu_loras", None) if lora is not None else None

    def start_preload(self) -> None:
        """``--nora-preload-store``: convert the store's adapters into the cache now, in a thread,
        while the engine starts (:class:`StorePreload`); :func:`preload_store` hands them to the
        engine once it runs. Once per process."""
        s = self.settings
        if s is None or not s.preload_store or self.store is None or self.preload is not None:
            return
        self.preload = StorePreload(self, self.max_cpu_loras)
        self.preload.start()

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    # -- the cache bound ---------------------------------------------------------------------
    def _pin(self, key: str) -> None:
        with self._lock:
            self.pending[key] += 1

    def _unpin(self, key: str) -> None:
        with self._lock:
            self.pending[key] -= 1
            if self.pending[key] <= 0:
                del self.pending[key]

    def hold(self, name: str | None) -> None:
        """A request for adapter ``name`` entered the engine (``AsyncLLM.generate``)."""
        if name:
            with self._lock:
                self.inflight[name] += 1

    def touch(self, name: str) -> None:
        """A request names adapter ``name`` (``_check_model``): it is not idle, though it reaches
        the engine (:meth:`hold`) only a moment later."""
        with self._lock:
            self.seen[name] = time.monotonic()

    def _busy(self, name: str) -> bool:  # with self._lock held
        return self.inflight.get(name, 0) > 0 or time.monotonic() - self.seen.get(name, -1e9) < BUSY_GRACE_S

    def release(self, name: str | None) -> None:
        if name:
            with self._lock:
                self.inflight[name] -= 1
                if self.inflight[name] <= 0:
                    del self.inflight[name]

    def in_use(self) -> set[str]:
        """Cache keys not to evict: entries being prepared or registered, adapters loaded by
        name (``--lora-modules``, runtime loading: kept until unloaded), and store adapters with
        a request in the engine. Called by the eviction with the cache lock held."""
        with self._lock:
            keys = set(self.pending)
            keys |= {s.key for name, s in self.served.items() if not s.from_store or self._busy(name)}
        return keys

    def enforce_cache_limit(self, added: str | None = None) -> list[str]:
        """Keep the cache within its bound (if any); it reports the cache's size (serving/metrics.py).
        ``added``: the entry just converted. The keys removed."""
        s = self.settings
        try:
            return enforce_limit(s.cache_path, s.cache_max_bytes, self.in_use, added=added)
        except Exception as e:  # housekeeping never fails a request
            logger.warning("nora: could not keep the cache %s under its bound: %s", s.cache_path, e)
            return []

    def forget_evicted(self, models, removed: list[str]) -> None:
        """Store adapters whose entry was evicted while idle: forgotten here, resolved (and
        converted) again on their next request."""
        gone = set(removed)
        with self._lock:
            names = [n for n, s in self.served.items() if s.from_store and s.key in gone and not self._busy(n)]
            for name in names:
                del self.served[name]
                self.seen.pop(name, None)
        for name in names:
            if models is not None:
                getattr(models, "lora_requests", {}).pop(name, None)

    def cores_to_send(self, ticket: Ticket):
        """``--nora-preload-store``: a shared-basis adapter's cores as its entry holds them,
        ``(SharedBasisEntry fields, stacks as cores_file.stacks_to_wire makes them)``, read here
        where the entry was checked and is pinned (the workers then neither read nor hash the
        entry again), or ``None`` (the workers read the entry as on a first request)."""
        from nora_serve.serving.cache.cores_file import read_stacks, stacks_to_wire
        from nora_serve.serving.cache.trust import shared_basis_entry

        p = ticket.prepared
        try:
            sb = shared_basis_entry(p.path, self.settings.cache_path, trusted=Path(p.path).parent)
            if sb is None:
                return None
            return [sb.key, sb.rank, sb.method, str(sb.cores), str(sb.basis)], stacks_to_wire(read_stacks(sb.cores))
        except Exception as e:  # the workers then read it themselves, and say what is wrong
            logger.debug("nora: cores of %s not read for the preload: %s", p.path, e)
            return None

    # -- converting --------------------------------------------------------------------------
    def _prepare_blocking(self, lora_path: str):
        s = self.settings
        model = self.model
        # A Hub id is checked against its snapshot in the local cache; the scope is logged once.
        base = served_base_dir(model, s.check_base, logger)
        prepared = prepare_adapter(_local_adapter_dir(lora_path), base=base, max_rank=self.max_rank,
                                   cache_dir=s.cache_path, served_model=model, pin=self._pin)
        try:
            return Ticket(prepared, adapter_id(prepared.key, s.cache_path))
        except OSError as e:
            self._unpin(prepared.key)
            raise CacheUnavailable(s.cache_path, e.strerror or str(e)) from None
        except BaseException:
            self._unpin(prepared.key)
            raise

    async def prepare(self, lora_name: str, lora_path: str):
        """A :class:`Ticket` or an ``ErrorResponse`` (404 no adapter there, 400 anything wrong
        with it, 503 the cache cannot be written). A ticket's entry is pinned (kept from
        eviction) until :meth:`settle` is called."""
        try:
            ticket = await asyncio.to_thread(self._prepare_blocking, lora_path)
        except CacheUnavailable as e:  # the server's fault, not the adapter's
            logger.error("nora: adapter %s not served: %s", lora_name, e)
            metrics.refused("server_error")
            return _error(f"LoRA adapter '{lora_name}' cannot be served now: {e.reason}",
                          HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError")
        except (FileNotFoundError, PermissionError):
            metrics.refused("not_found")
            return _error(f"LoRA adapter '{lora_name}': {NOT_FOUND}", HTTPStatus.NOT_FOUND, "NotFoundError")
        except Exception as e:  # the adapter's content is at fault: refuse it, keep serving
            logger.warning("nora: refused adapter %s (%s): %s", lora_name, lora_path, e)
            metrics.refused("invalid")
            return _error(f"LoRA adapter '{lora_name}' refused: {self._relative(str(e), lora_path)}",
                          HTTPStatus.BAD_REQUEST, "BadRequestError")
        p = ticket.prepared
        if p.converted_now:
            logger.info("nora: converted %s adapter %s -> %s", p.fmt, lora_path, p.path)
        return ticket

    def register(self, name: str, ticket: Ticket, *, from_store: bool) -> None:
        with self._lock:  # in_use() reads it from the eviction thread
            self.served[name] = Served(ticket.prepared.key, from_store)

    async def settle(self, models, ticket: Ticket) -> None:
        """The ticket's adapter is registered (or refused): unpin it, keep the cache within its
        bound, and forget the idle store adapters whose entries that removed."""
        self._unpin(ticket.prepared.key)
        if ticket.prepared.converted_now:
            removed = await asyncio.to_thread(self.enforce_cache_limit, str(Path(ticket.prepared.path).parent))
            if removed:
                self.forget_evicted(models, removed)

    def _relative(self, msg: str, lora_path: str) -> str:
        """vLLM scrubs absolute paths from error messages; keep the file names inside the
        adapter (and the base) readable by making them relative."""
        roots = [(lora_path, "the adapter directory")]
        if self.model:
            roots.append((self.model, "the base model"))
        if self.store is not None:  # e.g. where a shared basis was looked for (<store>/bases/)
            roots.append((str(self.store.adapter_dir), "the store"))
        from nora_serve.converters.basis_file import cache_dir as basis_cache

        roots.append((str(basis_cache()), "the basis cache"))
        for root, name in roots:
            for p in {str(Path(root)), str(Path(root).resolve())}:
                msg = msg.replace(p + "/", "").replace(p, name)
        return msg


# --nora-preload-store: adapters handed to the workers per engine call (the engine serves nothing
# else during one; at start it serves nothing yet), and the workers' method that loads them
# (worker.NoraWorkerExtension, mixed into vLLM's worker class through --worker-extension-cls).
PRELOAD_CHUNK = 512
WORKER_PRELOAD = "nora_preload_store"


class StorePreload:
    """``--nora-preload-store``, its first half: every adapter of the store converted (or found)
    in the cache in one pass, in a thread started while the engine starts (compiling the model
    takes a minute; the conversion overlaps it, and once the engine runs, the workers load what
    is ready while the rest converts: :meth:`next_chunk`). Names are taken in sorted order until
    ``limit`` (``--max-cpu-loras``) adapters are ready; a name that is no adapter is skipped, one
    the conversion refuses is logged and skipped (its requests get their 400, as without
    preload). Each ticket's entry stays pinned (kept from eviction) until :func:`preload_store`
    settles it."""

    def __init__(self, front: "FrontEnd", limit: int | None):
        self.front = front
        self.limit = limit
        self.tickets: list[tuple[str, Ticket]] = []  # ready, not yet taken by next_chunk
        self.ready = 0  # tickets made in all
        self.refused = 0
        self.seconds = 0.0
        self._done = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nora-preload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def next_chunk(self, n: int) -> list[tuple[str, "Ticket"]]:
        """Up to ``n`` ready tickets, waiting until ``n`` are ready or the pass has ended;
        ``[]`` once it has ended and every ticket was taken."""
        with self._cond:
            self._cond.wait_for(lambda: self._done or len(self.tickets) >= n)
            chunk, self.tickets = self.tickets[:n], self.tickets[n:]
            return chunk

    def ended(self) -> bool:
        """The pass has ended and every ticket was taken."""
        with self._cond:
            return self._done and not self.tickets

    def stop(self) -> list[tuple[str, "Ticket"]]:
        """End the pass (after the adapter being converted now): the tickets never taken."""
        with self._cond:
            self._stop = True
        self._thread.join()
        with self._cond:
            rest, self.tickets = self.tickets, []
            return rest

    def _add(self, name: str, ticket: "Ticket") -> None:
        with self._cond:
            self.tickets.append((name, ticket))
            self.ready += 1
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._convert_all()
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _convert_all(self) -> None:
        t0 = time.perf_counter()
        store = self.front.store
        try:
            names = sorted(os.listdir(store.adapter_dir))
        except OSError as e:
            logger.error("nora: cannot preload the store %s: %s", store.adapter_dir, e)
            return
        try:
            for name in names:
                if self._stop or (self.limit is not None and self.ready >= self.limit):
                    break
                p = store.path_for(name)
                if p is None:
                    continue
                try:
                    ticket = self.front._prepare_blocking(str(p))
                except CacheUnavailable as e:
                    logger.error("nora: preloading the store stopped: %s", e)
                    break
                except (FileNotFoundError, PermissionError):
                    continue  # not an adapter (e.g. the store's bases/)
                except Exception as e:  # the adapter's fault: its own requests get the 400
                    self.refused += 1
                    logger.warning("nora: store adapter %s not preloaded: %s", name,
                                   self.front._relative(str(e), str(p)))
                    continue
                self._add(name, ticket)
        except Exception as e:  # never the server's start
            logger.error("nora: preloading the store stopped: %s", e)
        self.seconds = time.perf_counter() - t0
        logger.info("nora: store %s: %d adapters ready in the cache for preloading (%d refused) in %.1f s",
                    store.adapter_dir, self.ready, self.refused, self.seconds)


async def preload_store(front: FrontEnd, models) -> None:
    """``--nora-preload-store``, its second half, once the engine runs (from
    ``OpenAIServingModels.init_static_loras``, before the server answers): the adapters of the
    pass (:class:`StorePreload`) loaded by every worker in bulk (engine calls of
    ``PRELOAD_CHUNK`` each, sent as the pass readies them, no request step in between), then
    known to this API server as resolved store adapters, under the ids of their cache keys.
    Their first request is then a resident one. An adapter a worker refuses is left to its
    first request (which answers its 400); a failing engine call ends the preload, not the
    server."""
    pre = front.preload
    if pre is None or not front.enabled:
        return
    t0 = time.perf_counter()
    loaded = failed = 0
    engine_s = 0.0
    pinned: list = []

    def next_chunk():  # in a thread: the next chunk's cores are read while the workers load one
        chunk = pre.next_chunk(PRELOAD_CHUNK)
        pinned.extend(t for _, t in chunk)
        return [(name, t, front.cores_to_send(t)) for name, t in chunk if name not in models.lora_requests]

    ahead = asyncio.ensure_future(asyncio.to_thread(next_chunk))
    try:
        while True:
            todo = await ahead  # --lora-modules win: their names are not in it
            if not todo and pre.ended():
                break
            ahead = asyncio.ensure_future(asyncio.to_thread(next_chunk))
            if not todo:
                continue
            entries = [(name, t.lora_id, t.prepared.path, sent) for name, t, sent in todo]
            t1 = time.perf_counter()
            try:
                replies = await models.engine_client.collective_rpc(WORKER_PRELOAD, args=(entries,))
            except Exception as e:  # the rest load on their first request, as without preload
                logger.error("nora: preloading the store stopped in the engine: %s", e)
                break
            engine_s += time.perf_counter() - t1
            errors: dict[str, str] = {}
            for reply in replies:  # one per worker: loaded only where every worker loaded it
                for name, err in reply:
                    if err and name not in errors:
                        errors[name] = err
            for name, t, _ in todo:
                if name in errors:
                    failed += 1
                    logger.warning("nora: store adapter %s not preloaded: %s", name, errors[name])
                    continue
                models.lora_requests[name] = LoRARequest(lora_name=name, lora_int_id=t.lora_id,
                                                         lora_path=t.prepared.source)
                front.register(name, t, from_store=True)
                loaded += 1
    finally:
        pinned += [t for _, t in await asyncio.to_thread(pre.stop)]
        await asyncio.gather(ahead, return_exceptions=True)  # the chunk it took is in pinned
        for t in pinned:
            front._unpin(t.prepared.key)
    removed = await asyncio.to_thread(front.enforce_cache_limit)
    if removed:
        front.forget_evicted(models, removed)
    logger.info("nora: preloaded %d store adapters (%d refused by the conversion, %d by the engine) in "
                "%.1f s after the engine started (conversion %.1f s in all, from the server's start; "
                "the workers' load %.1f s)", loaded, pre.refused, failed, time.perf_counter() - t0,
                pre.seconds, engine_s)


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
            if not inside(real, root) or real == root or not os.path.isdir(real):
                return None
            # Nothing in the adapter may lead out of the store either (a symlinked weight file).
            for dirpath, dirnames, filenames in os.walk(real):
                for n in dirnames + filenames:
                    q = os.path.join(dirpath, n)
                    if os.path.islink(q) and not inside(os.path.realpath(q), root):
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
        ticket = self.front.resolved.get(lora_name)  # prepared by check_model, its id set
        if ticket is None:  # asked by vLLM directly: prepare here, keep vLLM's numbering
            ticket = await self.front.prepare(lora_name, str(p))
            if _is_error(ticket):
                if ticket.error.code == HTTPStatus.NOT_FOUND.value:
                    return None
                raise AdapterRefused(ticket)
            await self.front.settle(None, ticket)
        logger.info("nora: resolved adapter '%s' from the store %s", lora_name, self.adapter_dir)
        # vLLM's resolve_lora gives it its id (IdCounter) and loads it into the engine; the
        # engine reads the adapter's own directory through the cache.
        return LoRARequest(lora_name=lora_name, lora_int_id=ticket.lora_id, lora_path=ticket.prepared.source)


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
    ticket = await front.prepare(request.lora_name, request.lora_path)
    if _is_error(ticket):
        return ticket
    checked = request.model_copy(update={"lora_path": ticket.prepared.source})
    _ensure_id_counter(models)
    token = _NEXT_ID.set(ticket.lora_id)
    try:
        resp = _as_bad_request(await orig(models, checked, base_model_name))
        if not _is_error(resp):
            front.register(request.lora_name, ticket, from_store=False)
        return resp
    finally:
        _NEXT_ID.reset(token)
        await front.settle(models, ticket)


async def check_model(front: FrontEnd, serving, orig, request):
    """``BaseServing._check_model``: a name the server does not know yet is resolved through
    vLLM's own ``resolve_lora`` (its resolvers, the store among them) whether or not vLLM's
    runtime LoRA loading is on (vLLM consults resolvers only when it is); a store adapter at
    fault is answered with the 400 naming the fault."""
    models = getattr(serving, "models", None)
    name = getattr(request, "model", None)
    if front.enabled and isinstance(name, str) and name in front.served:
        front.touch(name)
    store = front.store
    if (store is None or not front.enabled or models is None or not isinstance(name, str) or not name
            or name in models.lora_requests or serving._is_model_supported(name)
            or store.path_for(name) is None):
        return await orig(serving, request)
    ticket = await front.prepare(name, str(store.path_for(name)))
    if _is_error(ticket):
        if ticket.error.code == HTTPStatus.NOT_FOUND.value:
            return await orig(serving, request)
        return ticket
    front.resolved[name] = ticket
    _ensure_id_counter(models)
    token = _NEXT_ID.set(ticket.lora_id)
    try:
        found = await models.resolve_lora(name)
    except AdapterRefused as e:
        return e.response
    finally:
        _NEXT_ID.reset(token)
        if front.resolved.get(name) is ticket:
            del front.resolved[name]
        await front.settle(models, ticket)
    if isinstance(found, LoRARequest):
        if found.lora_int_id == ticket.lora_id:
            front.register(name, ticket, from_store=True)
        front.touch(name)
        return None
    if _is_error(found) and found.error.code == HTTPStatus.BAD_REQUEST.value:
        return found  # found, but the engine could not load it
    return await orig(serving, request)


def hide_paths(front: FrontEnd, model_list):
    """``/v1/models``: no server path in any answer. An adapter's (or the base model's) root is
    its name (a store adapter's name is its path relative to the store)."""
    for card in model_list.data:
        if isinstance(card.root, str) and os.path.isabs(card.root):
            card.root = card.id
    return model_list
