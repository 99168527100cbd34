"""Split a native shared-basis adapter (a method whose definition names ``shared`` tensors:
NoRA, IntTune, LoRA-XS) into its shared basis and its own cores.

``ΔW = B_sh C A_sh`` per module: ``A_sh [R, d_in]`` and ``B_sh [d_out, R]`` are a deterministic
function of the base weights, identical (bit for bit) in every adapter trained from that base
with the same rule and rank; ``C [R, R]`` is what the adapter learned. A server keeps one copy
of each basis and only ``R x R`` per module per adapter.

The basis key is a sha256 over every basis tensor's name, shape, dtype and bytes
(:func:`~.basis_file.basis_key`): adapters share storage only when their bases are exactly equal
(the sampled fingerprint in the config is not trusted for this). A format_version 2 adapter
names its basis by that key (``shared_basis.digest``) and stores only its own tensors; its basis
is read from the basis file (:mod:`.basis_file`), checked against the digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nora_serve.methods import get_method, is_method

from .basis_file import basis_key, read_basis
from .native import CONFIG_NAME, FORMAT_VERSION_CORES, WEIGHTS_NAME, method_scale
from .read_native import _is_native_config, load_shared_basis
from .tensors_io import load_safetensors, read_json


@dataclass
class SharedBasisSplit:
    method: str
    rank: int  # R: the basis rank (and the cores' size)
    key: str  # content hash of the basis
    basis: dict[str, torch.Tensor]  # "<module>.A" [R, d_in], "<module>.B" [d_out, R]
    cores: dict[str, torch.Tensor]  # "<module>" [R, R], float32
    basis_path: Path | None = None  # format_version 2: the basis file it was read from

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


def split_shared_basis(path: str | Path, basis: str | Path | None = None, *, deltas=None) -> SharedBasisSplit:
    """Basis and cores of a native shared-basis adapter (validate it with the reader first).
    Format_version 1: the basis from its own file, keyed by content; 2: the basis file its
    digest names (looked for as :func:`~.basis_file.find_basis` does, ``basis`` first), and the
    key is that digest. ``deltas``: the reader's result for this adapter, whose config and
    tensors are then used instead of reading the files again."""
    path = Path(path)
    cfg = (deltas.config if deltas is not None else None) or read_json(path / CONFIG_NAME)
    method = cfg["method"]
    spec = get_method(method)
    if not spec.shared_basis:
        raise ValueError(f"{path / CONFIG_NAME}: method {method!r} has no shared basis")
    a_name, b_name = spec.shared
    scale = method_scale(cfg)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    if deltas is not None:  # each module's tensors as the file held them (v2: the basis merged in)
        per_module = {m: dict(e.raw) for m, e in deltas.entries.items()}
    else:
        for key, t in load_safetensors(path / WEIGHTS_NAME).items():
            module, _, name = key.rpartition(".")
            per_module.setdefault(module, {})[name] = t
    bfile = None
    if cfg.get("format_version") == FORMAT_VERSION_CORES:
        if deltas is not None and deltas.basis_path is not None:  # the reader found and merged it
            bfile = Path(deltas.basis_path)
            basis_t, _ = read_basis(bfile, expect_digest=cfg["shared_basis"]["digest"])
        else:
            bfile, basis_t = load_shared_basis(path, cfg, basis)
            for module, t in per_module.items():
                t[a_name], t[b_name] = basis_t[f"{module}.A"], basis_t[f"{module}.B"]
        # The whole file, whose content read_basis checked against the digest.
        pair, key = dict(basis_t), cfg["shared_basis"]["digest"]
    else:
        pair = {f"{m}.{k}": t[n].contiguous() for m, t in sorted(per_module.items())
                for k, n in (("A", a_name), ("B", b_name))}
        key = basis_key(pair)
    # The core is the adapter's own tensors (the basis is not part of it: not converted here).
    cores = _cores(spec, {m: {k: v for k, v in t.items() if k not in spec.shared} for m, t in per_module.items()},
                   scale)
    ranks = {c.shape[0] for c in cores.values()}
    return SharedBasisSplit(method, max(ranks), key, pair, cores, bfile)


def _cores(spec, own: dict[str, dict[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """Each module's core, ``spec.core`` in float64 then float32: one call over the modules
    stacked where all have the same tensors and shapes (a method's core is products and scalings,
    which broadcast over the stack; per module this was a fifth of a store conversion)."""
    mods = sorted(own)
    if len(mods) > 1 and len({tuple((k, tuple(v.shape)) for k, v in sorted(own[m].items())) for m in mods}) == 1:
        # On numpy arrays: torch's batched float64 product runs on its thread pool, whose
        # threads then spin beside the server's start (numpy multiplies each matrix in turn,
        # bit for bit as one product per module does).
        stacked = {k: torch.stack([own[m][k] for m in mods]).double().numpy() for k in own[mods[0]]}
        c = spec.core(stacked, scale)
        if isinstance(c, np.ndarray) and c.ndim == 3 and c.shape[0] == len(mods):
            return dict(zip(mods, torch.from_numpy(c).float().unbind(0)))
    return {m: spec.core({k: v.double() for k, v in own[m].items()}, scale).float() for m in mods}
