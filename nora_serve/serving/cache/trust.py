"""Which cache entries are trusted, and reading them: an entry is used as it is only where this
cache wrote it (:func:`trusted_entry`: its real path is ``<cache_dir>/<key>/adapter``, and the
digest of its files equals the one its marker recorded); a ``nora-cache.json`` beside any other
directory means nothing.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .keys import (ADAPTER_SUBDIR, BASES_SUBDIR, CORES_NAME, KEY, MARKER, OUTPUT_SCALE_NAME, cache_key,
                   content_digest, entry_form, file_digest)


def entry_digest(entry: Path) -> str:
    """sha256 over the entry's own files (``adapter/``, the cores), marker and hidden files
    excluded: recorded in the marker when the entry is written, recomputed before it is used."""
    return content_digest(entry, exclude=(MARKER,))


def read_marker(entry: Path) -> dict | None:
    """The entry's marker (a shallow copy), read once per version of the file: loading an
    adapter reads it to trust the entry and again for its shared-basis parts."""
    f = os.path.join(entry, MARKER)
    try:
        st = os.stat(f)
        key = (f, st.st_ino, st.st_size, st.st_mtime_ns)
        meta = _markers.get(key)
        if meta is None:
            with open(f, "rb") as fh:
                meta = json.loads(fh.read())
            if not isinstance(meta, dict):
                return None
            with _markers_lock:
                _markers[key] = meta
                while len(_markers) > _MARKERS_KEPT:
                    _markers.pop(next(iter(_markers)))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return dict(meta)


_MARKERS_KEPT = 256
_markers: dict[tuple, dict] = {}
_markers_lock = threading.Lock()


def trusted_entry(path: str | Path, cache_dir: str | Path) -> Path | None:
    """The cache entry directory if ``path`` is the ``adapter/`` of an entry this cache wrote:
    its real location is ``<cache_dir>/<key>/adapter``, its marker names that key, and the
    digest of its files equals the one recorded when it was written. Anything else (a
    directory elsewhere with a ``nora-cache.json`` beside it, an entry changed on disk) is
    not trusted and goes through the full conversion and its checks."""
    p = Path(path)
    if p.name != ADAPTER_SUBDIR:  # never an entry's (the test below, before any path is resolved)
        return None
    try:
        entry = p.parent.resolve(strict=True)  # adapter/ itself is absent in a cores-only entry
        root = Path(cache_dir).expanduser().resolve()
        if p.exists() and p.resolve(strict=True) != entry / ADAPTER_SUBDIR:
            return None  # adapter/ leads elsewhere
    except (OSError, RuntimeError):
        return None
    if p.name != ADAPTER_SUBDIR or entry.parent != root or not KEY.match(entry.name):
        return None
    meta = read_marker(entry)
    if meta is None or meta.get("key") != entry.name or not isinstance(meta.get("digest"), str):
        return None
    try:
        if entry_digest(entry) != meta["digest"]:
            return None
    except OSError:
        return None
    return entry


def lookup_entry(src: str | Path, *, base, max_rank, cache_dir: str | Path, folded: bool = False) -> Path | None:
    """The trusted entry ``prepare_adapter`` would return for ``src`` if it exists already
    (nothing is converted or written), else ``None``."""
    entry = trusted_entry(Path(src).expanduser(), cache_dir)  # its adapter/ may be absent
    if entry is not None:
        return entry
    try:
        src_path = Path(src).expanduser().resolve(strict=True)
        if not src_path.is_dir():
            return None
        final = Path(cache_dir).expanduser() / cache_key(src_path, base=base, max_rank=max_rank,
                                                         form=entry_form(src_path, folded))
    except (OSError, RuntimeError):
        return None
    return trusted_entry(final / ADAPTER_SUBDIR, cache_dir)


def output_scales(adapter_dir: str | Path) -> dict | None:
    """The per-module output scales of a cache entry's adapter (``None``: a plain LoRA)."""
    f = Path(adapter_dir).parent / OUTPUT_SCALE_NAME
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(f))


@dataclass(frozen=True)
class SharedBasisEntry:
    key: str
    rank: int
    method: str
    cores: Path
    basis: Path


def shared_basis_entry(path: str | Path, cache_dir: str | Path, *,
                       trusted: Path | None = None) -> SharedBasisEntry | None:
    """The shared-basis parts of a trusted cache entry (``<cache_dir>/<key>/adapter``), or
    ``None`` when the entry is a plain LoRA only (or not one this cache wrote). ``trusted``: the
    entry directory of ``path`` when the caller has just checked it (``prepare_adapter``, with the
    cache's reading lock still held): not hashed again."""
    entry = trusted if trusted is not None and Path(path).parent == trusted else trusted_entry(path, cache_dir)
    if entry is None:
        return None
    info = (read_marker(entry) or {}).get("shared_basis")
    if not isinstance(info, dict) or not KEY.match(str(info.get("key", ""))):
        return None
    try:
        found = SharedBasisEntry(str(info["key"]), int(info["rank"]), str(info["method"]),
                                 entry / CORES_NAME, entry.parent / BASES_SUBDIR / f"{info['key']}.safetensors")
    except (KeyError, TypeError, ValueError):
        return None
    if not (found.cores.is_file() and found.basis.is_file()):
        return None
    if info.get("basis_digest") != file_digest(found.basis):
        return None
    return found
