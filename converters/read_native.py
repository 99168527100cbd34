"""This project's native format (:mod:`.native`): detection and reader."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import native
from .adapter_deltas import AdapterDeltas, ModuleEntry
from .errors import AdapterError
from .method_entries import _dyrank_entry, _lora_entry, _nora_entry, _three_entry
from .reader_common import _check_alpha, _check_modules_complete, _check_tensors, _dtype_of, _num, _require
from .tensors_io import load_safetensors, read_json


def _is_native_config(cfg: dict) -> bool:
    """``adapter_config.json`` of the native format (checked before PEFT's ``peft_type``)."""
    return cfg.get("format") == native.FORMAT


def _read_native(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / native.CONFIG_NAME
    cfg = read_json(cfg_path)
    method = cfg.get("method")
    if method not in native.METHOD_TENSORS:
        raise AdapterError(f"unknown method {method!r} (known: {', '.join(native.METHODS)})", file=cfg_path)
    for key in ("r", "lora_alpha") + (("inner_r",) if method == "nora" else ()):
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
    names = native.METHOD_TENSORS[method]
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
        _check_tensors(t, wfile, module, disk, vectors=("lora_c",))

        def need(cond, tensor, msg):
            _require(cond, f"shape mismatch: {msg}", wfile, module, f"{module}.{tensor}")

        if method == "nora":
            oA, oB, iA, iB = t["outer_A"], t["outer_B"], t["inner_A"], t["inner_B"]
            r = oA.shape[0]
            need(oB.shape[1] == r, "outer_B", f"outer_B {tuple(oB.shape)} vs outer_A {tuple(oA.shape)}")
            need(iB.shape[0] == r, "inner_B", f"inner_B {tuple(iB.shape)} vs outer rank {r}")
            need(iA.shape == (iB.shape[1], r), "inner_A", f"inner_A {tuple(iA.shape)} vs inner_B {tuple(iB.shape)}")
            entries[module] = _nora_entry(oA, oB, iA, iB, scale)
        else:
            A, B = t["lora_A"], t["lora_B"]
            r = A.shape[0]
            need(B.shape[1] == r, "lora_B", f"lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}")
            if method == "lora":
                entries[module] = _lora_entry(A, B, scale)
            elif method == "dyrank":
                c = t["lora_c"]
                need(c.shape == (r,), "lora_c", f"lora_c {tuple(c.shape)} vs rank {r}")
                entries[module] = _dyrank_entry(A, c, B, scale)
            else:
                N = t["lora_N"]
                need(N.shape == (r, r), "lora_N", f"lora_N {tuple(N.shape)} vs rank {r}")
                entries[module] = _three_entry(A, N, B, scale)
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
