"""Readers for every supported adapter format, each detected from the directory's contents.

A reader turns a directory into :class:`AdapterDeltas`: per module, the method's raw tensors,
its delta as factors ``ΔW = P Q`` (computed by :mod:`nora_serve.methods`), and the method's own
forward (used by ``--verify`` as an independent recomputation). Module names are full HF names
(``model.layers.0.self_attn.q_proj``): PEFT's ``base_model.model.`` and the DoRA wrapper's
``model.`` prefixes are stripped.

Formats (``detect_format``):

==============  =====================================================================
native          this project's format (:mod:`.native`), ``"format": "nora-serve"``
three_matrix    official SLoRA / NLoRA / IntTune: PEFT layout plus ``lora_N`` per module
dora_dyrank     official dynamic-rank DoRA: ``model.safetensors`` + ``prune_state_dict.pt``
peft_lora       stock PEFT LoRA (rank/alpha patterns, rsLoRA; PiSSA/OLoRA saved converted)
peft_adalora    stock PEFT AdaLoRA (``lora_A``/``lora_E``/``lora_B``)
peft_vera       stock PEFT VeRA (shared ``vera_A``/``vera_B``); needs the base for shapes
==============  =====================================================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from nora_serve.methods import (
    Factors,
    adalora_factors,
    dyrank_factors,
    lora_factors,
    three_matrix_factors,
    vera_factors,
)

from . import native
from .errors import AdapterError
from .fold import Chain
from .tensors_io import (
    check_finite,
    load_pickle_weights,
    load_safetensors,
    load_weights,
    read_json,
    safetensors_keys,
)

FORMATS = ("native", "three_matrix", "dora_dyrank", "peft_lora", "peft_adalora", "peft_vera")
PEFT_PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DORA_WEIGHTS = "model.safetensors"
DORA_PRUNE = "prune_state_dict.pt"
# PEFT inits that leave the base residualised (W_res = W0 - ΔW0): the saved adapter is relative
# to a modified base unless PEFT converted it on save (then init_lora_weights reads True).
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


# ---------------------------------------------------------------------------------------------
# The reader's result
# ---------------------------------------------------------------------------------------------
@dataclass
class ModuleEntry:
    raw: dict[str, torch.Tensor]  # the method's own tensors for this module
    factors: Callable[[torch.dtype], Factors]  # ΔW = P Q, computed in the given dtype
    forward: Callable[[torch.Tensor], torch.Tensor]  # x [n, d_in] -> x ΔWᵀ, the method's way
    source_rank: int
    shape: tuple[int, int]  # (d_out, d_in)
    # What the fold consumes: the factors, or a Chain (L, C, R) that skips forming L C.
    fold_input: Callable[[torch.dtype], "Factors | Chain"] | None = None

    def for_fold(self, dtype: torch.dtype):
        return (self.fold_input or self.factors)(dtype)


class _LazyFactors(Mapping):
    """``{module: Factors}`` computed on access (float64), so large adapters are never held
    twice in memory."""

    def __init__(self, entries: dict[str, ModuleEntry], dtype: torch.dtype = torch.float64):
        self._entries, self._dtype = entries, dtype

    def __getitem__(self, name: str) -> Factors:
        return self._entries[name].factors(self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class AdapterDeltas:
    """An adapter read from disk, reduced to per-module deltas relative to the original base."""

    path: Path
    format: str
    method: str
    entries: dict[str, ModuleEntry]
    base_fingerprints: dict[str, str] | None = None
    shared_basis: dict | None = None
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32  # storage dtype of the source tensors
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # assumptions a reader made (e.g. a default)

    @property
    def modules(self) -> Mapping[str, Factors]:
        return _LazyFactors(self.entries)

    @property
    def source_ranks(self) -> dict[str, int]:
        return {m: e.source_rank for m, e in self.entries.items()}

    def factors(self, module: str, dtype: torch.dtype = torch.float64) -> Factors:
        return self.entries[module].factors(dtype)

    def forward(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` by the source method's own sequence of operations (not via the factors)."""
        return self.entries[module].forward(x)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
def _dora_dir(path: Path) -> Path | None:
    for d in (path, path / "checkpoint"):
        if (d / DORA_WEIGHTS).is_file() and (d / DORA_PRUNE).is_file():
            return d
    if (path / DORA_WEIGHTS).is_file() and not (path / CONFIG).exists():
        if any(k.endswith(".lora_scaler") for k in safetensors_keys(path / DORA_WEIGHTS)):
            return path
    return None


def _peft_weights_file(path: Path) -> Path:
    for name in PEFT_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise AdapterError("missing adapter weights (adapter_model.safetensors or adapter_model.bin)",
                       file=path)


def _weight_keys(f: Path) -> list[str]:
    if f.suffix == ".safetensors":
        return safetensors_keys(f)
    return list(load_weights(f))


def detect_format(path: str | Path) -> str:
    """The format of the adapter directory ``path`` (see :data:`FORMATS`)."""
    path = Path(path)
    if not path.exists():
        raise AdapterError("no such file or directory", file=path)
    if not path.is_dir():
        raise AdapterError("not a directory (an adapter is a directory)", file=path)
    cfg_path = path / CONFIG
    if cfg_path.exists():
        cfg = read_json(cfg_path)
        if cfg.get("format") == native.FORMAT:
            return "native"
        peft_type = cfg.get("peft_type")
        if peft_type is None:
            raise AdapterError("unknown adapter format: no 'peft_type' and no 'format' key", file=cfg_path)
        peft_type = str(peft_type).upper()
        if peft_type == "LORA":
            init = cfg.get("init_lora_weights")
            if isinstance(init, str) and init.lower() in ("n_lora", "s_lora"):
                return "three_matrix"
            keys = _weight_keys(_peft_weights_file(path))
            if any(".lora_N." in k or k.endswith(".lora_N") for k in keys):
                return "three_matrix"
            return "peft_lora"
        if peft_type == "ADALORA":
            return "peft_adalora"
        if peft_type == "VERA":
            return "peft_vera"
        raise AdapterError(f"unsupported peft_type {peft_type!r} (supported: LORA, ADALORA, VERA)",
                           file=cfg_path)
    if _dora_dir(path) is not None:
        return "dora_dyrank"
    raise AdapterError(
        "unknown adapter format: no adapter_config.json, and not a dynamic-rank DoRA checkpoint "
        f"({DORA_WEIGHTS} + {DORA_PRUNE})", file=path)


# ---------------------------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------------------------
def _require(cond: bool, msg: str, file: Path, module: str | None = None, tensor: str | None = None):
    if not cond:
        raise AdapterError(msg, file=file, module=module, tensor=tensor)


def _check_2d(t: torch.Tensor, file: Path, module: str, tensor: str) -> None:
    _require(t.ndim == 2, f"expected a 2-D tensor, got shape {tuple(t.shape)}", file, module, tensor)


def _check_float(t: torch.Tensor, file: Path, module: str, tensor: str) -> None:
    _require(t.is_floating_point(), f"expected floating-point weights, got {t.dtype}", file, module, tensor)
    check_finite(t, file=file, module=module, tensor=tensor)


def _num(cfg: dict, key: str, file: Path, *, default=None, kind=float):
    v = cfg.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AdapterError(f"missing or non-numeric {key!r}", file=file)
    return kind(v)


def _pattern_value(pattern: dict, name: str):
    """PEFT's rule (``get_pattern_key``): a key matches a module-name suffix at a '.' boundary;
    the first match wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _split_peft_keys(tensors: dict[str, torch.Tensor], file: Path, allowed: dict[str, str],
                     *, extra_ok: Callable[[str], bool] = lambda k: False
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<module>.<suffix>`` by module; ``allowed`` maps the on-disk
    suffix to the tensor's short name. Anything else is an error naming the tensor."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if extra_ok(key):
            continue
        for suffix, short in allowed.items():
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                if module.startswith(PEFT_PREFIX):
                    module = module[len(PEFT_PREFIX):]
                out.setdefault(module, {})[short] = t
                break
        else:
            raise AdapterError(_unexpected_reason(key, allowed), file=file, tensor=key)
    return out


def _unexpected_reason(key: str, allowed: dict[str, str]) -> str:
    known = "/".join(sorted(set(allowed)))
    if "lora_magnitude_vector" in key:
        return "weight-decomposed DoRA (use_dora) magnitude: not a low-rank delta, cannot be folded into LoRA"
    if "lora_embedding" in key:
        return "embedding LoRA is not supported by the converter"
    if "modules_to_save" in key or key.endswith((".weight", ".bias")):
        return (f"unexpected tensor: the checkpoint changes weights a LoRA cannot carry "
                f"(expected only {known})")
    return f"unexpected tensor (expected only {known})"


def _check_modules_complete(groups: dict[str, dict[str, torch.Tensor]], names: tuple[str, ...],
                            file: Path, disk_name: Callable[[str, str], str]) -> None:
    for module, ts in groups.items():
        for n in names:
            if n not in ts:
                raise AdapterError("missing tensor (the module's other tensors are present)",
                                   file=file, module=module, tensor=disk_name(module, n))


def _check_residual_init(cfg: dict, file: Path) -> None:
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise AdapterError(
            f"init_lora_weights={init!r}: this adapter is relative to a residualised base "
            "(W0 - initial adapter), not the original one; re-save it with PEFT's "
            "path_initial_model_for_weight_conversion to get a delta relative to the original base",
            file=file)


def _reject_unfoldable_peft_features(cfg: dict, file: Path) -> None:
    if cfg.get("use_dora"):
        raise AdapterError("use_dora=true (weight-decomposed DoRA): its delta is not low-rank, "
                           "cannot be folded into LoRA", file=file)
    if cfg.get("modules_to_save"):
        raise AdapterError(f"modules_to_save={cfg['modules_to_save']!r}: the adapter changes whole "
                           "modules, which a LoRA cannot carry", file=file)
    if cfg.get("trainable_token_indices"):
        raise AdapterError("trainable_token_indices: the adapter changes embedding rows, which a "
                           "LoRA cannot carry", file=file)
    if cfg.get("bias", "none") not in ("none", None) or cfg.get("lora_bias"):
        raise AdapterError("adapter trains biases, which a LoRA cannot carry", file=file)
    if cfg.get("layer_replication"):
        raise AdapterError("layer_replication is not supported", file=file)
    if cfg.get("alora_invocation_tokens"):
        raise AdapterError("activated LoRA (alora_invocation_tokens) is not a plain delta", file=file)
    if cfg.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out=true (Conv1D bases such as GPT-2) is not supported", file=file)


# ---------------------------------------------------------------------------------------------
# Per-module entries: factors and the method's own forward
# ---------------------------------------------------------------------------------------------
def _f64(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype)


def _lora_entry(A, B, scale, rank=None) -> ModuleEntry:
    return ModuleEntry(
        raw={"lora_A": A, "lora_B": B},
        factors=lambda dt: lora_factors(_f64(A, dt), _f64(B, dt), scale),
        forward=lambda x: scale * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T),
        source_rank=A.shape[0] if rank is None else rank,
        shape=(B.shape[0], A.shape[1]),
    )


def _three_entry(A, N, B, scale) -> ModuleEntry:
    return ModuleEntry(
        raw={"lora_A": A, "lora_N": N, "lora_B": B},
        factors=lambda dt: three_matrix_factors(_f64(A, dt), _f64(N, dt), _f64(B, dt), scale),
        forward=lambda x: scale * (((x @ A.to(x.dtype).T) @ N.to(x.dtype).T) @ B.to(x.dtype).T),
        source_rank=A.shape[0],
        shape=(B.shape[0], A.shape[1]),
        fold_input=lambda dt: Chain(B, scale * N.detach().to(torch.float64), A),
    )


def _dyrank_entry(A, c, B, scale, pruned=None) -> ModuleEntry:
    keep = c != 0
    if pruned is not None:
        keep = keep & ~pruned
    gate = torch.where(keep, c, torch.zeros_like(c))
    raw = {"lora_A": A, "lora_c": c, "lora_B": B}
    if pruned is not None:
        raw["pruned"] = pruned
    return ModuleEntry(
        raw=raw,
        factors=lambda dt: dyrank_factors(_f64(A, dt), _f64(c, dt), _f64(B, dt), scale, pruned),
        forward=lambda x: scale * (((x @ A.to(x.dtype).T) * gate.to(x.dtype)) @ B.to(x.dtype).T),
        source_rank=int(keep.sum()),
        shape=(B.shape[0], A.shape[1]),
    )


def _nora_entry(oA, oB, iA, iB, scale) -> ModuleEntry:
    from nora_serve.methods import nora_factors

    def fwd(x):
        d = x.dtype
        return scale * ((((x @ oA.to(d).T) @ iA.to(d).T) @ iB.to(d).T) @ oB.to(d).T)

    return ModuleEntry(
        raw={"outer_A": oA, "outer_B": oB, "inner_A": iA, "inner_B": iB},
        factors=lambda dt: nora_factors(_f64(oA, dt), _f64(oB, dt), _f64(iA, dt), _f64(iB, dt), scale),
        forward=fwd,
        source_rank=iA.shape[0],
        shape=(oB.shape[0], oA.shape[1]),
    )


def _adalora_entry(A, E, B, alpha, ranknum) -> ModuleEntry:
    scale = alpha / (ranknum + 1e-5)
    return ModuleEntry(
        raw={"lora_A": A, "lora_E": E, "lora_B": B},
        factors=lambda dt: adalora_factors(_f64(A, dt), _f64(E, dt), _f64(B, dt), alpha, ranknum),
        forward=lambda x: (x @ (A.to(x.dtype) * E.to(x.dtype)).T @ B.to(x.dtype).T) * scale,
        source_rank=A.shape[0],
        shape=(B.shape[0], A.shape[1]),
    )


def _vera_entry(vA, vB, ld, lb, d_in) -> ModuleEntry:
    d_out = lb.shape[0]

    def fwd(x):
        d = x.dtype
        h = (x @ vA[:, :d_in].to(d).T) * ld.to(d)
        return (h @ vB[:d_out, :].to(d).T) * lb.to(d)

    return ModuleEntry(
        raw={"vera_lambda_d": ld, "vera_lambda_b": lb},
        factors=lambda dt: vera_factors(_f64(vA, dt), _f64(vB, dt), _f64(ld, dt), _f64(lb, dt), d_in),
        forward=fwd,
        source_rank=ld.shape[0],
        shape=(d_out, d_in),
    )


# ---------------------------------------------------------------------------------------------
# Base model: shapes and fingerprints
# ---------------------------------------------------------------------------------------------
def base_weight_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of every tensor in the base's safetensors files (headers only)."""
    from .tensors_io import safetensors_shapes

    base = Path(base)
    if not base.is_dir():
        raise AdapterError("base model directory not found", file=base)
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise AdapterError("no *.safetensors weights in the base model directory", file=base)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(safetensors_shapes(f))
    return shapes


def check_against_base(deltas: AdapterDeltas, base: Path) -> dict[str, str]:
    """Every targeted module must exist in ``base`` with the adapter's shape, and (where the
    adapter records them) the base fingerprints must match. Returns the base's fingerprints of
    the targeted modules."""
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
    if deltas.base_fingerprints:
        for module, fp in sorted(deltas.base_fingerprints.items()):
            if module in fps and fps[module] != fp:
                raise AdapterError(
                    f"base fingerprint mismatch: the adapter was made for a different base model "
                    f"(adapter {fp}, base {fps[module]})",
                    file=deltas.path / CONFIG if (deltas.path / CONFIG).exists() else deltas.path,
                    module=module, tensor=f"{module}.weight")
    return fps


# ---------------------------------------------------------------------------------------------
# Format readers
# ---------------------------------------------------------------------------------------------
def _read_native(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / native.CONFIG_NAME
    cfg = read_json(cfg_path)
    method = cfg.get("method")
    if method not in native.METHOD_TENSORS:
        raise AdapterError(f"unknown method {method!r} (known: {', '.join(native.METHODS)})", file=cfg_path)
    for key in ("r", "lora_alpha") + (("inner_r",) if method == "nora" else ()):
        _num(cfg, key, cfg_path)
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
    _check_modules_complete(groups, names, wfile, lambda m, n: f"{m}.{n}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        missing = sorted(set(targets) - set(groups))
        if missing:
            raise AdapterError("module listed in target_modules has no tensors", file=wfile,
                               module=missing[0], tensor=f"{missing[0]}.{names[0]}")
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        for n, v in t.items():
            if n == "lora_c":
                _require(v.ndim == 1, f"expected a 1-D tensor, got shape {tuple(v.shape)}", wfile, module, f"{module}.{n}")
            else:
                _check_2d(v, wfile, module, f"{module}.{n}")
            _check_float(v, wfile, module, f"{module}.{n}")

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


def _peft_scale(cfg: dict, module: str, rank: int, file: Path, tensor: str) -> float:
    r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module)
    r_cfg = int(cfg["r"]) if r_cfg is None else int(r_cfg)
    if r_cfg != rank:
        raise AdapterError(f"rank {rank} on disk, but the config gives r={r_cfg} for this module "
                           "(r / rank_pattern)", file=file, module=module, tensor=tensor)
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module)
    alpha = float(cfg["lora_alpha"]) if alpha is None else float(alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _read_peft_lora(path: Path, base: Path | None, opts: dict, three: bool) -> AdapterDeltas:
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    _num(cfg, "r", cfg_path, kind=int)
    _num(cfg, "lora_alpha", cfg_path)
    _reject_unfoldable_peft_features(cfg, cfg_path)
    if not three:
        _check_residual_init(cfg, cfg_path)
    wfile = _peft_weights_file(path)
    tensors = load_weights(wfile)
    allowed = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
    if three:
        allowed["lora_N.weight"] = "lora_N"
    groups = _split_peft_keys(tensors, wfile, allowed)
    if not groups:
        raise AdapterError("no LoRA tensors found", file=wfile)
    names = ("lora_A", "lora_N", "lora_B") if three else ("lora_A", "lora_B")
    disk = lambda m, n: f"{PEFT_PREFIX}{m}.{n}.weight"  # noqa: E731
    _check_modules_complete(groups, names, wfile, disk)
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        for n, v in t.items():
            _check_2d(v, wfile, module, disk(module, n))
            _check_float(v, wfile, module, disk(module, n))
        A, B = t["lora_A"], t["lora_B"]
        r = A.shape[0]
        _require(B.shape[1] == r, f"shape mismatch: lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}",
                 wfile, module, disk(module, "lora_B"))
        scale = _peft_scale(cfg, module, r, cfg_path, disk(module, "lora_A"))
        if three:
            N = t["lora_N"]
            _require(N.shape == (r, r), f"shape mismatch: lora_N {tuple(N.shape)} vs rank {r}",
                     wfile, module, disk(module, "lora_N"))
            entries[module] = _three_entry(A, N, B, scale)
        else:
            entries[module] = _lora_entry(A, B, scale)
    init = cfg.get("init_lora_weights")
    if three:
        method = "slora" if str(init).lower() == "s_lora" else "nlora"
    else:
        method = "lora"
    d = AdapterDeltas(path, "three_matrix" if three else "peft_lora", method, entries,
                      base_model_name_or_path=cfg.get("base_model_name_or_path"),
                      dtype=_dtype_of(tensors), config=cfg)
    if three and method == "nlora" and base is not None and _is_inttune(d, base):
        d.method = "inttune"
    return d


def _is_inttune(d: AdapterDeltas, base: Path) -> bool:
    """IntTune keeps NLoRA's init ``A = W0[:r]``, ``B = W0[:, :r]`` frozen."""
    from .fingerprint import load_base_weights

    try:
        W = load_base_weights(base, list(d.entries))
    except KeyError:
        return False
    for m, e in d.entries.items():
        A, B = e.raw["lora_A"], e.raw["lora_B"]
        r = A.shape[0]
        w = W[m].to(A.dtype)
        if w.shape != e.shape or not (torch.equal(A, w[:r, :]) and torch.equal(B, w[:, :r])):
            return False
    return True


def _read_peft_adalora(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    _reject_unfoldable_peft_features(cfg, cfg_path)
    alpha = _num(cfg, "lora_alpha", cfg_path)
    init_r = _num(cfg, "init_r", cfg_path, default=cfg.get("r"), kind=int)
    wfile = _peft_weights_file(path)
    tensors = load_weights(wfile)
    allowed = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}
    groups = _split_peft_keys(tensors, wfile, allowed)
    if not groups:
        raise AdapterError("no AdaLoRA tensors found", file=wfile)
    disk = lambda m, n: f"{PEFT_PREFIX}{m}.{n}"  # noqa: E731
    _check_modules_complete(groups, ("lora_A", "lora_E", "lora_B"), wfile, disk)
    rank_pattern = cfg.get("rank_pattern") or {}
    # PEFT scales by alpha / (ranknum + 1e-5). ranknum stays the configured init_r even after
    # PEFT (0.21) resizes the layers to the surviving ranks on load, and during training: both
    # PEFT's reload and the fixture's reference logits match init_r, not the surviving rank.
    ranknum_rule = opts.get("adalora_ranknum", "init_r")
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        for n, v in t.items():
            _check_2d(v, wfile, module, disk(module, n))
            _check_float(v, wfile, module, disk(module, n))
        A, E, B = t["lora_A"], t["lora_E"], t["lora_B"]
        r = A.shape[0]
        _require(E.shape == (r, 1), f"shape mismatch: lora_E {tuple(E.shape)} vs rank {r}", wfile, module, disk(module, "lora_E"))
        _require(B.shape[1] == r, f"shape mismatch: lora_B {tuple(B.shape)} vs lora_A {tuple(A.shape)}", wfile, module, disk(module, "lora_B"))
        mask = rank_pattern.get(f"{module}.lora_E")
        if mask is not None:
            survivors = int(sum(bool(b) for b in mask))
            _require(survivors == r, f"rank {r} on disk, but rank_pattern keeps {survivors}",
                     cfg_path, module, f"{module}.lora_E")
        ranknum = float(r) if (rank_pattern and ranknum_rule == "surviving") else float(init_r)
        entries[module] = _adalora_entry(A, E, B, alpha if alpha > 0 else float(r), ranknum)
    return AdapterDeltas(path, "peft_adalora", "adalora", entries,
                         base_model_name_or_path=cfg.get("base_model_name_or_path"),
                         dtype=_dtype_of(tensors), config=cfg)


def _read_peft_vera(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    _reject_unfoldable_peft_features(cfg, cfg_path)
    r = _num(cfg, "r", cfg_path, kind=int)
    wfile = _peft_weights_file(path)
    tensors = load_weights(wfile)
    shared = {k: v for k, v in tensors.items() if re.search(r"(^|\.)vera_[AB](\.[^.]+)?$", k)}
    vA = [k for k in shared if re.search(r"(^|\.)vera_A(\.[^.]+)?$", k)]
    vB = [k for k in shared if re.search(r"(^|\.)vera_B(\.[^.]+)?$", k)]
    if not vA or not vB:
        raise AdapterError(
            "the shared projections vera_A / vera_B are not in the file (saved with "
            "save_projection=false); re-save the adapter with save_projection=true",
            file=wfile, tensor="base_model.vera_A")
    _require(len(vA) == 1 and len(vB) == 1, "more than one vera_A / vera_B (several adapters in one file)",
             wfile, None, vA[0])
    A_all, B_all = tensors[vA[0]], tensors[vB[0]]
    for k, v in ((vA[0], A_all), (vB[0], B_all)):
        _check_2d(v, wfile, None, k)
        _check_float(v, wfile, None, k)
    _require(A_all.shape[0] >= r, f"vera_A {tuple(A_all.shape)} has fewer than r={r} rows", wfile, None, vA[0])
    _require(B_all.shape[1] >= r, f"vera_B {tuple(B_all.shape)} has fewer than r={r} columns", wfile, None, vB[0])
    A_all, B_all = A_all[:r], B_all[:, :r]
    allowed = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}
    groups = _split_peft_keys(tensors, wfile, allowed, extra_ok=lambda k: k in shared)
    if not groups:
        raise AdapterError("no VeRA tensors found", file=wfile)
    disk = lambda m, n: f"{PEFT_PREFIX}{m}.vera_{n}"  # noqa: E731
    _check_modules_complete(groups, ("lambda_b", "lambda_d"), wfile, disk)
    if base is None:
        raise AdapterError("VeRA adapters need --base: each layer's input size (how vera_A is "
                           "sliced) is not recorded in the adapter", file=path)
    shapes = base_weight_shapes(base)
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        for n, v in t.items():
            _require(v.ndim == 1, f"expected a 1-D tensor, got shape {tuple(v.shape)}", wfile, module, disk(module, n))
            _check_float(v, wfile, module, disk(module, n))
        ld, lb = t["lambda_d"], t["lambda_b"]
        _require(ld.shape == (r,), f"shape mismatch: vera_lambda_d {tuple(ld.shape)} vs r={r}", wfile, module, disk(module, "lambda_d"))
        key = f"{module}.weight"
        if key not in shapes:
            raise AdapterError("targeted module not found in the base model", file=base, module=module, tensor=key)
        d_out, d_in = shapes[key]
        _require(lb.shape == (d_out,), f"shape mismatch with the base model: vera_lambda_b {tuple(lb.shape)} "
                 f"vs d_out {d_out}", wfile, module, disk(module, "lambda_b"))
        _require(d_in <= A_all.shape[1] and d_out <= B_all.shape[0],
                 f"shared vera_A {tuple(A_all.shape)} / vera_B {tuple(B_all.shape)} too small for "
                 f"[{d_out}, {d_in}]", wfile, module, vA[0])
        entries[module] = _vera_entry(A_all, B_all, ld, lb, d_in)
    return AdapterDeltas(path, "peft_vera", "vera", entries,
                         base_model_name_or_path=cfg.get("base_model_name_or_path"),
                         dtype=_dtype_of(tensors), config=cfg)


DORA_LORA_SUFFIXES = {
    "lora_a_linear.weight": "lora_A",
    "lora_b_linear.weight": "lora_B",
    "lora_scaler": "lora_c",
}


def _strip_wrapper(key: str) -> str:
    """The DoRA wrapper holds the HF model as ``.model``: ``model.model.layers...`` ->
    ``model.layers...``; ``model.lm_head.weight`` -> ``lm_head.weight``."""
    return key[len("model."):] if key.startswith("model.") else key


def _read_dora(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    ckpt = _dora_dir(path)
    if ckpt is None:
        raise AdapterError(f"not a dynamic-rank DoRA checkpoint: needs {DORA_WEIGHTS}"
                           f" (+ {DORA_PRUNE})", file=path)
    wfile = ckpt / DORA_WEIGHTS
    tensors = load_safetensors(wfile)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    linear: dict[str, torch.Tensor] = {}  # module -> its .linear.weight (the frozen base)
    others: dict[str, torch.Tensor] = {}  # base-name -> tensor (norms, embeddings, lm_head...)
    disk: dict[tuple[str, str], str] = {}
    for key, t in tensors.items():
        for suffix, short in DORA_LORA_SUFFIXES.items():
            if key.endswith("." + suffix):
                module = _strip_wrapper(key[: -len(suffix) - 1])
                groups.setdefault(module, {})[short] = t
                disk[(module, short)] = key
                break
        else:
            if key.endswith(".linear.weight"):
                linear[_strip_wrapper(key[: -len(".linear.weight")])] = t
            elif key.endswith(".linear.bias"):
                others[_strip_wrapper(key).replace(".linear.bias", ".bias")] = t
            else:
                others[_strip_wrapper(key)] = t
    if not groups:
        raise AdapterError("no DoRA tensors (lora_a_linear / lora_scaler / lora_b_linear) found", file=wfile)
    _check_modules_complete(groups, ("lora_A", "lora_c", "lora_B"), wfile,
                            lambda m, n: disk.get((m, n), f"model.{m}.{ {v: k for k, v in DORA_LORA_SUFFIXES.items()}[n]}"))
    prune_file = ckpt / DORA_PRUNE
    masks: dict[str, torch.Tensor] = {}
    if prune_file.is_file():
        obj = load_pickle_weights(prune_file)
        if not isinstance(obj, dict) or "finally_mask_dict" not in obj or not isinstance(obj["finally_mask_dict"], dict):
            raise AdapterError("expected a dict with 'finally_mask_dict' {module: bool mask}", file=prune_file)
        for k, v in obj["finally_mask_dict"].items():
            if not isinstance(v, torch.Tensor):
                raise AdapterError("mask is not a tensor", file=prune_file, module=str(k), tensor="finally_mask_dict")
            masks[str(k)] = v
    # The pruning wrapper names modules relative to the HF model or to the DoRA wrapper.
    mask_for: dict[str, torch.Tensor] = {}
    for k, v in masks.items():
        m = k if k in groups else _strip_wrapper(k)
        if m not in groups:
            raise AdapterError("mask for a module that has no DoRA tensors", file=prune_file, module=k,
                               tensor="finally_mask_dict")
        mask_for[m] = v
    entries: dict[str, ModuleEntry] = {}
    alpha_opt = opts.get("lora_alpha")
    r0s = set()
    for module in sorted(groups):
        t = groups[module]
        A, c, B = t["lora_A"], t["lora_c"], t["lora_B"]
        for n, v in t.items():
            _check_float(v, wfile, module, disk[(module, n)])
        _check_2d(A, wfile, module, disk[(module, "lora_A")])
        _check_2d(B, wfile, module, disk[(module, "lora_B")])
        r0 = A.shape[0]
        r0s.add(r0)
        _require(c.shape == (r0,), f"shape mismatch: lora_scaler {tuple(c.shape)} vs start rank {r0}", wfile, module, disk[(module, "lora_c")])
        _require(B.shape[1] == r0, f"shape mismatch: lora_b_linear {tuple(B.shape)} vs lora_a_linear {tuple(A.shape)}", wfile, module, disk[(module, "lora_B")])
        pruned = mask_for.get(module)
        if pruned is not None:
            _require(pruned.shape == (r0,), f"mask shape {tuple(pruned.shape)} vs start rank {r0}", prune_file, module, "finally_mask_dict")
            pruned = pruned.to(torch.bool)
        lin = linear.get(module)
        if lin is not None:
            _require(tuple(lin.shape) == (B.shape[0], A.shape[1]), f"shape mismatch: linear.weight {tuple(lin.shape)} vs "
                     f"delta [{B.shape[0]}, {A.shape[1]}]", wfile, module, f"model.{module}.linear.weight")
        alpha = float(alpha_opt) if alpha_opt is not None else _dora_default_alpha(r0)
        entries[module] = _dyrank_entry(A, c, B, alpha / r0, pruned)
    notes = []
    if alpha_opt is None:
        notes.append("lora_alpha is not stored in DoRA checkpoints; assumed the target rank "
                     + ", ".join(f"{_dora_default_alpha(r0):g} (start rank {r0})" for r0 in sorted(r0s))
                     + " (override with --lora-alpha)")
    # The checkpoint carries its own frozen base: its fingerprints tie the adapter to that base.
    from .fingerprint import fingerprint_tensor

    fps = {m: fingerprint_tensor(linear[m]) for m in entries if m in linear}
    d = AdapterDeltas(path, "dora_dyrank", "dyrank", entries, base_fingerprints=fps or None,
                      dtype=_dtype_of({k: v for k, v in tensors.items() if v.is_floating_point()}),
                      config={"lora_alpha": alpha_opt, "start_ranks": sorted(r0s)}, notes=notes)
    d._dora_frozen = (wfile, linear, others)  # checked against --base in read_adapter
    return d


def _dora_default_alpha(r0: int) -> float:
    """The DoRA recipe starts at ``r0 = ceil(1.5 · r_target)`` with ``lora_alpha = r_target``
    (the published fixture: r0 12, alpha 8)."""
    return float(round(r0 / 1.5))


def _check_dora_frozen(d: AdapterDeltas, base: Path) -> None:
    """Everything in a DoRA checkpoint that is not a LoRA tensor must equal the base."""
    from safetensors import safe_open

    wfile, linear, others = d._dora_frozen
    wanted = {f"{m}.weight": (f"model.{m}.linear.weight", t, m) for m, t in linear.items()}
    for k, t in others.items():
        wanted[k] = (f"model.{k}", t, k.rsplit(".", 1)[0])
    seen = set()
    for f in sorted(Path(base).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key not in wanted:
                    continue
                seen.add(key)
                disk_key, t, module = wanted[key]
                b = fh.get_tensor(key)
                if tuple(b.shape) != tuple(t.shape) or not torch.equal(b.to(t.dtype), t):
                    what = ("differs from the base model's" if tuple(b.shape) == tuple(t.shape)
                            else f"shape {list(t.shape)} differs from the base's {list(b.shape)}")
                    raise AdapterError(
                        f"{what} {key}: the checkpoint changed weights a LoRA cannot carry",
                        file=wfile, module=module, tensor=disk_key)
    missing = sorted(set(wanted) - seen)
    if missing:
        disk_key, _, module = wanted[missing[0]]
        raise AdapterError(f"the base model has no {missing[0]}: checkpoint and base do not match",
                           file=wfile, module=module, tensor=disk_key)


def _dtype_of(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


READERS: dict[str, Callable[[Path, Path | None, dict], AdapterDeltas]] = {
    "native": _read_native,
    "three_matrix": lambda p, b, o: _read_peft_lora(p, b, o, three=True),
    "peft_lora": lambda p, b, o: _read_peft_lora(p, b, o, three=False),
    "peft_adalora": _read_peft_adalora,
    "peft_vera": _read_peft_vera,
    "dora_dyrank": _read_dora,
}


def read_adapter(path: str | Path, *, base: str | Path | None = None, fmt: str | None = None,
                 lora_alpha: float | None = None, adalora_ranknum: str = "init_r") -> AdapterDeltas:
    """Read any supported adapter into per-module deltas.

    ``base``: the base model directory. When given, every targeted module must exist in it
    with the adapter's shape, recorded fingerprints must match, and the result's
    ``base_fingerprints`` are the base's. ``fmt`` forces a format (see :data:`FORMATS`).
    ``lora_alpha``: the dynamic-rank DoRA alpha (not stored in its checkpoints).
    """
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in READERS:
        raise AdapterError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", file=path)
    elif not path.is_dir():
        raise AdapterError("not a directory (an adapter is a directory)", file=path)
    base = Path(base) if base is not None else None
    opts = {"lora_alpha": lora_alpha, "adalora_ranknum": adalora_ranknum}
    d = READERS[fmt](path, base, opts)
    if not d.entries:
        raise AdapterError("the adapter targets no modules", file=path)
    if base is not None:
        if fmt == "dora_dyrank":
            # Names the exact tensor that differs, so it runs before the fingerprint check.
            _check_dora_frozen(d, base)
        d.base_fingerprints = check_against_base(d, base)
    return d
