"""``nora-convert SRC OUT`` / ``nora-convert SRC... OUT_DIR``: fold adapters into stock PEFT LoRA.

The format of each source is detected from its contents (``--format`` forces one). The output
is a PEFT LoRA directory that stock vLLM loads with ``--enable-lora``; every module is folded
at its exact minimal rank unless ``--max-rank`` / ``--tolerance`` ask for truncation, and the
per-module table reports the exact relative error that costs. Exit status: 0 on success,
1 when any source failed (one line per failure on stderr: file, module, tensor, reason), 2 on
usage errors. Results go to stdout; warnings, errors and the progress bar (only when stderr is
a terminal) to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on shared cores spinning made the fold 5x
# slower (measured 2.1 s vs 0.39 s per 7B layer on 2 busy cores). Read when torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from nora_serve.cli import (DTYPE_CHOICES, EXIT_ERROR, EXIT_OK, add_version_flag, usage_error,
                            warn, warnings_to_stderr)
from nora_serve.converters import FORMATS, AdapterError, convert_adapter, detect_format
from nora_serve.converters.formats import formats, get_format, names_base

PROG = "nora-convert"

def _formats_help() -> str:
    """One line per registered adapter format, from its own summary."""
    lines = [f"  {f.name:<13} {f.summary}" for f in formats()]
    return "formats (detected automatically):\n" + "\n".join(lines) + "\n\n"


EPILOG = """\
With several sources the last argument is a directory; each source goes to OUT_DIR/<name>.
A native NoRA / LoRA-XS / IntTune adapter from nora-train holds only its own tensors and names
its shared basis by digest: it is found in the store's bases/ folder beside the adapter
(<adapter>/../bases/<digest>.safetensors), with --basis, or in the user basis cache
($NORA_BASIS_CACHE, default ~/.cache/nora-serve/bases). --export-native SRC OUT writes it as
one self-contained directory (basis embedded, format_version 1) for sharing.
Each output says which base check ran ("base check: ..." on stdout, "base_check" in
nora_convert.json). A source whose format names no base (a dynamic-rank DoRA checkpoint):
give --base or --base-model-name-or-path (else exit 2).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Fold adapters (NoRA, LoRA-XS, SLoRA/NLoRA/IntTune, dynamic-rank DoRA, PEFT LoRA/"
                    "AdaLoRA/VeRA/PiSSA) exactly into stock PEFT LoRA directories for vLLM.",
        epilog=_formats_help() + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC OUT, or SRC... OUT_DIR")
    add_version_flag(p)
    p.add_argument("--base", metavar="MODEL",
                   help="base model (a directory, or a Hub id in the local cache) to CHECK the "
                        "adapter against: shapes, and weight fingerprints where the adapter records "
                        "them or names a base found here (required for VeRA). It never relabels: "
                        "the output keeps the source's base_model_name_or_path (made absolute); "
                        "--base is recorded only where the source names none")
    p.add_argument("--base-model-name-or-path", metavar="NAME", dest="base_model_name_or_path",
                   help="record NAME as the output's base_model_name_or_path on purpose (a path "
                        "is made absolute; a Hub id is kept), instead of the source's")
    p.add_argument("--format", choices=FORMATS, help="force the source format")
    p.add_argument("--max-rank", type=int, metavar="K", help="refuse (or, with truncation allowed, "
                   "truncate) modules whose exact rank exceeds K")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="EPS",
                   help="truncate each module while its relative Frobenius error stays <= EPS")
    p.add_argument("--allow-truncation", action="store_true",
                   help="truncate modules above --max-rank instead of failing")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="output dtype [auto: the source's]")
    p.add_argument("--lora-alpha", "--alpha", type=float, metavar="ALPHA",
                   help="dynamic-rank DoRA only: the lora_alpha it was trained with (not stored "
                        "in its checkpoints; default: the target rank round(r0 / 1.5), i.e. the "
                        "DoRA recipe's r0 = ceil(1.5 * target))")
    p.add_argument("--compute-dtype", choices=["float64", "float32"], default="float64",
                   help="fold arithmetic: float64 (default, exact ranks) or float32 (faster; "
                        "components below 1.2e-4 of a module's largest singular value are "
                        "dropped, and the error that costs is reported)")
    p.add_argument("--verify", action="store_true",
                   help="recompute the source method's forward on random inputs and report the "
                        "worst relative error")
    p.add_argument("--basis", metavar="FILE_OR_DIR",
                   help="where to look first for a native adapter's shared basis: a basis file "
                        "<digest>.safetensors, or a directory of them (then the store's bases/ "
                        "beside the adapter, then the user basis cache)")
    p.add_argument("--export-native", action="store_true",
                   help="instead of folding: write native adapter SRC to OUT as one "
                        "self-contained directory (its shared basis embedded, format_version 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", "--no-progress", action="store_true",
                   help="no table, no progress bar (the bar shows only when stderr is a terminal)")
    return p


def _out_name(src: Path) -> str:
    src = src.resolve()
    # A DoRA checkpoint is usually <run>/checkpoint: name it after the run.
    return src.parent.name if src.name == "checkpoint" and src.parent.name else src.name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse's message, exit 2
    if len(args.paths) < 2:
        return usage_error(parser, "need SRC and OUT (or SRC... OUT_DIR)")
    if args.max_rank is not None and args.max_rank < 1:
        return usage_error(parser, f"--max-rank must be >= 1, got {args.max_rank}")
    if not 0.0 <= args.tolerance < 1.0:
        return usage_error(parser, f"--tolerance must be in [0, 1), got {args.tolerance}")
    *srcs, out = [Path(p) for p in args.paths]
    if args.export_native:
        if len(srcs) != 1:
            return usage_error(parser, "--export-native takes one SRC and OUT")
        with warnings_to_stderr(PROG):
            return _export(args, srcs[0], out)
    if len(srcs) == 1:
        jobs = [(srcs[0], out)]
    else:
        if out.exists() and not out.is_dir():
            return usage_error(parser, f"{out}: not a directory")
        names = [_out_name(s) for s in srcs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            return usage_error(parser, f"several sources would be written to {out / dup[0]}")
        jobs = [(s, out / n) for s, n in zip(srcs, names)]
    if args.base is None and args.base_model_name_or_path is None:
        for s in srcs:  # a format that names no base: refuse before writing a null identity
            fmt = _format_of(s, args.format)
            if fmt is not None and not names_base(fmt):
                return usage_error(parser, f"{s}: {get_format(fmt).what} names no base "
                                           "model: pass --base BASE or --base-model-name-or-path NAME")
    with warnings_to_stderr(PROG):
        return _run(args, jobs)


def _export(args: argparse.Namespace, src: Path, out: Path) -> int:
    from nora_serve.converters.export_native import export_native

    try:
        d = export_native(src, out, basis=args.basis, overwrite=args.overwrite)
    except AdapterError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"{PROG}: error: {src}: {e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    digest = (d.shared_basis or {}).get("digest") if isinstance(d.shared_basis, dict) else None
    what = f"basis {digest} embedded from {d.basis_path}" if d.basis_path else "as it was"
    print(f"{src} -> {out}: self-contained native {d.method} adapter, format_version 1 "
          f"({len(d.entries)} modules; {what})")
    return EXIT_OK


def _format_of(src: Path, fmt: str | None) -> str | None:
    if fmt is not None:
        return fmt
    try:
        return detect_format(src)
    except AdapterError:
        return None  # reported when that source is converted


def _run(args: argparse.Namespace, jobs: list[tuple[Path, Path]]) -> int:
    failed = 0
    for src, dst in jobs:
        try:
            rep = convert_adapter(
                src, dst, base=args.base, fmt=args.format, max_rank=args.max_rank,
                tolerance=args.tolerance, allow_truncation=args.allow_truncation,
                dtype=None if args.dtype == "auto" else args.dtype, verify=args.verify,
                overwrite=args.overwrite,
                progress=not args.quiet, lora_alpha=args.lora_alpha,
                compute_dtype=getattr(torch, args.compute_dtype),
                base_model_name_or_path=args.base_model_name_or_path, basis=args.basis)
        except AdapterError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        except OSError as e:  # disk full, permissions: still one line, never a traceback
            print(f"{PROG}: error: {src}: {e.strerror or e}", file=sys.stderr)
            failed += 1
            continue
        if not args.quiet:
            print(f"{src} -> {dst}  [{rep.format}, method {rep.method}, dtype {rep.dtype}]")
            print(rep.table())
        n_mod = sum(1 for r in rep.rows if r[2] > 0)
        line = (f"{dst}: {n_mod} modules, max rank {rep.max_rank}, "
                f"max truncation error {rep.max_rel_error:.3e}")
        if rep.verify_error is not None:
            line += f", verify: worst relative error {rep.verify_error:.3e}"
        print(line)
        print(f"{dst}: {rep.base_check}")
        for note in rep.notes:  # an assumption the result rests on: a warning, on stderr
            warn(PROG, note)
    return EXIT_ERROR if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
