"""The shared basis of a training run: computed once per (base, method, settings), then found.

A shared-basis method's frozen pair (NoRA's and LoRA-XS's SVD factors, IntTune's Nyström
slices) depends only on the base weights and the method's settings, named by a *recipe*
(:func:`~nora_serve.converters.basis_file.recipe_key`). The trainer takes, in order: the file
given with ``--basis`` (checked against this base), a basis made by the same recipe (the user
basis cache's index, or the headers of the files in the store's ``bases/`` and the cache), or
computes it and writes it to the cache. The adapter then names it by digest (format_version 2)
and ``NativeAdapter.save`` puts it into the store's ``bases/``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from nora_serve.converters.basis_file import (CACHE_ENV, basis_key, cache_dir, find_by_recipe, read_basis,
                                              recipe_key, remember_recipe, write_basis)
from nora_serve.converters.errors import AdapterError, NoraWarning
from nora_serve.methods import Method


@dataclass
class RunBasis:
    """The basis a run trains against."""

    tensors: dict[str, dict[str, torch.Tensor]]  # {module: {shared name: tensor}}, float32
    digest: str
    recipe: str
    source: str  # "computed", "recipe" (found by recipe) or "--basis"
    path: Path | None  # the file it came from or was written to (None: the cache is not writable)
    seconds: float  # to compute or to find and read it
    calibration: dict | None  # the calibration settings it was made with

    def log(self) -> dict:
        return {"digest": self.digest, "recipe": self.recipe, "source": self.source,
                "path": str(self.path) if self.path else None, "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        if self.source == "computed":
            return f"shared basis {self.digest}: computed in {self.seconds:.1f} s"
        how = "found by recipe" if self.source == "recipe" else "from --basis"
        return f"shared basis {self.digest}: {how} ({self.path})"


def _check_basis(path: Path, meta: dict, tensors: dict, spec: Method, r: int,
                 fps: dict[str, str], calibration: dict | None) -> None:
    """The basis must be this method's, of rank ``r``, and made from this base: every targeted
    module present with the base weight's fingerprint."""
    if meta.get("rule") != spec.shared_rule:
        raise AdapterError(f"basis of rule {meta.get('rule')!r} (method {meta.get('method')}), "
                           f"not {spec.name}'s {spec.shared_rule!r}", file=path)
    if meta.get("r") != r:
        raise AdapterError(f"basis of rank {meta.get('r')}, not the --rank {r} asked for", file=path)
    if calibration is not None and meta.get("calibration") != calibration:
        raise AdapterError("basis made with other calibration settings than --calibration gives "
                           f"(basis {meta.get('calibration')}, this run {calibration})", file=path)
    made_for = meta.get("base_fingerprints") or {}
    for m, fp in fps.items():
        if f"{m}.A" not in tensors or f"{m}.B" not in tensors:
            raise AdapterError("the basis has no tensors for a targeted module", file=path, module=m,
                               tensor=f"{m}.A")
        if made_for.get(m) != fp:
            raise AdapterError(f"basis made from another base model (its fingerprint "
                               f"{made_for.get(m)}, this base's {fp})", file=path, module=m,
                               tensor=f"{m}.weight")


def _per_module(flat: dict[str, torch.Tensor], spec: Method, names: Iterable[str]) -> dict:
    a, b = spec.shared
    return {n: {a: flat[f"{n}.A"].to(torch.float32).contiguous(),
                b: flat[f"{n}.B"].to(torch.float32).contiguous()} for n in names}


def _compute(spec: Method, r: int, names: list[str], weights: Iterable[tuple[str, torch.Tensor]],
             act_scales: dict | None, progress: bool) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    a, b = spec.shared
    flat: dict[str, torch.Tensor] = {}
    # disable=None: a bar only when stderr is a terminal (no "\r" lines in logs).
    with tqdm(total=len(names), desc=f"basis {spec.name}", unit="module", leave=False,
              disable=None if progress else True, dynamic_ncols=True) as bar:
        for n, W0 in weights:
            t = spec.basis(W0, r, (act_scales or {}).get(n))
            # float32, as the layers hold them: the digest is over exactly what trains.
            flat[f"{n}.A"] = t[a].to(torch.float32).contiguous()
            flat[f"{n}.B"] = t[b].to(torch.float32).contiguous()
            bar.update(1)
    return flat


def run_basis(spec: Method, *, r: int, names: list[str], fps: dict[str, str], calibration: dict | None,
              weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
              act_scales: Callable[[], dict | None], explicit: str | None, store: Path | None,
              base_name: str, progress: bool) -> RunBasis:
    """The run's basis: ``explicit`` (``--basis``), else one made by the same recipe (in
    ``store``, the adapter store's ``bases/``, or the user cache), else computed (``weights()``
    and ``act_scales()`` are called only then) and written to the user cache."""
    t0 = time.perf_counter()
    targets = {n: fps[n] for n in names}
    recipe = recipe_key(spec.name, spec.shared_rule, r, calibration, targets)
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such basis file (--basis)")
        flat, meta = read_basis(path)
        _check_basis(path, meta, flat, spec, r, targets, calibration)
        return RunBasis(_per_module(flat, spec, names), meta["digest"], recipe, "--basis", path,
                        time.perf_counter() - t0, meta.get("calibration"))
    found = find_by_recipe(recipe, [d for d in (store, cache_dir()) if d is not None])
    if found is not None:
        try:
            flat, meta = read_basis(found)
            if meta.get("recipe") != recipe:
                raise AdapterError(f"its recipe is {meta.get('recipe')}, not {recipe}", file=found)
            _check_basis(found, meta, flat, spec, r, targets, calibration)
            return RunBasis(_per_module(flat, spec, names), meta["digest"], recipe, "recipe", found,
                            time.perf_counter() - t0, meta.get("calibration"))
        except AdapterError as e:  # a damaged or foreign file: computed again below
            warnings.warn(f"ignoring basis {e}; computing it again", NoraWarning, stacklevel=2)
    flat = _compute(spec, r, names, weights(), act_scales(), progress)
    digest = basis_key(flat)
    meta = {"method": spec.name, "rule": spec.shared_rule, "r": r, "calibration": calibration,
            "base_model_name_or_path": base_name, "base_fingerprints": targets, "recipe": recipe}
    path = None
    try:
        path = write_basis(cache_dir(), flat, meta)
        remember_recipe(recipe, digest)
    except OSError as e:  # the cache is an optimisation: train on without it
        warnings.warn(f"could not write the basis cache {cache_dir()} ({e.strerror or e}); "
                      f"set {CACHE_ENV} to a writable directory to reuse this basis",
                      NoraWarning, stacklevel=2)
    return RunBasis(_per_module(flat, spec, names), digest, recipe, "computed", path,
                    time.perf_counter() - t0, calibration)
