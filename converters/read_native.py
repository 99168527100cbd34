"""This project's native format (:mod:`.native`): detection and reader."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nora_serve.methods import get_method, is_method, method_names

from . import native
from .adapter_deltas import AdapterDeltas, ModuleEntry
from .errors import AdapterError
from .method_entries import method_entry
from .reader_common import _check_alpha, _check_modules_complete, _check_tensors, _dtype_of, _num, _require
from .tensors_io import load_safetensors, read_json


def _is_native_config(cfg: dict) -> bool:
    """``adapter_config.json`` of the native format (checked before PEFT's ``peft_type``)."""
    return cfg.get("format") == native.FORMAT


def _read_native(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / native.CONFIG_NAME
    cfg = read_json(cfg_path)
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
    wfile = path / native.WEIGHTS_NAME
    tensors = load_safetensors(wfile)
    names = spec.tensors
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
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        _check_tensors(t, wfile, module, disk, vectors=spec.vectors)
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
                         dtype=_dtype_of(tensors), config=cfg)
