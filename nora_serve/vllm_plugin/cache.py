"""Convert-on-load cache: any supported adapter directory -> a stock PEFT LoRA vLLM can load.

Entries are keyed by content (every file of the adapter, the base model's identity, the
rank limit and the package version), so a changed adapter is converted again and an
unchanged one never is. An entry is built in a private temporary directory and renamed into
place in one step: readers only ever see complete entries, and when several processes (the
API server and tensor-parallel workers) convert the same adapter at once, the first rename
wins and the others discard their copy. No vLLM import here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

MARKER = "nora-cache.json"
ADAPTER_SUBDIR = "adapter"
CORES_NAME = "cores.safetensors"  # shared-basis adapters: their own R x R cores, beside adapter/
BASES_SUBDIR = "bases"  # one file per distinct shared basis, named by its content key
_HEAD = 1 << 20  # bytes of each base weight file that go into the base identity


@dataclass(frozen=True)
class Prepared:
    path: str  # what vLLM loads
    source: str  # what the user gave
    key: str
    fmt: str | None  # detected source format; None when the source was already a cache entry
    converted_now: bool


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("nora-serve")
    except Exception:  # pragma: no cover - not installed as a distribution
        return "dev"


_file_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def _file_digest(p: Path) -> str:
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


def content_digest(src: Path) -> str:
    """sha256 over every (relative path, file digest) below ``src``, hidden files excluded."""
    h = hashlib.sha256()
    files = sorted(
        p for p in src.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
    for p in files:
        h.update(str(p.relative_to(src)).encode() + b"\0" + _file_digest(p).encode() + b"\n")
    return h.hexdigest()


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


def is_cache_entry(path: str | Path) -> bool:
    p = Path(path)
    return p.name == ADAPTER_SUBDIR and (p.parent / MARKER).is_file()


def prepare_adapter(
    src: str | Path,
    *,
    base: str | Path | None,
    max_rank: int | None,
    cache_dir: str | Path,
) -> Prepared:
    """Return a stock PEFT LoRA directory equivalent to ``src``, converting on a cache miss.

    Raises ``FileNotFoundError`` for a missing directory and the converters' ``AdapterError``
    (a ``ValueError`` naming file, module and tensor) for anything wrong with the adapter,
    including a base-model fingerprint mismatch.
    """
    src_path = Path(src).expanduser()
    if not src_path.is_dir():
        raise FileNotFoundError(f"{src}: no such adapter directory")
    src_path = src_path.resolve()
    if is_cache_entry(src_path):
        return Prepared(str(src_path), str(src_path), src_path.parent.name, None, False)

    from nora_serve.converters import convert_adapter, detect_format

    fmt = detect_format(src_path)
    h = hashlib.sha256()
    h.update(f"v={_package_version()}|rank={max_rank}|base={base_identity(base)}|".encode())
    h.update(content_digest(src_path).encode())
    key = h.hexdigest()[:32]

    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / MARKER).is_file():
        return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, False)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
    try:
        report = convert_adapter(
            str(src_path), str(tmp / ADAPTER_SUBDIR), base=str(base) if base else None,
            fmt=fmt, max_rank=max_rank, progress=False,
        )
        meta = {"source": str(src_path), "format": fmt, "key": key, "max_rank": max_rank,
                "base": str(base) if base else None, "report": _jsonable(report)}
        shared = _write_shared_basis(src_path, tmp, cache_dir)
        if shared:
            meta["shared_basis"] = shared
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, True)


def _write_shared_basis(src: Path, entry: Path, cache_dir: Path) -> dict | None:
    """For a native NoRA / IntTune adapter: its cores into the entry and its basis into the
    shared ``bases/`` directory (once per distinct basis). The folded ``adapter/`` stays too, for
    servers that keep these adapters as plain LoRA."""
    from nora_serve.converters.shared_basis import shared_basis_method, split_shared_basis

    if shared_basis_method(src) is None:
        return None
    from safetensors.torch import save_file

    split = split_shared_basis(src)
    save_file(split.cores, str(entry / CORES_NAME))
    bases = cache_dir / BASES_SUBDIR
    bases.mkdir(parents=True, exist_ok=True)
    final = bases / f"{split.key}.safetensors"
    if not final.is_file():
        fd, tmp = tempfile.mkstemp(prefix=f".{split.key}.tmp-", dir=bases)
        os.close(fd)
        try:
            save_file(split.basis, tmp)
            os.replace(tmp, final)  # identical content whoever wins
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {"key": split.key, "rank": split.rank, "method": split.method,
            "modules": len(split.cores)}


@dataclass(frozen=True)
class SharedBasisEntry:
    key: str
    rank: int
    method: str
    cores: Path
    basis: Path


def shared_basis_entry(path: str | Path) -> SharedBasisEntry | None:
    """The shared-basis parts of a cache entry (``.../<key>/adapter``), or ``None`` when the
    entry is a plain LoRA only."""
    p = Path(path)
    if not is_cache_entry(p):
        return None
    try:
        info = json.loads((p.parent / MARKER).read_text()).get("shared_basis")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    entry = SharedBasisEntry(str(info["key"]), int(info["rank"]), str(info["method"]),
                             p.parent / CORES_NAME, p.parent.parent / BASES_SUBDIR / f"{info['key']}.safetensors")
    return entry if entry.cores.is_file() and entry.basis.is_file() else None


def _jsonable(obj):
    try:
        from dataclasses import asdict, is_dataclass

        if is_dataclass(obj):
            d = asdict(obj)
        else:
            d = dict(vars(obj))
    except Exception:
        return str(obj)
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
