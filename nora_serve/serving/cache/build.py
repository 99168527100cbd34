"""Building cache entries: :func:`prepare_adapter` turns any supported adapter directory into a
stock PEFT LoRA vLLM can load (plus, for shared-basis adapters, their cores on a shared basis;
for served-not-folded methods, their output scales), converting on a miss.

An entry is built in a private temporary directory and renamed into place in one step: readers
only ever see complete entries, and when several processes (the API server and tensor-parallel
workers) convert the same adapter at once, the first rename wins and the others discard their
copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import metrics
from ..log import logger
from .bound import reading, touch
from .faults import disk_fault, unavailable
from .keys import (ADAPTER_SUBDIR, BASES_SUBDIR, CORES_NAME, MARKER, OUTPUT_SCALE_NAME, cache_key, entry_form,
                   file_digest)
from .temporaries import discard, tmp_tag
from .trust import entry_digest, read_marker, trusted_entry


@dataclass(frozen=True)
class Prepared:
    path: str  # what vLLM loads
    source: str  # what the user gave
    key: str
    fmt: str | None  # detected source format; None when the source was already a cache entry
    converted_now: bool


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
        source = (read_marker(entry) or {}).get("source") if folded else None
        if not (folded and not (entry / ADAPTER_SUBDIR).is_dir() and isinstance(source, str)):
            touch(entry)
            metrics.cache_hit()
            return Prepared(str(entry / ADAPTER_SUBDIR), str(src_path), entry.name, None, False)
        src_path = Path(source)  # a cores-only entry, asked for folded: from its source
    if not src_path.is_dir():  # checked here, not before: a cores-only entry has no adapter/
        raise FileNotFoundError(f"{src_path}: no such adapter directory")
    src_path = src_path.resolve()

    from nora_serve.converters import convert_adapter, detect_format, read_adapter
    from nora_serve.methods import get_method

    fmt = detect_format(src_path)
    form = entry_form(src_path, folded)
    key = cache_key(src_path, base=base, max_rank=max_rank, form=form)

    final = cache_dir / key
    if (final / MARKER).is_file():
        if trusted_entry(final / ADAPTER_SUBDIR, cache_dir) is not None:
            touch(final)
            metrics.cache_hit()
            return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, False)
        logger.warning("nora: cache entry %s does not match its recorded digest; converting again", final)
        discard(final)

    # Read and check the adapter before the cache is touched: its faults are its own.
    deltas = read_adapter(src_path, base=base, fmt=fmt)  # read once, for either way below
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{tmp_tag()}-", dir=cache_dir))
    except OSError as e:
        raise unavailable(e, cache_dir) from None
    try:
        split = None
        if form == "cores":
            from nora_serve.converters.shared_basis import split_shared_basis

            split = split_shared_basis(src_path, deltas=deltas)
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
        if isinstance(e, Exception) and disk_fault(e, cache_dir):
            raise unavailable(e, cache_dir) from None
        raise
    metrics.converted(fmt)
    return Prepared(str(final / ADAPTER_SUBDIR), str(src_path), key, fmt, True)


def _write_output_scaled(d, entry: Path, base) -> dict:
    """A method served but never folded (PEFT's DoRA; ``d`` as read): its serving form, a stock
    PEFT LoRA ``B' A`` in ``adapter/`` plus each module's output scale ``v`` in
    ``output_scale.safetensors`` (``vllm_plugin/output_scale.py``), computed here once from the
    base weights."""
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
    from nora_serve.converters.formats import names_base

    if base is not None or not served_model or names_base(fmt):
        return None
    return served_model


def _write_shared_basis(split, entry: Path, cache_dir: Path) -> dict:
    """A shared-basis adapter (``split``: :func:`~nora_serve.converters.shared_basis.split_shared_basis`):
    its cores into the entry and its basis into the shared ``bases/`` directory, once per
    distinct basis (a basis file of the store is linked, not written again)."""
    from safetensors.torch import save_file

    from .cores_file import write_cores

    write_cores(entry / CORES_NAME, split.cores)
    bases = cache_dir / BASES_SUBDIR
    bases.mkdir(parents=True, exist_ok=True)
    final = bases / f"{split.key}.safetensors"
    if not final.is_file():
        fd, tmp = tempfile.mkstemp(prefix=f".{split.key}.tmp-{tmp_tag()}-", dir=bases)
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
            "modules": len(split.cores), "basis_digest": file_digest(final)}


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
