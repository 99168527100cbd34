"""Readers for every supported adapter format, each detected from the directory's contents.

A reader turns a directory into :class:`AdapterDeltas`: per module, the method's raw tensors,
its delta as factors ``ΔW = P Q`` (computed by :mod:`nora_serve.methods`), and the method's own
forward (used by ``--verify`` as an independent recomputation). Module names are full HF names
(``model.layers.0.self_attn.q_proj``): PEFT's ``base_model.model.`` and the DoRA wrapper's
``model.`` prefixes are stripped.

Formats (``detect_format``), registered below in detection order (:mod:`.formats`: detection,
reader, whether it names a base), each reader in its own module:

==============  =====================================================================
native          this project's format (:mod:`.native`), ``"format": "nora-serve"``
                (:mod:`.read_native`)
three_matrix    official SLoRA / NLoRA / IntTune: PEFT layout plus ``lora_N`` per module
                (:mod:`.read_three_matrix`)
dora_dyrank     official dynamic-rank DoRA: ``model.safetensors`` + ``prune_state_dict.pt``
                (:mod:`.read_dora`); names no base
peft_lora       stock PEFT LoRA (rank/alpha patterns, rsLoRA; PiSSA/OLoRA saved converted;
                ``use_dora``: the method ``dora``, read but never folded) (:mod:`.read_peft`)
peft_adalora    stock PEFT AdaLoRA (``lora_A``/``lora_E``/``lora_B``) (:mod:`.read_peft`)
peft_vera       stock PEFT VeRA (shared ``vera_A``/``vera_B``); needs the base for shapes
                (:mod:`.read_peft`)
==============  =====================================================================

This module holds what they share: detection, dispatch and the check against a base. The
result types live in :mod:`.adapter_deltas`, per-method entries in :mod:`.method_entries`,
common checks in :mod:`.reader_common`, PEFT's layout in :mod:`.peft_layout`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .adapter_deltas import AdapterDeltas, ModuleEntry
from .base_identity import BaseCheck, compare_named_base
from .errors import AdapterError
from .formats import AdapterFormat, format_names, formats, get_format, register_format
from .peft_layout import CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, RESIDUAL_INITS
from .read_dora import DORA_LORA_SUFFIXES, DORA_PRUNE, DORA_WEIGHTS, _check_dora_frozen, _dora_dir, _read_dora
from .read_native import _is_native_config, _read_native
from .read_peft import _read_peft_adalora, _read_peft_lora, _read_peft_vera
from .read_three_matrix import _is_three_matrix, _read_three_matrix
from .reader_common import base_weight_shapes
from .tensors_io import read_json

# Names that lived here before the split stay importable from here.
__all__ = [
    "FORMATS", "AdapterDeltas", "ModuleEntry", "detect_format", "read_adapter",
    "check_against_base", "base_weight_shapes", "CONFIG", "PEFT_PREFIX", "PEFT_WEIGHTS",
    "RESIDUAL_INITS", "DORA_WEIGHTS", "DORA_PRUNE", "DORA_LORA_SUFFIXES",
]

PEFT_TYPES = {"peft_lora": "LORA", "peft_adalora": "ADALORA", "peft_vera": "VERA"}


def _peft_type(cfg: dict | None) -> str | None:
    t = cfg.get("peft_type") if cfg is not None else None
    return str(t).upper() if t is not None else None


register_format(AdapterFormat(
    "native", 'nora-serve\'s own format (adapter_config.json with "format": "nora-serve")',
    detect=lambda path, cfg: cfg is not None and _is_native_config(cfg), read=_read_native))
register_format(AdapterFormat(
    "three_matrix", "official SLoRA / NLoRA / IntTune checkpoints (PEFT layout + lora_N)",
    detect=lambda path, cfg: _peft_type(cfg) == "LORA" and _is_three_matrix(path, cfg),
    read=_read_three_matrix))
register_format(AdapterFormat(
    "dora_dyrank", f"official dynamic-rank DoRA checkpoint dir ({DORA_WEIGHTS} + {DORA_PRUNE})",
    detect=lambda path, cfg: cfg is None and _dora_dir(path) is not None, read=_read_dora,
    # Names the exact tensor that differs, so it runs before the fingerprint check.
    names_base=False, what="a dynamic-rank DoRA checkpoint", check_base=_check_dora_frozen))
for _name, _summary, _read in (
        ("peft_lora", "stock PEFT LoRA (rank_pattern, alpha_pattern, rsLoRA; PiSSA/OLoRA saved converted)",
         _read_peft_lora),
        ("peft_adalora", "stock PEFT AdaLoRA", _read_peft_adalora),
        ("peft_vera", "stock PEFT VeRA (needs --base)", _read_peft_vera)):
    register_format(AdapterFormat(_name, _summary, read=_read,
                                  detect=lambda path, cfg, t=PEFT_TYPES[_name]: _peft_type(cfg) == t))

FORMATS = format_names()


def detect_format(path: str | Path) -> str:
    """The format of the adapter directory ``path`` (see :data:`FORMATS`)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError("no such file or directory", file=path)
    if not path.is_dir():
        raise AdapterError("not a directory (an adapter is a directory)", file=path)
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path) if cfg_path.exists() else None
    for fmt in formats():
        if fmt.detect(path, cfg):
            return fmt.name
    if cfg is None:
        raise AdapterError(
            "unknown adapter format: no adapter_config.json, and not a dynamic-rank DoRA checkpoint "
            f"({DORA_WEIGHTS} + {DORA_PRUNE})", file=path)
    if _peft_type(cfg) is None:
        raise AdapterError("unknown adapter format: no 'peft_type' and no 'format' key", file=cfg_path)
    raise AdapterError(f"unsupported peft_type {_peft_type(cfg)!r} (supported: "
                       f"{', '.join(PEFT_TYPES.values())})", file=cfg_path)


def check_against_base(deltas: AdapterDeltas, base: Path) -> dict[str, str]:
    """Every targeted module must exist in ``base`` with the adapter's shape, and (where the
    adapter records them) the base fingerprints must match. Returns the base's fingerprints of
    the targeted modules.

    A check that passed is remembered per version of the base's weight files and what of the
    adapter it read (its modules' shapes, recorded fingerprints and named base): a store
    conversion checks thousands of adapters that record the same base, and the check's own
    file and path work was a tenth of each conversion."""
    key = _check_key(deltas, base)
    hit = _check_memo.get(key) if key is not None else None
    if hit is not None:
        fps, deltas.base_check = hit
        return dict(fps)
    fps, other_dir = _check_against_base(deltas, base)
    # Not remembered where the adapter's named base is another directory (its files are not in
    # the key) or could not be checked (a note: it may be found later).
    if key is not None and not other_dir and deltas.base_check.note is None:
        _check_memo[key] = (dict(fps), deltas.base_check)
        while len(_check_memo) > _CHECK_MEMO_SIZE:
            _check_memo.pop(next(iter(_check_memo)))
    return fps


_CHECK_MEMO_SIZE = 64
_check_memo: dict[tuple, tuple[dict[str, str], BaseCheck]] = {}


def _check_key(deltas: AdapterDeltas, base: Path) -> tuple | None:
    """What :func:`_check_against_base` depends on, or ``None`` (not remembered): the base's
    weight files (path, size, mtime, inode) and config, and of the adapter its modules' shapes,
    its recorded fingerprints and the base it names (a relative name is the adapter's own:
    it resolves against its directory)."""
    name = deltas.base_model_name_or_path
    if name is not None and not isinstance(name, str):
        return None
    try:
        with os.scandir(base) as it:
            files = sorted((e.name, st.st_size, st.st_mtime_ns, st.st_ino) for e in it
                           if e.name.endswith(".safetensors") or e.name == "config.json"
                           for st in [e.stat()])
    except OSError:
        return None
    relative = isinstance(name, str) and name.strip() and not os.path.isabs(os.path.expanduser(name.strip()))
    fps = deltas.base_fingerprints
    if fps is not None and not isinstance(fps, dict):
        return None
    return (os.path.abspath(base), tuple(files),
            tuple(sorted((m, tuple(e.shape)) for m, e in deltas.entries.items())),
            tuple(sorted((str(m), str(f)) for m, f in (fps or {}).items())),
            name, str(deltas.path) if relative else None)


def _check_against_base(deltas: AdapterDeltas, base: Path) -> tuple[dict[str, str], bool]:
    from .fingerprint import base_fingerprints

    shapes = base_weight_shapes(base)
    for module, e in deltas.entries.items():
        key = f"{module}.weight"
        if key not in shapes:
            raise AdapterError("targeted module not found in the base model", file=base,
                               module=module, tensor=key)
        if tuple(shapes[key]) != tuple(e.shape):
            raise AdapterError(
                f"shape mismatch with the base model: adapter delta is {list(e.shape)} "
                f"([d_out, d_in]) but the base weight is {list(shapes[key])}",
                file=deltas.path, module=module, tensor=key)
    fps = base_fingerprints(base, list(deltas.entries))
    recorded = bool(deltas.base_fingerprints)
    if deltas.base_fingerprints:
        for module, fp in sorted(deltas.base_fingerprints.items()):
            if module in fps and fps[module] != fp:
                raise AdapterError(
                    f"base fingerprint mismatch: the adapter was made for a different base model "
                    f"(adapter {fp}, base {fps[module]})",
                    file=deltas.path / CONFIG if (deltas.path / CONFIG).exists() else deltas.path,
                    module=module, tensor=f"{module}.weight")
    where = deltas.path / CONFIG if (deltas.path / CONFIG).exists() else deltas.path
    named, note = compare_named_base(deltas.base_model_name_or_path, deltas.path, Path(base), fps, where)
    deltas.base_check = BaseCheck(str(Path(base).resolve()), shapes=len(deltas.entries),
                                  fingerprints=len(fps) if recorded or named else 0, note=note)
    return fps, named


def read_adapter(path: str | Path, *, base: str | Path | None = None, fmt: str | None = None,
                 lora_alpha: float | None = None, adalora_ranknum: str = "init_r",
                 basis: str | Path | None = None) -> AdapterDeltas:
    """Read any supported adapter into per-module deltas.

    ``base``: the base model directory. When given, every targeted module must exist in it
    with the adapter's shape, recorded fingerprints must match, and the result's
    ``base_fingerprints`` are the base's. ``fmt`` forces a format (see :data:`FORMATS`).
    ``lora_alpha``: the dynamic-rank DoRA alpha (not stored in its checkpoints).
    ``basis``: where to look first for the shared basis of a format_version 2 native adapter (a
    basis file, or a directory of them; then the store's ``bases/`` and the user basis cache).
    """
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise AdapterError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", file=path)
    elif not path.is_dir():
        raise AdapterError("not a directory (an adapter is a directory)", file=path)
    base = Path(base) if base is not None else None
    opts = {"lora_alpha": lora_alpha, "adalora_ranknum": adalora_ranknum, "basis": basis}
    reader = get_format(fmt)
    d = reader.read(path, base, opts)
    if not d.entries:
        raise AdapterError("the adapter targets no modules", file=path)
    if base is not None:
        if reader.check_base is not None:
            reader.check_base(d, base)
        d.base_fingerprints = check_against_base(d, base)
    return d
