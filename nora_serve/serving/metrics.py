"""The plugin's Prometheus metrics, shown on vLLM's ``/metrics`` next to vLLM's own ``vllm:``
ones.

| metric | kind | labels | counted in |
|---|---|---|---|
| ``nora:adapter_conversions_total`` | counter | ``format`` | the process that converted (cache) |
| ``nora:adapter_cache_hits_total`` | counter | | the process that found the entry (cache) |
| ``nora:adapter_refusals_total`` | counter | ``reason`` | API server |
| ``nora:scheduler_deferrals_total`` | counter | ``cap`` (``dense``/``basis``) | engine core, once a step per waiting request held back |
| ``nora:adapters_resident`` | gauge | ``storage`` (``dense``/``cores``) | workers (the most of any worker) |
| ``nora:bases_resident`` | gauge | | workers (the most of any worker) |
| ``nora:adapter_memory_bytes`` | gauge | | workers (summed: each holds its shard) |
| ``nora:adapter_cache_bytes`` | gauge | | API server (the conversion cache on disk) |
| ``nora:lora_requests`` | gauge | ``state`` (``running``/``waiting``) | API server, from the engine's stats |
| ``nora:lora_adapters_active`` | gauge | ``state`` (``running``/``waiting``) | API server, from the engine's stats |

No metric carries an adapter's name or path: their series do not grow with the adapters seen.
vLLM's ``vllm:lora_requests_info`` (the names of the running and waiting adapters as one label
value, a series per combination) is not set with nora on; ``nora:lora_requests`` and
``nora:lora_adapters_active`` count the same requests and adapters instead.

The engine core and the workers are other processes than the API server. ``nora-serve``
therefore runs every server in prometheus_client's multiprocess mode (the mode vLLM itself uses
with ``--api-server-count`` > 1): each process writes its figures to files that vLLM's
``/metrics`` merges (:func:`share_across_processes`). Started some other way, ``/metrics`` shows
the API server's figures (conversions, cache hits, refusals, cache bytes) only.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache

_ENV = "PROMETHEUS_MULTIPROC_DIR"
CAPS = ("dense", "basis")
REASONS = ("not_found", "invalid", "load_failed", "server_error")
STATES = ("running", "waiting")
_dir: tempfile.TemporaryDirectory | None = None


def share_across_processes() -> None:
    """Before vLLM (and so prometheus_client) is imported: give this process and every process it
    starts one fresh multiprocess directory, removed at exit. A directory the user set is kept."""
    global _dir
    if _ENV not in os.environ:
        _dir = tempfile.TemporaryDirectory(prefix="nora-metrics-")
        os.environ[_ENV] = _dir.name


@cache
def _m():
    from prometheus_client import Counter, Gauge

    class M:
        conversions = Counter("nora:adapter_conversions_total",
                              "Adapters converted into the cache (a stock PEFT LoRA and, for shared-basis "
                              "methods, cores), by source format.", ["format"])
        cache_hits = Counter("nora:adapter_cache_hits_total",
                             "Adapter loads answered by an existing cache entry.")
        refusals = Counter("nora:adapter_refusals_total",
                           "Adapter requests refused, by reason (not_found: no adapter there; invalid: "
                           "its files; load_failed: the engine refused it; server_error: the server "
                           "could not serve it, e.g. its cache disk is read-only or full).", ["reason"])
        deferrals = Counter("nora:scheduler_deferrals_total",
                            "Waiting requests held back one step because their adapter would exceed the "
                            "dense-slot or the shared-basis cap, by cap.", ["cap"])
        resident = Gauge("nora:adapters_resident", "Adapters loaded in a worker, by storage (dense: "
                         "a LoRA slot; cores: on a shared basis).", ["storage"], multiprocess_mode="livemax")
        bases = Gauge("nora:bases_resident", "Shared bases loaded in a worker.", multiprocess_mode="livemax")
        memory = Gauge("nora:adapter_memory_bytes", "Bytes of loaded adapters and bases in the workers.",
                       multiprocess_mode="livesum")
        cache = Gauge("nora:adapter_cache_bytes", "Bytes of the conversion cache on disk.",
                      multiprocess_mode="livemax")
        lora_requests = Gauge("nora:lora_requests", "Requests with an adapter in the engine, by state "
                              "(running, waiting).", ["state"], multiprocess_mode="livemax")
        lora_adapters = Gauge("nora:lora_adapters_active", "Distinct adapters with requests in the "
                              "engine, by state (running, waiting).", ["state"], multiprocess_mode="livemax")

    # Known label values exist from the start (at 0), as Prometheus advises.
    for cap in CAPS:
        M.deferrals.labels(cap=cap)
    for reason in REASONS:
        M.refusals.labels(reason=reason)
    for state in STATES:
        M.lora_requests.labels(state=state)
        M.lora_adapters.labels(state=state)
    return M


def declare() -> None:
    """Create the metrics in this process now (they show at 0 before anything happens)."""
    try:
        _m()
    except Exception:
        pass


def _safe(fn):
    # A metric must never fail the request it counts.
    def wrapped(*a, **kw):
        try:
            fn(*a, **kw)
        except Exception:
            pass
    return wrapped


@_safe
def converted(fmt: str | None) -> None:
    _m().conversions.labels(format=str(fmt or "unknown")).inc()


@_safe
def cache_hit() -> None:
    _m().cache_hits.inc()


@_safe
def refused(reason: str) -> None:
    _m().refusals.labels(reason=reason).inc()


@_safe
def deferred(cap: str) -> None:
    _m().deferrals.labels(cap=cap).inc()


@_safe
def residency(*, dense: int, cores: int, bases: int, memory_bytes: int) -> None:
    m = _m()
    m.resident.labels(storage="dense").set(dense)
    m.resident.labels(storage="cores").set(cores)
    m.bases.set(bases)
    m.memory.set(memory_bytes)


@_safe
def cache_bytes(n: int) -> None:
    _m().cache.set(n)


@_safe
def lora_requests(running: dict[str, int], waiting: dict[str, int]) -> None:
    """The engine's per-adapter request counts (``SchedulerStats``), as totals."""
    m = _m()
    for state, per in (("running", running), ("waiting", waiting)):
        m.lora_requests.labels(state=state).set(sum(per.values()))
        m.lora_adapters.labels(state=state).set(sum(1 for n in per.values() if n))
