"""Convert-on-load cache: any supported adapter directory -> a stock PEFT LoRA vLLM can load.

Entries are keyed by content (every file of the adapter, the base model's identity, the
rank limit and the package version), so a changed adapter is converted again and an
unchanged one never is. An entry is built in a private temporary directory and renamed into
place in one step: readers only ever see complete entries, and when several processes (the
API server and tensor-parallel workers) convert the same adapter at once, the first rename
wins and the others discard their copy.

Trust: an entry is used as it is only where this cache wrote it (:func:`trusted_entry`: its
real path is ``<cache_dir>/<key>/adapter``, and the digest of its files equals the one its
marker recorded); a ``nora-cache.json`` beside any other directory means nothing. Bound:
:func:`enforce_limit` removes least recently used entries no loaded adapter uses, deciding what
is in use under the same lock (``flock`` on the cache directory itself, exclusive) that every conversion and load
holds shared while it works (:func:`reading`); :func:`clean_stale_temporaries` removes what
killed conversions left. Faults of the cache itself (a read-only or full disk) raise
:class:`CacheUnavailable`, never an adapter error. No vLLM import here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import metrics

MARKER = "nora-cache.json"
ADAPTER_SUBDIR = "adapter"
OUTPUT_SCALE_NAME = "output_scale.safetensors"  # served-not-folded methods (DoRA), beside adapter/
CORES_NAME = "cores.safetensors"  # shared-basis adapters: their own R x R cores, beside adapter/
BASES_SUBDIR = "bases"  # one file per distinct shared basis, named by its content key
_HEAD = 1 << 20  # bytes of each base weight file that go into the base identity


class CacheUnavailable(RuntimeError):
    """The cache directory cannot be written (read-only, full, gone): a fault of the server, not
    of the adapter. ``reason``: the cause alone (``No space left on device``), without paths."""

    def __init__(self, cache_dir, reason: str):
        super().__init__(f"the adapter cache {cache_dir} cannot be written: {reason}")
        self.reason = reason


# errno values that say the disk, not the adapter, is at fault.
_DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
# The same faults as Rust's safetensors words them (it raises its own error type, not OSError).
_DISK_WORDS = ("StorageFull", "ReadOnlyFilesystem", "No space left", "Read-only file system",
               "os error 28", "os error 30", "Disk quota")


def _disk_fault(e: BaseException, cache_dir: Path) -> bool:
    if isinstance(e, OSError):
        if e.errno in _DISK_ERRNOS:
            return True
        name = getattr(e, "filename", None)
        return isinstance(name, str) and _inside(name, cache_dir)
    return any(w in str(e) for w in _DISK_WORDS)


def _inside(path: str, root: str | Path) -> bool:
    """``path`` is ``root`` or below it (as strings: no resolving)."""
    root_s = str(Path(root).expanduser())
    return path == root_s or path.startswith(root_s.rstrip(os.sep) + os.sep)


def _unavailable(e: BaseException, cache_dir: Path) -> CacheUnavailable:
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        text = str(e)
        code = next((c for c, words in ((errno.ENOSPC, ("StorageFull", "os error 28", "code: 28")),
                                        (errno.EROFS, ("ReadOnlyFilesystem", "os error 30", "code: 30")))
                     if any(w in text for w in words)), None)
        reason = os.strerror(code) if code else text.splitlines()[0][:200]
    return CacheUnavailable(cache_dir, reason)


def check_writable(cache_dir: str | Path) -> None:
    """Raise :class:`CacheUnavailable` (one line) unless a file can be created in ``cache_dir``."""
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe.tmp-{_tmp_tag()}-", dir=cache_dir)
        try:
            os.write(fd, b"nora")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise _unavailable(e, cache_dir) from None


@contextlib.contextmanager
def reading(cache_dir: str | Path):
    """Hold the cache's lock shared: no entry is removed by :func:`enforce_limit` (which takes it
    exclusively) while a conversion or a load that reads entries runs. Without a writable
    cache directory this holds nothing (there is then nothing to evict either)."""
    with _dir_lock(cache_dir, shared=True):
        yield


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


@dataclass(frozen=True)
class Prepared:
    path: str  # what vLLM loads
    source: str  # what the user gave
    key: str
    fmt: str | None  # detected source format; None when the source was already a cache entry
    converted_now: bool


@functools.cache
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


def content_digest(src: Path, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over every (relative path, file digest) below ``src``, hidden files and the
    top-level names in ``exclude`` excluded."""
    h = hashlib.sha256()
    src = Path(src)
    files = sorted(
        p for p in src.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
        and p.relative_to(src).parts[0] not in exclude
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


# -- which entries are trusted ----------------------------------------------------------------
_KEY = re.compile(r"^[0-9a-f]{32}$")


def entry_digest(entry: Path) -> str:
    """sha256 over the entry's own files (``adapter/``, the cores), marker and hidden files
    excluded: recorded in the marker when the entry is written, recomputed before it is used."""
    return content_digest(entry, exclude=(MARKER,))


def read_marker(entry: Path) -> dict | None:
    try:
        meta = json.loads((Path(entry) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def trusted_entry(path: str | Path, cache_dir: str | Path) -> Path | None:
    """The cache entry directory if ``path`` is the ``adapter/`` of an entry this cache wrote:
    its real location is ``<cache_dir>/<key>/adapter``, its marker names that key, and the
    digest of its files equals the one recorded when it was written. Anything else (a
    directory elsewhere with a ``nora-cache.json`` beside it, an entry changed on disk) is
    not trusted and goes through the full conversion and its checks."""
    try:
        p = Path(path)
        entry = p.parent.resolve(strict=True)  # adapter/ itself is absent in a cores-only entry
        root = Path(cache_dir).expanduser().resolve()
        if p.exists() and p.resolve(strict=True) != entry / ADAPTER_SUBDIR:
            return None  # adapter/ leads elsewhere
    except (OSError, RuntimeError):
        return None
    if p.name != ADAPTER_SUBDIR or entry.parent != root or not _KEY.match(entry.name):
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


def _touch(entry: Path) -> None:
    """Record a use (the marker's mtime is the entry's last use, for eviction)."""
    with contextlib.suppress(OSError):
        os.utime(entry / MARKER)


def _discard(path: Path) -> None:
    """Remove a directory so that readers see it either whole or gone: renamed away first."""
    trash = path.with_name(f".{path.name}.trash-{_tmp_tag()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _tmp_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
    return f"{host}-{os.getpid()}"


def cache_key(src: Path, *, base, max_rank, form: str = "lora") -> str:
    h = hashlib.sha256()
    h.update(f"v={_package_version()}|rank={max_rank}|base={base_identity(base)}|form={form}|".encode())
    h.update(content_digest(src).encode())
    return h.hexdigest()[:32]


def _form(src: Path, folded: bool) -> str:
    """``cores``: a native shared-basis adapter, kept as its cores on its basis (folded into a
    LoRA only if a worker must put it in a dense slot: ``folded=True``); ``lora`` otherwise."""
    from nora_serve.converters.shared_basis import shared_basis_method

    return "cores" if not folded and shared_basis_method(src) is not None else "lora"


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
                                                         form=_form(src_path, folded))
    except (OSError, RuntimeError):
        return None
    return trusted_entry(final / ADAPTER_SUBDIR, cache_dir)


def prepare_adapter(
    src: str | Path,
    *,
    base: str | Path | None,
    max_rank: int | None,
    cache_dir: str | Path,
    served_model: str | None = None,
    pin=None,
    folded: bool = False,
) -> Prepared:
    """Return a stock PEFT LoRA directory equivalent to ``src``, converting on a cache miss.

    Raises ``FileNotFoundError`` for a missing directory and the converters' ``AdapterError``
    (a ``ValueError`` naming file, module and tensor) for anything wrong with the adapter,
    including a base-model fingerprint mismatch. Only entries this cache wrote are used as
    they are (:func:`trusted_entry`); every other directory is read and checked in full.
    ``served_model``: the served model's name, the entry's base identity where the source names
    none and no ``base`` was checked. ``pin(key)``: called with the entry's key while the cache
    lock is still held, so that the caller can count the entry in use before any eviction can
    see it. A cache that cannot be written raises :class:`CacheUnavailable`.

    A native shared-basis adapter's entry holds only its cores (its basis is shared, in
    ``bases/``): ``Prepared.path`` then names an ``adapter/`` that does not exist, and
    ``folded=True`` asks for the folded PEFT LoRA instead (an entry of its own), for a worker
    that must put it in a dense slot.
    """
    src_path = Path(src).expanduser()
    cache_dir = Path(cache_dir).expanduser()
    with reading(cache_dir):
        prepared = _prepare_locked(src_path, base, max_rank, cache_dir, served_model, folded)
        if pin is not None:
            pin(prepared.key)
    return prepared


def _prepare_locked(src_path: Path, base, max_rank, cache_dir: Path, served_model, folded) -> Prepared:
    entry = trusted_entry(src_path, cache_dir)
    if entry is not None:
        source = (read_marker(entry) or {}).get("source")
        if not (folded and not (entry / ADAPTER_SUBDIR).is_dir() and isinstance(source, str)):
            _touch(entry)
            metrics.cache_hit()
            return Prepared(str(entry / ADAPTER_SUBDIR), str(src_path), entry.name, None, False)
        src_path = Path(source)  # a cores-only entry, asked for folded: from its source
    if not src_path.is_dir():  # checked here, not before: a cores-only entry has no adapter/
        raise FileNotFoundError(f"{src_path}: no such adapter directory")
    src_path = src_path.resolve()

    from nora_serve.converters import convert_adapter, detect_format, read_adapter
    from nora_serve.methods import get_method

    fmt = detect_format(src_path)
    form = _form(src_path, folded)
    key = cache_key(src_path, base=base, max_rank=max_rank, form=form)

    final = cache_dir / key
    if (final / MARKER).is_file():
        if trusted_entry(final / ADAPTER_SUBDIR, cache_dir) is not None:
            _touch(final)
            metrics.cache_hit()
            return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, False)
        _log().warning("nora: cache entry %s does not match its recorded digest; converting again", final)
        _discard(final)

    # Read and check the adapter before the cache is touched: its faults are its own.
    deltas = read_adapter(src_path, base=base, fmt=fmt)  # read once, for either way below
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{_tmp_tag()}-", dir=cache_dir))
    except OSError as e:
        raise _unavailable(e, cache_dir) from None
    try:
        split = None
        if form == "cores":
            from nora_serve.converters.shared_basis import split_shared_basis

            split = split_shared_basis(src_path)
        if split is not None and (max_rank is None or split.rank <= max_rank):
            # Served from its cores: its fold (rank <= the basis rank) is made only if a worker
            # needs it in a dense slot.
            report = {"method": split.method, "modules": len(split.cores), "served_as": "cores"}
        elif get_method(deltas.method).foldable:
            report = convert_adapter(
                str(src_path), str(tmp / ADAPTER_SUBDIR), base=str(base) if base else None,
                fmt=fmt, max_rank=max_rank, progress=False,
                base_model_name_or_path=_fallback_identity(src_path, fmt, base, served_model),
                deltas=deltas,
            )
        else:
            report = _write_output_scaled(deltas, tmp, base)
        meta = {"source": str(src_path), "format": fmt, "key": key, "max_rank": max_rank,
                "base": str(base) if base else None, "report": _jsonable(report)}
        if split is not None:
            meta["shared_basis"] = _write_shared_basis(split, tmp, cache_dir)
        meta["digest"] = entry_digest(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if trusted_entry(final / ADAPTER_SUBDIR, cache_dir) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, False)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _disk_fault(e, cache_dir):
            raise _unavailable(e, cache_dir) from None
        raise
    metrics.converted(fmt)
    return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, True)


def _write_output_scaled(d, entry: Path, base) -> dict:
    """A method served but never folded (PEFT's DoRA; ``d`` as read): its serving form, a stock
    PEFT LoRA ``B' A`` in ``adapter/`` plus each module's output scale ``v`` in
    ``output_scale.safetensors`` (``output_scale.py``), computed here once from the base weights."""
    import torch
    from safetensors.torch import save_file

    from nora_serve.converters.errors import AdapterError
    from nora_serve.converters.fingerprint import load_base_weights
    from nora_serve.converters.peft_writer import write_peft_weights
    from nora_serve.methods import get_method

    spec = get_method(d.method)
    if spec.serving_form is None:
        raise AdapterError(f"method {spec.name}: cannot be folded into LoRA nor served", file=d.path)
    if base is None:
        raise AdapterError(f"method {spec.name} needs the base weights to be served: serve a local model "
                           "directory (with the base check on)", file=d.path)
    weights = load_base_weights(base, d.entries)
    factors, scales = {}, {}
    for m, e in sorted(d.entries.items()):
        W = weights[m].to(torch.float64)
        A, B, v = spec.serving_form({k: t.to(torch.float64) for k, t in e.raw.items()}, e.scale, W)
        factors[m] = (B.to(d.dtype), A.to(d.dtype))
        scales[m] = v.to(torch.float32)
    out = entry / ADAPTER_SUBDIR
    out.mkdir()
    write_peft_weights(out, factors, base_model_name_or_path=d.base_model_name_or_path)
    save_file(scales, str(entry / OUTPUT_SCALE_NAME))
    return {"method": spec.name, "modules": len(scales), "served_as": "LoRA plus per-row output scale"}


def _fallback_identity(src: Path, fmt: str, base, served_model: str | None) -> str | None:
    """The served model as the entry's identity, only for a source that names no base of its
    own (a dynamic-rank DoRA checkpoint) converted without a base to check against."""
    if base is not None or not served_model or fmt != "dora_dyrank":
        return None
    return served_model


def output_scales(adapter_dir: str | Path) -> dict | None:
    """The per-module output scales of a cache entry's adapter (``None``: a plain LoRA)."""
    f = Path(adapter_dir).parent / OUTPUT_SCALE_NAME
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(f))


def _write_shared_basis(split, entry: Path, cache_dir: Path) -> dict:
    """A shared-basis adapter (``split``: :func:`~nora_serve.converters.shared_basis.split_shared_basis`):
    its cores into the entry and its basis into the shared ``bases/`` directory, once per
    distinct basis (a basis file of the store is linked, not written again)."""
    from safetensors.torch import save_file

    save_file(split.cores, str(entry / CORES_NAME))
    bases = cache_dir / BASES_SUBDIR
    bases.mkdir(parents=True, exist_ok=True)
    final = bases / f"{split.key}.safetensors"
    if not final.is_file():
        fd, tmp = tempfile.mkstemp(prefix=f".{split.key}.tmp-{_tmp_tag()}-", dir=bases)
        os.close(fd)
        try:
            source = getattr(split, "basis_path", None)
            if source is not None:
                os.unlink(tmp)
                try:
                    os.link(source, tmp)  # the store's file, checked against its digest
                except OSError:
                    shutil.copyfile(source, tmp)
            else:
                save_file(split.basis, tmp)
            os.replace(tmp, final)  # identical content whoever wins
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {"key": split.key, "rank": split.rank, "method": split.method,
            "modules": len(split.cores), "basis_digest": _file_digest(final)}


@dataclass(frozen=True)
class SharedBasisEntry:
    key: str
    rank: int
    method: str
    cores: Path
    basis: Path


def shared_basis_entry(path: str | Path, cache_dir: str | Path) -> SharedBasisEntry | None:
    """The shared-basis parts of a trusted cache entry (``<cache_dir>/<key>/adapter``), or
    ``None`` when the entry is a plain LoRA only (or not one this cache wrote)."""
    entry = trusted_entry(path, cache_dir)
    if entry is None:
        return None
    info = (read_marker(entry) or {}).get("shared_basis")
    if not isinstance(info, dict) or not _KEY.match(str(info.get("key", ""))):
        return None
    try:
        found = SharedBasisEntry(str(info["key"]), int(info["rank"]), str(info["method"]),
                                 entry / CORES_NAME, entry.parent / BASES_SUBDIR / f"{info['key']}.safetensors")
    except (KeyError, TypeError, ValueError):
        return None
    if not (found.cores.is_file() and found.basis.is_file()):
        return None
    if info.get("basis_digest") != _file_digest(found.basis):
        return None
    return found


# -- housekeeping: stale temporaries, the size bound ------------------------------------------
_TMP = re.compile(r"^\.(?P<key>[0-9a-f]{32}|[^.]+)\.(?:tmp|trash)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")
STALE_AFTER_S = 6 * 3600  # a temporary of a live process older than this is removed too


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_temporaries(cache_dir: str | Path) -> list[str]:
    """Remove the temporaries of conversions that can no longer finish (their process is gone,
    e.g. after a kill -9, or they are hours old). Returns the names removed."""
    removed = []
    host = _tmp_tag().rsplit("-", 1)[0]
    now = time.time()
    for folder in (Path(cache_dir), Path(cache_dir) / BASES_SUBDIR):
        try:
            names = [p for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".trash-" in p.name)]
        except OSError:
            continue
        for p in names:
            m = _TMP.match(p.name)
            try:
                age = now - p.lstat().st_mtime
            except OSError:
                continue
            # Called at start: a temporary named after this very process is a previous one's
            # whose pid was reused.
            dead = m is not None and m.group("host") == host and (
                int(m.group("pid")) == os.getpid() or not _pid_alive(int(m.group("pid"))))
            if dead or age > STALE_AFTER_S or (m is None and age > 3600):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p.name)
    return removed


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
            if not _KEY.match(p.name) or not p.is_dir():
                continue
            try:
                used = (p / MARKER).stat().st_mtime
            except OSError:
                used = 0.0
            info = (read_marker(p) or {}).get("shared_basis")
            entries[p.name] = (used, _tree_bytes(p), info.get("key") if isinstance(info, dict) else None)
    with contextlib.suppress(OSError):
        for f in (cache_dir / BASES_SUBDIR).iterdir():
            if f.suffix == ".safetensors" and _KEY.match(f.stem):
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
            _discard(cache_dir / key)
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
        _log().info("nora: cache over %.2f GB: removed %d least recently used entries (%.2f GB left)",
                    max_bytes / 1e9, len(removed), total / 1e9)
    return removed


def _log():
    return logging.getLogger("vllm.nora")


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
