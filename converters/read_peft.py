"""Stock PEFT adapters: LoRA (rank/alpha patterns, rsLoRA; PiSSA/OLoRA saved converted), DoRA
(``use_dora``: read, never folded), AdaLoRA and VeRA, each mapped onto its registered method.
The LoRA layout reader also serves the official three-matrix methods
(:mod:`.read_three_matrix`), which add ``lora_N`` per module."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nora_serve.methods import get_method

from .adapter_deltas import AdapterDeltas, ModuleEntry
from .errors import AdapterError
from .method_entries import method_entry
from .peft_layout import (
    CONFIG,
    PEFT_PREFIX,
    _check_residual_init,
    _pattern_value,
    _peft_weights_file,
    _reject_unfoldable_peft_features,
    _split_peft_keys,
)
from .reader_common import (
    _check_2d,
    _check_alpha,
    _check_float,
    _check_modules_complete,
    _check_tensors,
    _dtype_of,
    _num,
    _require,
    base_weight_shapes,
)
from .tensors_io import load_weights, read_json


# The on-disk suffix of a method tensor in PEFT's layout (default ``<name>.weight``).
PEFT_SUFFIX = {"lora_magnitude": "lora_magnitude_vector"}


def _peft_suffix(name: str) -> str:
    return PEFT_SUFFIX.get(name, f"{name}.weight")


def _peft_scale(cfg: dict, module: str, rank: int, file: Path, tensor: str, method: str = "lora") -> float:
    r_cfg = _pattern_value(cfg.get("rank_pattern") or {}, module)
    r_cfg = int(cfg["r"]) if r_cfg is None else int(r_cfg)
    if r_cfg != rank:
        raise AdapterError(f"rank {rank} on disk, but the config gives r={r_cfg} for this module "
                           "(r / rank_pattern)", file=file, module=module, tensor=tensor)
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module)
    alpha = float(cfg["lora_alpha"]) if alpha is None else float(alpha)
    return get_method(method).scale({"r": rank, "lora_alpha": alpha, "use_rslora": cfg.get("use_rslora")})


def _read_lora_layout(path: Path, method: str, *, peft_init: bool = True
                      ) -> tuple[dict, dict[str, ModuleEntry], torch.dtype]:
    """PEFT's LoRA layout holding the tensors of ``method`` (a registered method that PEFT's
    LoRA layout stores: lora, dora, or a three-matrix one with ``lora_N``): ``(config, entries,
    storage dtype)``. ``peft_init``: ``init_lora_weights`` is PEFT's (residualising inits are
    refused), not the official three-matrix code's."""
    spec = get_method(method)
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    _num(cfg, "r", cfg_path, kind=int)
    _check_alpha(cfg, cfg_path)
    _reject_unfoldable_peft_features(cfg, cfg_path)
    if peft_init:
        _check_residual_init(cfg, cfg_path)
    wfile = _peft_weights_file(path)
    tensors = load_weights(wfile)
    names = spec.tensors
    allowed = {_peft_suffix(n): n for n in names}
    groups = _split_peft_keys(tensors, wfile, allowed)
    if not groups:
        raise AdapterError("no LoRA tensors found", file=wfile)
    if cfg.get("use_dora") and not any("lora_magnitude" in g for g in groups.values()):
        raise AdapterError("use_dora=true, but the weights hold no lora_magnitude_vector (DoRA "
                           "needs one per module)", file=cfg_path)
    disk = lambda m, n: f"{PEFT_PREFIX}{m}.{_peft_suffix(n)}"  # noqa: E731
    _check_modules_complete(groups, names, wfile, disk)
    entries: dict[str, ModuleEntry] = {}
    for module in sorted(groups):
        t = groups[module]
        _check_tensors(t, wfile, module, disk, vectors=spec.vectors)
        bad = spec.check(t)
        if bad is not None:
            _require(False, f"shape mismatch: {bad[1]}", wfile, module, disk(module, bad[0]))
        scale = _peft_scale(cfg, module, t["lora_A"].shape[0], cfg_path, disk(module, "lora_A"), method)
        what = "use_dora=true (weight-decomposed DoRA)" if cfg.get("use_dora") else None
        entries[module] = method_entry(spec, t, scale, file=cfg_path, what=what)
    return cfg, entries, _dtype_of(tensors)


def _read_peft_lora(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    # PEFT's use_dora (weight-decomposed DoRA) is its own method: read, never folded.
    use_dora = bool(read_json(path / CONFIG).get("use_dora"))
    method = "dora" if use_dora else "lora"
    cfg, entries, dtype = _read_lora_layout(path, method)
    return AdapterDeltas(path, "peft_lora", method, entries,
                         base_model_name_or_path=cfg.get("base_model_name_or_path"),
                         dtype=dtype, config=cfg)


def _read_peft_adalora(path: Path, base: Path | None, opts: dict) -> AdapterDeltas:
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    _reject_unfoldable_peft_features(cfg, cfg_path)
    alpha = _check_alpha(cfg, cfg_path, allow_zero=True)  # PEFT's AdaLoRA: 0 means alpha = r
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
        _check_tensors(t, wfile, module, disk)
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
        a = alpha if alpha > 0 else float(r)
        entries[module] = method_entry("adalora", t, get_method("adalora").scale({"lora_alpha": a, "ranknum": ranknum}))
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
        _check_tensors(t, wfile, module, disk, vectors=("lambda_b", "lambda_d"))
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
        vera = {"vera_A": A_all[:, :d_in], "vera_B": B_all[:d_out, :], "lambda_d": ld, "lambda_b": lb}
        entries[module] = method_entry("vera", vera, 1.0, raw={"vera_lambda_d": ld, "vera_lambda_b": lb})
    return AdapterDeltas(path, "peft_vera", "vera", entries,
                         base_model_name_or_path=cfg.get("base_model_name_or_path"),
                         dtype=_dtype_of(tensors), config=cfg)
