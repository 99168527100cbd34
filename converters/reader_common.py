"""Checks and helpers every format reader shares: one-line errors naming file, module and tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import AdapterError
from .tensors_io import check_finite, files_signature


def _require(cond: bool, msg: str, file: Path, module: str | None = None, tensor: str | None = None):
    if not cond:
        raise AdapterError(msg, file=file, module=module, tensor=tensor)


def _check_2d(t: torch.Tensor, file: Path, module: str, tensor: str) -> None:
    _require(t.ndim == 2, f"expected a 2-D tensor, got shape {tuple(t.shape)}", file, module, tensor)


def _check_float(t: torch.Tensor, file: Path, module: str, tensor: str, *, finite: bool = False) -> None:
    """Floating point and finite (``finite``: already known, e.g. by ``all_finite`` over its file)."""
    _require(t.is_floating_point(), f"expected floating-point weights, got {t.dtype}", file, module, tensor)
    if not finite:
        check_finite(t, file=file, module=module, tensor=tensor)


def _check_tensors(ts: dict[str, torch.Tensor], file: Path, module: str,
                   disk_name: Callable[[str, str], str], vectors: tuple[str, ...] = (),
                   finite: bool = False) -> None:
    """Each of a module's tensors is 2-D (1-D for the names in ``vectors``) and finite
    floating point; errors name the tensor as ``disk_name(module, name)``. ``finite``: every
    tensor is known to be finite already."""
    for n, v in ts.items():
        if n in vectors:
            _require(v.ndim == 1, f"expected a 1-D tensor, got shape {tuple(v.shape)}", file, module,
                     disk_name(module, n))
        else:
            _check_2d(v, file, module, disk_name(module, n))
        _check_float(v, file, module, disk_name(module, n), finite=finite)


def _num(cfg: dict, key: str, file: Path, *, default=None, kind=float):
    v = cfg.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AdapterError(f"missing or non-numeric {key!r}", file=file)
    return kind(v)


def _check_alpha(cfg: dict, file: Path, *, allow_zero: bool = False) -> float:
    """``lora_alpha`` and every ``alpha_pattern`` value: finite and > 0 (>= 0 with
    ``allow_zero``). A negative alpha would silently flip the sign of the adapter's delta."""
    import math

    alpha = _num(cfg, "lora_alpha", file)
    values = [("lora_alpha", alpha)]
    pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"'alpha_pattern' must be an object, got {type(pattern).__name__}", file=file)
    for k, v in pattern.items():
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise AdapterError(f"alpha_pattern[{k!r}] is not a number: {v!r}", file=file)
        values.append((f"alpha_pattern[{k!r}]", float(v)))
    for name, v in values:
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise AdapterError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v}",
                               file=file)
    return alpha


def _check_modules_complete(groups: dict[str, dict[str, torch.Tensor]], names: tuple[str, ...],
                            file: Path, disk_name: Callable[[str, str], str]) -> None:
    for module, ts in groups.items():
        for n in names:
            if n not in ts:
                raise AdapterError("missing tensor (the module's other tensors are present)",
                                   file=file, module=module, tensor=disk_name(module, n))


def _dtype_of(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def base_weight_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of every tensor in the base's safetensors files (headers only)."""
    from .tensors_io import safetensors_shapes

    base = Path(base)
    if not base.is_dir():
        raise AdapterError("base model directory not found", file=base)
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise AdapterError("no *.safetensors weights in the base model directory", file=base)
    # Once per version of the weight files in a process: a store conversion checks thousands
    # of adapters against one base (its headers cost ~0.4 ms per adapter otherwise).
    key = files_signature(files)
    if key is not None and key in _shapes_memo:
        return dict(_shapes_memo[key])
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(safetensors_shapes(f))
    if key is not None:
        _shapes_memo[key] = dict(shapes)
    return shapes


_shapes_memo: dict[tuple, dict[str, tuple[int, ...]]] = {}
