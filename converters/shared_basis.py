"""Split a native shared-basis adapter (a method whose definition names ``shared`` tensors:
NoRA, IntTune, LoRA-XS) into its shared basis and its own cores.

``ΔW = B_sh C A_sh`` per module: ``A_sh [R, d_in]`` and ``B_sh [d_out, R]`` are a deterministic
function of the base weights, identical (bit for bit) in every adapter trained from that base
with the same rule and rank; ``C [R, R]`` is what the adapter learned. A server keeps one copy
of each basis and only ``R x R`` per module per adapter.

The basis key is a sha256 over every basis tensor's name, shape, dtype and bytes: adapters
share storage only when their bases are exactly equal (the sampled fingerprint in the config
is not trusted for this).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from nora_serve.methods import get_method, is_method

from .native import CONFIG_NAME, WEIGHTS_NAME, method_scale
from .read_native import _is_native_config
from .tensors_io import load_safetensors, read_json


@dataclass
class SharedBasisSplit:
    method: str
    rank: int  # R: the basis rank (and the cores' size)
    key: str  # content hash of the basis
    basis: dict[str, torch.Tensor]  # "<module>.A" [R, d_in], "<module>.B" [d_out, R]
    cores: dict[str, torch.Tensor]  # "<module>" [R, R], float32

    @property
    def modules(self) -> list[str]:
        return sorted(self.cores)


def shared_basis_method(path: str | Path) -> str | None:
    """The method if ``path`` is a native adapter with a shared basis, else ``None``."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        return None
    try:
        cfg = read_json(cfg_path)
    except Exception:
        return None
    if not isinstance(cfg, dict) or not _is_native_config(cfg):
        return None
    method = cfg.get("method")
    return method if is_method(method) and get_method(method).shared_basis else None


def basis_key(basis: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(basis):
        t = basis[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def split_shared_basis(path: str | Path) -> SharedBasisSplit:
    """Basis and cores of a native shared-basis adapter (validate it with the reader first)."""
    path = Path(path)
    cfg = read_json(path / CONFIG_NAME)
    method = cfg["method"]
    spec = get_method(method)
    if not spec.shared_basis:
        raise ValueError(f"{path / CONFIG_NAME}: method {method!r} has no shared basis")
    a_name, b_name = spec.shared
    scale = method_scale(cfg)
    flat = load_safetensors(path / WEIGHTS_NAME)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        module, _, name = key.rpartition(".")
        per_module.setdefault(module, {})[name] = t
    basis, cores = {}, {}
    for module, t in sorted(per_module.items()):
        basis[f"{module}.A"] = t[a_name].contiguous()
        basis[f"{module}.B"] = t[b_name].contiguous()
        cores[module] = spec.core({k: v.double() for k, v in t.items()}, scale).float()
    ranks = {c.shape[0] for c in cores.values()}
    return SharedBasisSplit(method, max(ranks), basis_key(basis), basis, cores)
