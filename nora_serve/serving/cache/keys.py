"""Cache entries' layout and keys: the names of an entry's parts, and the content key that names
the entry (every file of the adapter, the base model's identity, the rank limit, the form and
the package version), so that a changed adapter is converted again and an unchanged one never is.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from pathlib import Path

MARKER = "nora-cache.json"
ADAPTER_SUBDIR = "adapter"
OUTPUT_SCALE_NAME = "output_scale.safetensors"  # served-not-folded methods (DoRA), beside adapter/
CORES_NAME = "cores.safetensors"  # shared-basis adapters: their own R x R cores, beside adapter/
BASES_SUBDIR = "bases"  # one file per distinct shared basis, named by its content key
KEY = re.compile(r"^[0-9a-f]{32}$")  # an entry's directory name, a basis file's stem
_HEAD = 1 << 20  # bytes of each base weight file that go into the base identity


@functools.cache
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("nora-serve")
    except Exception:  # pragma: no cover - not installed as a distribution
        return "dev"


_file_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def file_digest(p: Path) -> str:
    st = p.stat()
    memo_key = (str(p), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        hit = _file_memo.get(memo_key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _memo_lock:
        _file_memo[memo_key] = digest
    return digest


def content_digest(src: Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every (relative path, file digest) below ``src``, hidden files and the
    top-level names in ``exclude`` excluded. Files are listed with ``os.scandir`` as
    ``Path.rglob("*")`` lists them (symlinked files followed, symlinked directories not
    entered, unreadable ones skipped), in the same order: a cache hit checks thousands of these."""
    h = hashlib.sha256()
    src = Path(src)
    for rel in sorted(_files(str(src), "", set(exclude)), key=lambda r: r.split("/")):
        h.update(rel.encode() + b"\0" + file_digest(src / rel).encode() + b"\n")
    return h.hexdigest()


def _files(directory: str, prefix: str, exclude: set[str]) -> list[str]:
    out: list[str] = []
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError:  # rglob lists nothing below an unreadable or missing directory either
        return out
    for e in entries:
        if e.name.startswith(".") or (not prefix and e.name in exclude):
            continue
        try:
            is_dir = e.is_dir() and not e.is_symlink()
        except OSError:
            is_dir = False
        if is_dir:
            out.extend(_files(e.path, f"{prefix}{e.name}/", exclude))
        else:
            try:
                if e.is_file():
                    out.append(prefix + e.name)
            except OSError:
                pass
    return out


_base_memo: dict[str, str] = {}


def base_identity(base: str | Path | None) -> str:
    """Cheap identity of a base model directory: its config and the head and tail bytes of each
    weight file (two bases that differ anywhere in their weights differ there in practice;
    the full per-module fingerprint check runs on every conversion anyway)."""
    if base is None:
        return "none"
    base = Path(base)
    if not base.is_dir():
        return f"name:{base}"
    key = str(base.resolve())
    if key in _base_memo:
        return _base_memo[key]
    h = hashlib.sha256()
    cfg = base / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(base.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_HEAD))
            if size > 2 * _HEAD:
                fh.seek(size - _HEAD)
                h.update(fh.read(_HEAD))
    _base_memo[key] = h.hexdigest()
    return _base_memo[key]


def cache_key(src: Path, *, base, max_rank, form: str = "lora") -> str:
    h = hashlib.sha256()
    h.update(f"v={_package_version()}|rank={max_rank}|base={base_identity(base)}|form={form}|".encode())
    h.update(content_digest(src).encode())
    return h.hexdigest()[:32]


def entry_form(src: Path, folded: bool) -> str:
    """``cores``: a native shared-basis adapter, kept as its cores on its basis (folded into a
    LoRA only if a worker must put it in a dense slot: ``folded=True``); ``lora`` otherwise."""
    from nora_serve.converters.shared_basis import shared_basis_method

    return "cores" if not folded and shared_basis_method(src) is not None else "lora"
