"""A shared basis as one file, named by its content digest.

The frozen outer factors of a shared-basis method (NoRA's and LoRA-XS's SVD pair, IntTune's
Nyström slices) are a function of the base weights and a few settings, the same for every
adapter trained with them; a format_version 2 adapter stores only its own tensors and names its
basis by digest (``shared_basis.digest`` in its config).

File ``<digest>.safetensors``:

* tensors ``<module>.A`` ``[R, d_in]`` and ``<module>.B`` ``[d_out, R]`` (the method's ``shared``
  pair, in that order);
* ``digest`` = :func:`basis_key` of the tensors (names, shapes, dtypes, bytes; 32 hex);
* string metadata: ``format`` (``nora-serve-basis``), ``format_version`` (1), ``method``,
  ``rule``, ``r``, ``calibration`` (JSON or ``null``), ``base_model_name_or_path``,
  ``base_fingerprints`` (JSON ``{module: fingerprint}``) and ``recipe`` (:func:`recipe_key`).

Where a basis is looked for (:func:`find_basis`): an explicit file or directory, the adapter
store's ``bases/`` folder (``<adapter>/../bases/``), then the user's basis cache
(``$NORA_BASIS_CACHE``, default ``~/.cache/nora-serve/bases``), which also keeps an index
``recipes/<recipe>.json`` -> digest so that a trainer finds a basis without computing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path

import torch

from .errors import AdapterError

FORMAT = "nora-serve-basis"
FORMAT_VERSION = 1
BASES_DIR = "bases"  # in an adapter store: <store>/bases/<digest>.safetensors
RECIPES_DIR = "recipes"  # in the basis cache: recipes/<recipe>.json -> {"digest": ...}
CACHE_ENV = "NORA_BASIS_CACHE"
# Part of every recipe: bump it when a method's basis computation changes, so that a trainer
# never reuses a basis an older algorithm made for the same settings.
RECIPE_VERSION = 1
DIGEST = re.compile(r"^[0-9a-f]{32}$")
META_KEYS = ("method", "rule", "r", "calibration", "base_model_name_or_path", "base_fingerprints",
             "recipe")


def basis_key(basis: dict[str, torch.Tensor]) -> str:
    """The digest of a basis: sha256 over every tensor's name, shape, dtype and bytes (32 hex)."""
    h = hashlib.sha256()
    for name in sorted(basis):
        t = basis[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def recipe_key(method: str, rule: str, r: int, calibration: dict | None,
               base_fingerprints: dict[str, str]) -> str:
    """What a basis is a function of: the method, its shared rule and rank, the calibration
    settings, and the targeted modules with their base weights' fingerprints (32 hex)."""
    doc = {"recipe_version": RECIPE_VERSION, "method": method, "rule": rule, "r": int(r),
           "calibration": calibration, "modules": dict(sorted(base_fingerprints.items()))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def basis_meta(config: dict) -> dict:
    """The basis file's metadata for a native adapter config (its ``shared_basis`` and base)."""
    sb = config.get("shared_basis") or {}
    known = config.get("base_fingerprints") or {}
    fps = {m: known[m] for m in config["target_modules"] if m in known}
    meta = {"method": config["method"], "rule": sb.get("rule"), "r": int(sb.get("r", config["r"])),
            "calibration": sb.get("calibration"),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "base_fingerprints": fps}
    meta["recipe"] = recipe_key(meta["method"], meta["rule"], meta["r"], meta["calibration"], fps)
    return meta


def cache_dir() -> Path:
    """The user basis cache: ``$NORA_BASIS_CACHE``, else ``~/.cache/nora-serve/bases``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nora-serve" / BASES_DIR


def store_bases(adapter_dir: str | os.PathLike) -> Path:
    """The ``bases/`` folder of the store an adapter directory sits in."""
    return Path(adapter_dir).absolute().parent / BASES_DIR


def _umask_mode(mode: int) -> int:
    from .atomic import _umask

    return mode & ~_umask(Path("."))


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: never a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode(0o666))  # 0644 under umask 022, as save_pretrained's files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _encode(meta: dict) -> dict[str, str]:
    out = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
    for k in META_KEYS:
        v = meta.get(k)
        out[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    out["r"] = str(int(meta["r"]))
    out["base_model_name_or_path"] = meta.get("base_model_name_or_path") or ""  # "": none named
    return out


def _decode(raw: dict[str, str] | None, path: Path) -> dict:
    raw = raw or {}
    if raw.get("format") != FORMAT:
        raise AdapterError(f"not a nora-serve basis file (metadata 'format' is {raw.get('format')!r})",
                           file=path)
    meta: dict = {k: raw.get(k) for k in META_KEYS}
    meta["base_model_name_or_path"] = meta["base_model_name_or_path"] or None
    try:
        meta["r"] = int(raw["r"])
        meta["format_version"] = int(raw["format_version"])
        for k in ("calibration", "base_fingerprints"):
            meta[k] = json.loads(raw[k])
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterError(f"malformed basis metadata: {e}", file=path) from None
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterError(f"basis format_version {meta['format_version']} is not supported "
                           f"(this version reads {FORMAT_VERSION})", file=path)
    if not isinstance(meta["base_fingerprints"], dict):
        raise AdapterError("malformed basis metadata: base_fingerprints must be an object", file=path)
    return meta


def write_basis(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``<directory>/<digest>.safetensors`` atomically (mode 0644 under umask 022) and
    return its path; a file already there is the same basis (same digest) and is kept."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path = Path(directory) / f"{basis_key(flat)}.safetensors"
    if not path.is_file():
        _atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=_encode(meta)))
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """A basis file's metadata (decoded: ``r`` an int, ``calibration`` and
    ``base_fingerprints`` parsed), from its header only."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata()
    except Exception as e:  # safetensors raises its own types
        raise AdapterError(f"not a readable safetensors file: {' '.join(str(e).split())[:300]}",
                           file=path) from None
    return _decode(raw, path)


def read_basis(path: str | os.PathLike, expect_digest: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a basis file (meta as :func:`read_meta`, plus ``digest``). The
    digest is recomputed from the tensors and must equal ``expect_digest`` (default: the file
    name, where that is a digest); a mismatch is an :class:`AdapterError` naming the file."""
    from .tensors_io import load_safetensors

    path = Path(path)
    want = expect_digest if expect_digest is not None else (
        path.name.removesuffix(".safetensors") if DIGEST.match(path.name.removesuffix(".safetensors")) else None)
    # Read and checked once per file version, not once per adapter that names it (a server
    # loading thousands of adapters of one base).
    try:
        st = path.stat()  # the file itself (a link followed): no path resolved per adapter
        memo_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        memo_key = None
    hit = _read_memo.get(memo_key) if memo_key else None
    if hit is None:
        meta = read_meta(path)
        tensors = load_safetensors(path)
        meta["digest"] = basis_key(tensors)
        hit = (tensors, meta)
        if memo_key:
            _read_memo[memo_key] = hit
            while len(_read_memo) > _READ_MEMO_SIZE:
                _read_memo.pop(next(iter(_read_memo)))
    tensors, meta = hit
    if want is not None and meta["digest"] != want:
        raise AdapterError(f"basis digest mismatch: expected {want}, its content is {meta['digest']} "
                           "(the file was changed or is another basis)", file=path)
    return dict(tensors), dict(meta)


_READ_MEMO_SIZE = 2  # bases kept read (a server rarely serves more than a few at once)
_read_memo: dict[tuple, tuple[dict, dict]] = {}


def find_basis(digest: str, adapter_dir: str | os.PathLike,
               explicit: str | os.PathLike | None = None) -> Path:
    """The path of basis ``digest`` for the adapter at ``adapter_dir``. Looks, in order, at
    ``explicit`` (a file, or a directory holding ``<digest>.safetensors``), the store's
    ``<adapter_dir>/../bases/<digest>.safetensors``, then the user basis cache
    (:func:`cache_dir`). Not found: an :class:`AdapterError` naming the adapter, the digest and
    where it looked. The digest itself is checked when the file is read (:func:`read_basis`)."""
    name = f"{digest}.safetensors"
    places: list[Path] = []
    if explicit is not None:
        e = Path(explicit)
        if e.is_file():
            return e
        places.append(e / name if e.is_dir() else e)
    places += [store_bases(adapter_dir) / name, cache_dir() / name]
    for p in places:
        if p.is_file():
            return p
    raise AdapterError(f"shared basis {digest} not found (looked in: {', '.join(map(str, places))}); "
                       "pass --basis FILE_OR_DIR, or export a self-contained adapter with "
                       "nora-convert --export-native where its basis is", file=adapter_dir)


def find_by_recipe(recipe: str, dirs: list[Path]) -> Path | None:
    """A basis file made by ``recipe``: through the cache's index, else by the ``recipe`` in the
    headers of the basis files in ``dirs`` (the store's ``bases/``, the cache)."""
    index = cache_dir() / RECIPES_DIR / f"{recipe}.json"
    try:
        digest = json.loads(index.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        digest = None
    if isinstance(digest, str) and DIGEST.match(digest):
        for d in dirs:
            if (d / f"{digest}.safetensors").is_file():
                return d / f"{digest}.safetensors"
    for d in dirs:
        for p in sorted(d.glob("*.safetensors")) if d.is_dir() else ():
            try:
                if read_meta(p).get("recipe") == recipe:
                    return p
            except AdapterError:
                continue  # not a basis, or unreadable: not this one
    return None


def remember_recipe(recipe: str, digest: str) -> None:
    """Record ``recipe -> digest`` in the cache's index (atomically)."""
    index = cache_dir() / RECIPES_DIR / f"{recipe}.json"
    _atomic_write(index, lambda tmp: tmp.write_text(json.dumps({"digest": digest}) + "\n"))
