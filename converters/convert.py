"""Read any supported adapter, fold each module at its exact minimal rank, write stock PEFT LoRA."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_dir
from .base_identity import BaseCheck, compare_named_base, find_base, local_model_dir, resolve_identity
from .errors import AdapterError
from .fold import RankError, fold
from .formats import get_format, names_base
from .peft_writer import write_peft_lora
from .readers import AdapterDeltas, read_adapter

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise AdapterError(f"unknown dtype {dtype!r} (use float32, float16 or bfloat16)") from None


@dataclass
class ConvertReport:
    src: Path
    out: Path
    format: str
    method: str
    rows: list[tuple[str, int, int, float]]  # (module, source_rank, folded rank, rel_error)
    dtype: str
    verify_error: float | None = None  # worst relative error of --verify, over modules
    notes: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None  # the identity written
    base_check: str = ""  # one line: what the check against a base covered

    @property
    def max_rank(self) -> int:
        return max((r for _, _, r, _ in self.rows), default=0)

    @property
    def max_rel_error(self) -> float:
        return max((e for *_, e in self.rows), default=0.0)

    def table(self) -> str:
        w = max([len("module")] + [len(m) for m, *_ in self.rows])
        lines = [f"{'module':<{w}}  {'src rank':>8}  {'rank':>5}  {'rel error':>10}"]
        for m, k, r, e in self.rows:
            lines.append(f"{m:<{w}}  {k:>8}  {r:>5}  {e:>10.3e}")
        return "\n".join(lines)


def _fold_all(d: AdapterDeltas, *, max_rank, tolerance, allow_truncation, out_dtype,
              compute_dtype, progress) -> tuple[dict, list]:
    folded, rows = {}, []
    names = list(d.entries)
    it = names
    if progress:
        from tqdm import tqdm

        # disable=None: no bar (no "\r" lines in logs) when stderr is not a terminal.
        it = tqdm(names, desc=f"fold {d.path.name}", unit="module", leave=False, disable=None)
    for m in it:
        try:
            f = fold(d.entries[m].for_fold(compute_dtype), max_rank=max_rank, tolerance=tolerance,
                     allow_truncation=allow_truncation, out_dtype=out_dtype,
                     compute_dtype=compute_dtype, name=m)
        except RankError as e:
            raise AdapterError(e.reason, file=d.path, module=m) from None
        rows.append((m, d.entries[m].source_rank, f.rank, f.rel_error))
        if f.rank > 0:
            folded[m] = (f.B, f.A)
        for t in (f.B, f.A):
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"folded factors overflow {out_dtype} (use a wider --dtype)",
                                   file=d.path, module=m)
    return folded, rows


def verify_folded(d: AdapterDeltas, folded: dict, *, n: int = 16, seed: int = 0) -> float:
    """Worst, over modules, of ``||f(x) - x A'ᵀ B'ᵀ|| / ||f(x)||`` where ``f`` is the source
    method's own forward on random ``x`` (float64), never the dense delta."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for m, e in d.entries.items():
        x = torch.randn(n, e.shape[1], generator=g, dtype=torch.float64)
        ref = e.forward(x)
        if m in folded:
            B, A = folded[m]
            got = (x @ A.to(torch.float64).T) @ B.to(torch.float64).T
        else:
            got = torch.zeros_like(ref)
        num, den = float((ref - got).norm()), float(ref.norm())
        err = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        worst = max(worst, err)
    return worst


def convert_adapter(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    fmt: str | None = None,
    max_rank: int | None = None,
    tolerance: float = 0.0,
    allow_truncation: bool = False,
    dtype: str | torch.dtype | None = None,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    lora_alpha: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
    base_model_name_or_path: str | None = None,
    deltas: AdapterDeltas | None = None,
    basis: str | os.PathLike | None = None,
) -> ConvertReport:
    """Convert the adapter at ``src`` into a PEFT LoRA directory at ``out`` (atomically).

    ``base``: base model directory or a Hub id in the local cache; checks shapes and
    fingerprints and is required by formats that need it (VeRA). It never relabels: the written
    ``base_model_name_or_path`` is the source's own (paths made absolute against the source
    directory), or ``base`` where the source names none; ``base_model_name_or_path`` sets it
    explicitly. ``max_rank``/``tolerance``/``allow_truncation``: see :func:`fold`.
    ``dtype``: output dtype (default: the source's). ``verify``: recompute the source method's
    forward on random inputs and report the worst relative error. ``lora_alpha``: alpha of
    dynamic-rank DoRA checkpoints, which do not store it. ``deltas``: ``src`` already read
    (``read_adapter`` with the same base, format and alpha), so that it is read once.
    ``basis``: a basis file or directory, looked at first for a core-only (format_version 2)
    native adapter's shared basis.
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise AdapterError("output must not be the source directory or inside it", file=out)
    if out.exists() and not overwrite:
        raise AdapterError("output already exists (pass --overwrite to replace it)", file=out)
    if max_rank is not None and max_rank < 1:
        raise AdapterError(f"max_rank must be >= 1, got {max_rank}")
    if not (0.0 <= tolerance < 1.0):
        raise AdapterError(f"tolerance must be in [0, 1), got {tolerance}")
    out_dtype = parse_dtype(dtype)
    base_dir = find_base(base) if base is not None else None
    d = deltas if deltas is not None else read_adapter(src, base=base_dir, fmt=fmt, lora_alpha=lora_alpha,
                                                           basis=basis)
    identity, notes = _base_identity(d, base, base_dir, base_model_name_or_path)
    check = getattr(d, "base_check", None) or BaseCheck(None, skipped="no --base given")
    out_dtype = out_dtype or d.dtype
    folded, rows = _fold_all(d, max_rank=max_rank, tolerance=tolerance,
                             allow_truncation=allow_truncation, out_dtype=out_dtype,
                             compute_dtype=compute_dtype, progress=progress)
    if not folded:
        raise AdapterError("every module's delta is exactly zero: nothing to serve", file=src)
    verify_error = verify_folded(d, folded) if verify else None
    base_name = identity["written"]
    meta = {
        "format": "nora-convert",
        "format_version": 1,
        "source": str(src.resolve()),
        "source_format": d.format,
        "method": d.method,
        "base_model_name_or_path": base_name,
        "base_identity": identity,
        "base_check": check.as_dict(),
        "base_fingerprints": d.base_fingerprints,
        "shared_basis": d.shared_basis,
        "basis_file": str(d.basis_path.resolve()) if d.basis_path is not None else None,
        "dtype": str(out_dtype).removeprefix("torch."),
        "max_rank": max_rank,
        "tolerance": tolerance,
        "modules": {m: {"source_rank": k, "rank": r, "rel_error": e} for m, k, r, e in rows},
        "max_rel_error": max((e for *_, e in rows), default=0.0),
        "verify_max_rel_error": verify_error,
        "notes": d.notes + notes,
    }
    task_type = d.config.get("task_type") if isinstance(d.config.get("task_type"), str) else "CAUSAL_LM"
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_peft_lora(tmp, folded, base_model_name_or_path=base_name, metadata=meta,
                            task_type=task_type)
    except FileExistsError as e:
        raise AdapterError(str(e), file=out) from None
    return ConvertReport(src, out, d.format, d.method, rows, meta["dtype"], verify_error,
                         list(d.notes) + notes, base_name, check.line())


def _base_identity(d: AdapterDeltas, base, base_dir: Path | None,
                   explicit: str | None) -> tuple[dict, list[str]]:
    """The ``base_model_name_or_path`` to write, where it came from, and warnings.

    Explicit > the source's own (resolved against the source directory) > ``--base`` when the
    source names none. ``--base`` only checks: it never replaces the source's identity."""
    notes: list[str] = []
    source = d.base_model_name_or_path if isinstance(d.base_model_name_or_path, str) else None
    source = source.strip() if source and source.strip() else None
    src_id = resolve_identity(source, relative_to=d.path)
    if explicit is not None and str(explicit).strip():
        written, set_by = resolve_identity(str(explicit), relative_to=Path.cwd()), "explicit"
        if base_dir is not None:  # a name set on purpose still has to hold the same weights
            compare_named_base(str(explicit), Path.cwd(), base_dir, d.base_fingerprints or {}, d.path)
    elif src_id is not None:
        written, set_by = src_id, "source"
        # A named base found here was compared by fingerprints in the check; one not here
        # could not be: say that --base did not replace it.
        if base_dir is not None and local_model_dir(source, relative_to=d.path) is None:
            notes.append(f"the source names base {src_id!r} (not found here) and was checked "
                         f"against --base {base}: kept the source's identity (set another "
                         "with --base-model-name-or-path)")
    elif base is not None:
        written, set_by = resolve_identity(str(base), relative_to=Path.cwd()), "--base"
    elif not names_base(d.format):
        raise AdapterError(f"{get_format(d.format).what} names no base model: pass --base BASE "
                           "(checked, and recorded as its base) or --base-model-name-or-path NAME",
                           file=d.path)
    else:
        written, set_by = None, "source"
        notes.append("the source names no base model (base_model_name_or_path is null; "
                     "AutoPeftModelForCausalLM cannot load it): pass --base or "
                     "--base-model-name-or-path to record one")
    return {"written": written, "set_by": set_by, "source": source}, notes
