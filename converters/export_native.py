"""A native adapter as one self-contained directory (format_version 1, basis embedded), for
sharing an adapter without its store: ``nora-convert --export-native SRC OUT``."""

from __future__ import annotations

import os
from pathlib import Path

from nora_serve.methods import get_method

from .errors import AdapterError
from .native import FORMAT_VERSION, NativeAdapter
from .readers import AdapterDeltas, detect_format, read_adapter


def export_native(src: str | os.PathLike, out: str | os.PathLike, *,
                  basis: str | os.PathLike | None = None, overwrite: bool = False) -> AdapterDeltas:
    """Read the native adapter at ``src`` (its basis resolved and checked as the reader does;
    ``basis`` looked at first) and write it to ``out`` as format_version 1 with every tensor in
    its own file, atomically. Returns what was read."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise AdapterError("output must not be the source directory or inside it", file=out)
    if out.exists() and not overwrite:
        raise AdapterError("output already exists (pass --overwrite to replace it)", file=out)
    fmt = detect_format(src)
    if fmt != "native":
        raise AdapterError(f"not a native adapter (format {fmt}): --export-native writes nora-serve's "
                           "own adapters; fold other formats with nora-convert SRC OUT", file=src)
    d = read_adapter(src, fmt="native", basis=basis)
    spec = get_method(d.method)
    cfg = dict(d.config, format_version=FORMAT_VERSION)
    if isinstance(cfg.get("shared_basis"), dict):  # version 1 names no basis file
        cfg["shared_basis"] = {k: v for k, v in cfg["shared_basis"].items() if k != "digest"}
    tensors = {m: {n: e.raw[n] for n in spec.tensors} for m, e in d.entries.items()}
    NativeAdapter(cfg, tensors).save(out, overwrite=overwrite)
    return d
