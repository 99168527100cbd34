"""vLLM's ``lora_int_id`` of an adapter as a function of what it is, the same in every process.

vLLM numbers adapters with a counter per API server, so with ``--api-server-count N`` two
different adapters can reach the one engine under the same id, and one answers for the other.
Here an adapter's id is derived from its cache key (its content, the base, the rank limit):
``ID_FLOOR + hash(key, probe) mod ID_SPAN``. The ids taken are recorded in the cache directory
that every process of one server shares (``<cache_dir>/ids/<id>`` holds its key, created in one
step with ``os.link``), so a second key whose hash lands on a taken id is detected and takes the
next probe: never the same id for two keys. Ids stay below 2**31 (vLLM keeps them in int32
arrays) and above vLLM's own warm-up ids. No vLLM import here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from .log import logger

ID_FLOOR = 1 << 20
ID_SPAN = (1 << 31) - 1 - ID_FLOOR
PROBES = 64
IDS_SUBDIR = "ids"

_memo: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def candidate(key: str, probe: int) -> int:
    h = hashlib.sha256(f"{key}|{probe}".encode()).digest()
    return ID_FLOOR + int.from_bytes(h[:8], "big") % ID_SPAN


def adapter_id(key: str, cache_dir: str | Path) -> int:
    """The id of the adapter whose cache key is ``key``; OSError if the registry cannot be
    written (the cache is unavailable), RuntimeError if every probe is taken."""
    cache_dir = Path(cache_dir).expanduser()
    memo_key = (str(cache_dir), key)
    with _lock:
        if memo_key in _memo:
            return _memo[memo_key]
    folder = cache_dir / IDS_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for probe in range(PROBES):
        lid = candidate(key, probe)
        path = folder / str(lid)
        owner = _claim(path, key)
        if owner == key:
            with _lock:
                _memo[memo_key] = lid
            return lid
        logger.warning(
            "nora: adapter id %d of cache key %s is taken by key %s; probing the next id",
            lid, key, owner)
    raise RuntimeError(f"no free adapter id for cache key {key} after {PROBES} probes")


def _claim(path: Path, key: str) -> str:
    """Record ``key`` at ``path`` unless it exists; the key recorded there either way."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.write(fd, key.encode())
        os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and fails where another process got there first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()
