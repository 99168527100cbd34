"""The cache's size bound: :func:`enforce_limit` removes least recently used entries no loaded
adapter uses (an entry's last use is its marker's mtime, :func:`touch`), deciding what is in use
under the cache's lock (``flock`` on the cache directory itself, exclusive) that every
conversion and load holds shared while it works (:func:`reading`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import metrics
from ..log import logger
from .keys import BASES_SUBDIR, KEY, MARKER
from .temporaries import discard
from .trust import read_marker


_held = threading.local()  # the cache directories this thread holds shared (reading)


@contextlib.contextmanager
def reading(cache_dir: str | Path):
    """Hold the cache's lock shared: no entry is removed by :func:`enforce_limit` (which takes it
    exclusively) while a conversion or a load that reads entries runs. Without a writable
    cache directory this holds nothing (there is then nothing to evict either). Inside a
    ``reading`` of the same directory in the same thread it holds what that one holds: a bulk
    load takes the lock once, not once per adapter and again per conversion."""
    key = str(Path(cache_dir).expanduser())
    held = _held.__dict__.setdefault("dirs", set())
    if key in held:
        yield
        return
    with _dir_lock(cache_dir, shared=True):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


@contextlib.contextmanager
def _dir_lock(cache_dir: str | Path, *, shared: bool):
    """``flock`` on the directory itself (no lock file left in the cache); holds nothing where
    the directory cannot be made or opened."""
    import fcntl

    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def touch(entry: Path) -> None:
    """Record a use (the marker's mtime is the entry's last use, for eviction)."""
    with contextlib.suppress(OSError):
        os.utime(entry / MARKER)


def _tree_bytes(p: Path) -> int:
    total = 0
    for f in p.rglob("*"):
        with contextlib.suppress(OSError):
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
    return total


@dataclass(frozen=True)
class CacheUsage:
    entries: dict[str, tuple[float, int, str | None]]  # key -> (last use, bytes, basis key)
    bases: dict[str, int]  # basis key -> bytes

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.entries.values()) + sum(self.bases.values())


def cache_usage(cache_dir: str | Path) -> CacheUsage:
    cache_dir = Path(cache_dir)
    entries: dict[str, tuple[float, int, str | None]] = {}
    bases: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for p in cache_dir.iterdir():
            if not KEY.match(p.name) or not p.is_dir():
                continue
            try:
                used = (p / MARKER).stat().st_mtime
            except OSError:
                used = 0.0
            info = (read_marker(p) or {}).get("shared_basis")
            entries[p.name] = (used, _tree_bytes(p), info.get("key") if isinstance(info, dict) else None)
    with contextlib.suppress(OSError):
        for f in (cache_dir / BASES_SUBDIR).iterdir():
            if f.suffix == ".safetensors" and KEY.match(f.stem):
                bases[f.stem] = f.stat().st_size
    return CacheUsage(entries, bases)


# Counting the whole cache walks every entry; after each of thousands of conversions that is
# quadratic. Below the bound, a conversion adds its entry's size to the last count instead, and
# the whole cache is counted again at most this often (other processes convert too).
RECOUNT_S = 30.0
_counted: dict[str, tuple[int, float]] = {}  # cache dir -> (bytes, monotonic time of the count)


def enforce_limit(cache_dir: str | Path, max_bytes: int | None, in_use=frozenset(),
                  added: str | Path | None = None) -> list[str]:
    """Keep the cache under ``max_bytes``: remove least recently used entries (by their last
    use) that are not ``in_use`` (entry keys, or a function returning them: called once the lock
    is held, so that nothing pinned in between escapes it), then the bases no remaining entry
    needs. Entries in use are never removed, so the cache may stay above the bound while they
    are loaded. ``added``: the entry just written (its size is added to the last count, which is
    redone in full when that passes the bound or is older than ``RECOUNT_S``). Reports the
    cache's size (metrics.py) either way. Returns the keys removed."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    known = _counted.get(str(cache_dir))
    if added is not None and known is not None and time.monotonic() - known[1] < RECOUNT_S:
        total = known[0] + _tree_bytes(Path(added))
        if not max_bytes or total <= max_bytes:
            _counted[str(cache_dir)] = (total, known[1])
            metrics.cache_bytes(total)
            return []
    if not max_bytes:
        total = cache_usage(cache_dir).total
        _counted[str(cache_dir)] = (total, time.monotonic())
        metrics.cache_bytes(total)
        return []
    removed: list[str] = []
    with _dir_lock(cache_dir, shared=False):
        usage = cache_usage(cache_dir)
        total = usage.total
        if total <= max_bytes:
            _counted[str(cache_dir)] = (total, time.monotonic())
            metrics.cache_bytes(total)
            return []
        if callable(in_use):
            in_use = in_use()
        entries = dict(usage.entries)
        for key, (_, size, _) in sorted(entries.items(), key=lambda kv: kv[1][0]):
            if total <= max_bytes:
                break
            if key in in_use:
                continue
            discard(cache_dir / key)
            del entries[key]
            total -= size
            removed.append(key)
        needed = {b for _, _, b in entries.values() if b}
        for bkey, size in usage.bases.items():
            if bkey not in needed and removed:
                with contextlib.suppress(OSError):
                    (cache_dir / BASES_SUBDIR / f"{bkey}.safetensors").unlink()
                total -= size
    _counted[str(cache_dir)] = (total, time.monotonic())
    metrics.cache_bytes(total)
    if removed:
        logger.info("nora: cache over %.2f GB: removed %d least recently used entries (%.2f GB left)",
                    max_bytes / 1e9, len(removed), total / 1e9)
    return removed
