"""Fingerprints that tie an adapter to the exact base weights it was made for.

A fingerprint is ``sha256`` over the tensor's shape and a fixed strided sample of at most
65,536 of its values as float32. It is cheap on a 70B checkpoint and still differs between
any two real models (or a base and its fine-tune); float32 makes it independent of whether
the base is stored in fp32, fp16 or bf16 when the values themselves agree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from .tensors_io import files_signature

SAMPLE = 65536


def fingerprint_tensor(t: torch.Tensor) -> str:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step][:SAMPLE].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(json.dumps(list(t.shape)).encode())
    h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """One fingerprint for a named set of tensors (e.g. an adapter's shared outer factors)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(fingerprint_tensor(tensors[name]).encode())
    return "sha256:" + h.hexdigest()[:32]


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found (only safetensors bases are supported)")
    return files


def _base_weights(model_dir: str | Path, modules: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module, weight)`` for each module, read lazily from the base's safetensors files (one
    tensor in memory at a time); a module with no weight there is a KeyError."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    wanted = {f"{m}.weight": m for m in modules}
    found: set[str] = set()
    for f in _weight_files(model_dir):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                if key in wanted:
                    found.add(wanted[key])
                    yield wanted[key], fh.get_tensor(key)
    missing = sorted(set(wanted.values()) - found)
    if missing:
        raise KeyError(f"{model_dir}: base model has no weight for module(s) {', '.join(missing[:5])}"
                       + (" ..." if len(missing) > 5 else ""))


def base_fingerprints(model_dir: str | Path, modules: Iterable[str]) -> dict[str, str]:
    """Fingerprints of ``<module>.weight`` for each module (computed once per module and version
    of the base's weight files in a process: a server checks thousands of adapters of one base)."""
    modules = list(modules)
    try:
        files = files_signature(_weight_files(Path(model_dir)))
    except OSError:  # no weight files
        files = None
    known = _fp_memo.setdefault((str(Path(model_dir).resolve()), files), {}) if files else {}
    todo = [m for m in modules if m not in known]
    if todo:
        known.update({m: fingerprint_tensor(w) for m, w in _base_weights(model_dir, todo)})
    return {m: known[m] for m in modules}


_fp_memo: dict[tuple, dict[str, str]] = {}


def load_base_weights(model_dir: str | Path, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """``{module: weight}`` for the given modules, from the base's safetensors files."""
    return dict(_base_weights(model_dir, modules))
