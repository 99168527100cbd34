"""Official dynamic-rank DoRA checkpoints: ``model.safetensors`` (the wrapped model, frozen base
included) + ``prune_state_dict.pt`` (the pruning masks), optionally under ``checkpoint/``."""

from __future__ import annotations

import math

from pathlib import Path

import torch

from nora_serve.methods import get_method

from .adapter_deltas import AdapterDeltas, ModuleEntry
from .errors import AdapterError
from .method_entries import _dyrank_entry
from .peft_layout import CONFIG
from .reader_common import _check_2d, _check_float, _check_modules_complete, _dtype_of, _require
from .tensors_io import load_pickle_weights, load_safetensors, safetensors_keys

DORA_WEIGHTS = "model.safetensors"
DORA_PRUNE = "prune_state_dict.pt"


def _dora_dir(path: Path) -> Path | None:
    """Where the checkpoint lies (``path`` or ``path/checkpoint``), or None: not DoRA."""
    for d in (path, path / "checkpoint"):
        if (d / DORA_WEIGHTS).is_file() and (d / DORA_PRUNE).is_file():
            return d
    if (path / DORA_WEIGHTS).is_file() and not (path / CONFIG).exists():
        if any(k.endswith(".lora_scaler") for k in safetensors_keys(path / DORA_WEIGHTS)):
            return path
    return None


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
    if alpha_opt is not None and not (float(alpha_opt) > 0 and math.isfinite(float(alpha_opt))):
        raise AdapterError(f"lora_alpha must be a finite number > 0, got {alpha_opt}", file=path)
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
        entries[module] = _dyrank_entry(A, c, B, get_method("dyrank").scale({"r": r0, "lora_alpha": alpha}), pruned)
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
