"""This project's native format (:mod:`.native`): detection and reader (format_version 1, and 2
with its shared basis from the basis file its digest names)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nora_serve.methods import get_method, is_method, method_names

from . import native
from .adapter_deltas import AdapterDeltas, ModuleEntry
from .basis_file import DIGEST, find_basis, read_basis
from .errors import AdapterError
from .method_entries import method_entry
from .reader_common import _check_alpha, _check_modules_complete, _check_tensors, _dtype_of, _num, _require
from .tensors_io import all_finite, load_safetensors, read_json


def _is_native_config(cfg: dict) -> bool:
    """``adapter_config.json`` of the native format (checked before PEFT's ``peft_type``)."""
    return cfg.get("format") == native.FORMAT


def _format_version(cfg: dict, cfg_path: Path) -> int:
    v = cfg.get("format_version", native.FORMAT_VERSION)
    if isinstance(v, bool) or v not in native.FORMAT_VERSIONS:
        raise AdapterError(f"unsupported format_version {v!r} (this version reads "
                           f"{', '.join(map(str, native.FORMAT_VERSIONS))})", file=cfg_path)
    return int(v)


def basis_digest(cfg: dict, cfg_path: Path) -> str:
    """``shared_basis.digest`` of a format_version 2 config (32 hex), checked."""
    sb = cfg.get("shared_basis")
    digest = sb.get("digest") if isinstance(sb, dict) else None
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise AdapterError(f"format_version 2 needs 'shared_basis.digest' (32 hex digits), got {digest!r}",
                           file=cfg_path)
    return digest


def load_shared_basis(path: Path, cfg: dict, explicit=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """``(file, tensors)`` of the basis a format_version 2 adapter names, found by
    :func:`~.basis_file.find_basis` and checked against its digest. Every failure is one line
    naming the adapter and the digest."""
    cfg_path = path / native.CONFIG_NAME
    digest = basis_digest(cfg, cfg_path)
    where = find_basis(digest, path, explicit)  # its error names the adapter and the digest
    try:
        tensors, _ = read_basis(where, expect_digest=digest)
    except AdapterError as e:
        raise AdapterError(f"shared basis {digest}: {e}", file=path) from None
    return where, tensors


def _merge_basis(groups: dict, basis: dict[str, torch.Tensor], spec, bfile: Path) -> None:
    """Put the basis's ``<module>.A`` / ``.B`` into each module's tensors under the method's
    ``shared`` names."""
    for module, t in groups.items():
        for key, name in zip(("A", "B"), spec.shared):
            if f"{module}.{key}" not in basis:
                raise AdapterError("the shared basis has no tensor for a module the adapter targets",
                                   file=bfile, module=module, tensor=f"{module}.{key}")
            t[name] = basis[f"{module}.{key}"]


_checked_bases: dict[tuple[str, str], set[str]] = {}  # (basis file, digest) -> modules found finite


def _read_native(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / native.CONFIG_NAME
    cfg = read_json(cfg_path)
    version = _format_version(cfg, cfg_path)
    method = cfg.get("method")
    if not is_method(method) or not get_method(method).native:
        raise AdapterError(f"unknown method {method!r} (known: {', '.join(method_names(native=True))})",
                           file=cfg_path)
    spec = get_method(method)
    for key in ("r", "lora_alpha") + spec.config_keys:
        _num(cfg, key, cfg_path)
    _check_alpha(cfg, cfg_path)
    try:
        scale = native.method_scale(cfg)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        raise AdapterError(f"cannot compute the scale: {e}", file=cfg_path) from None
    if "scaling" in cfg and isinstance(cfg["scaling"], (int, float)) and not math.isclose(
            float(cfg["scaling"]), scale, rel_tol=1e-6):
        raise AdapterError(f"'scaling' {cfg['scaling']} disagrees with the {method} rule ({scale})",
                           file=cfg_path)
    if version == native.FORMAT_VERSION_CORES and not spec.shared_basis:
        raise AdapterError(f"format_version 2 is for shared-basis methods; {method} has none", file=cfg_path)
    wfile = path / native.WEIGHTS_NAME
    tensors = load_safetensors(wfile)
    cores_only = version == native.FORMAT_VERSION_CORES
    # Version 2 holds the adapter's own tensors; its basis comes from the file its digest names.
    names = tuple(n for n in spec.tensors if not (cores_only and n in spec.shared))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, name = key.rpartition(".")
        if name not in names or not module:
            raise AdapterError(f"unexpected tensor for method {method} (expected {', '.join(names)})",
                               file=wfile, tensor=key)
        groups.setdefault(module, {})[name] = t
    disk = lambda m, n: f"{m}.{n}"  # noqa: E731
    _check_modules_complete(groups, names, wfile, disk)
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        missing = sorted(set(targets) - set(groups))
        if missing:
            raise AdapterError("module listed in target_modules has no tensors", file=wfile,
                               module=missing[0], tensor=f"{missing[0]}.{names[0]}")
    finite = all_finite(tensors.values())  # one pass; per tensor only to name a culprit
    for module in sorted(groups):
        _check_tensors(groups[module], wfile, module, disk, vectors=spec.vectors, finite=finite)
    bfile = None
    if cores_only:
        bfile, basis = load_shared_basis(path, cfg, opts.get("basis"))
        _merge_basis(groups, basis, spec, bfile)
        # A basis file's content is fixed by its digest (checked by load_shared_basis): its
        # tensors are checked once per process, not once per adapter that names it.
        checked = _checked_bases.setdefault((str(bfile), basis_digest(cfg, cfg_path)), set())
        for module in sorted(set(groups) - checked):
            _check_tensors({k: basis[f"{module}.{k}"] for k in ("A", "B")}, bfile, module, disk)
            checked.add(module)
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        bad = spec.check(t)
        if bad is not None:
            _require(False, f"shape mismatch: {bad[1]}", wfile, module, f"{module}.{bad[0]}")
        entries[module] = method_entry(spec, t, scale, file=cfg_path)
    fps = cfg.get("base_fingerprints")
    if fps is not None and not isinstance(fps, dict):
        raise AdapterError("'base_fingerprints' must be an object {module: fingerprint}", file=cfg_path)
    if fps is not None:
        missing = sorted(set(entries) - set(fps))
        if missing:
            raise AdapterError("no base fingerprint recorded for a targeted module", file=cfg_path,
                               module=missing[0], tensor=f"{missing[0]}.weight")
    return AdapterDeltas(path, "native", method, entries, base_fingerprints=fps,
                         shared_basis=cfg.get("shared_basis"),
                         base_model_name_or_path=cfg.get("base_model_name_or_path"),
                         dtype=_dtype_of(tensors), config=cfg, basis_path=bfile)
