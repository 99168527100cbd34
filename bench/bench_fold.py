"""Fold a synthetic rank-128 Llama-2-7B-shaped NLoRA adapter; compare with a naive fold.

    python bench/bench_fold.py [--layers 32] [--rank 128] [--compute float64,float32]
                               [--naive-modules 7] [--threads N]

The adapter (32 layers x q,k,v,o 4096x4096, gate,up 11008x4096, down 4096x11008; ``B N A``
with ``A``, ``N``, ``B`` random, fp32) is written once in the native format to a temporary
directory. Each measurement then runs in a fresh subprocess so its peak RSS is its own:

* ``fold``: ``convert_adapter`` end to end (read, fold every module, write PEFT LoRA), with the
  fold alone timed separately;
* ``naive``: the first layer's modules folded the naive way: dense ``ΔW = s B N A`` then a full
  SVD, truncated at the same rank threshold.
"""

from __future__ import annotations

import os

# As nora-convert does: idle OpenMP threads sleep rather than spin (matters on shared cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # module: (d_out, d_in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_adapter(out: Path, layers: int, r: int) -> None:
    from nora_serve.converters.native import NativeAdapter

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for m, (d_out, d_in) in SHAPES.items():
            tensors[f"model.layers.{i}.{m}"] = {
                "lora_A": torch.randn(r, d_in, generator=g) / d_in**0.5,
                "lora_N": torch.randn(r, r, generator=g) / r**0.5,
                "lora_B": torch.randn(d_out, r, generator=g) / r**0.5,
            }
    cfg = {"method": "nlora", "r": r, "lora_alpha": 2 * r,
           "base_model_name_or_path": "synthetic-llama-2-7b"}
    NativeAdapter(cfg, tensors).save(out)


def run_fold(src: Path, compute: str) -> dict:
    import nora_serve.converters.convert as conv
    from nora_serve.converters import convert_adapter

    dtype = getattr(torch, compute)
    fold_time = [0.0]
    real_fold_all = conv._fold_all

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real_fold_all(*a, **k)
        finally:
            fold_time[0] = time.perf_counter() - t

    conv._fold_all = timed  # time the fold apart from reading and writing
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        t = time.perf_counter()
        rep = convert_adapter(src, Path(tmp) / "out", progress=False, compute_dtype=dtype)
        total = time.perf_counter() - t
    ranks = sorted({r for _, _, r, _ in rep.rows})
    return {"what": f"fold ({compute})", "modules": len(rep.rows), "fold_s": fold_time[0],
            "total_s": total, "peak_rss_gib": peak_rss_gib(), "ranks": ranks}


def run_naive(src: Path, n_modules: int) -> dict:
    from nora_serve.converters import read_adapter
    from nora_serve.converters.fold import default_rtol

    d = read_adapter(src)
    names = [m for m in d.entries if m.startswith("model.layers.0.")][:n_modules]
    t = time.perf_counter()
    ranks = []
    for m in names:
        e = d.entries[m]
        A, N, B = (e.raw[k].double() for k in ("lora_A", "lora_N", "lora_B"))
        dW = (d.config["lora_alpha"] / d.config["r"]) * (B @ N @ A)  # dense [d_out, d_in]
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        k = int((S > default_rtol(torch.float64) * S[0]).sum())
        root = S[:k].sqrt()
        _B, _A = (U[:, :k] * root).float(), (root[:, None] * Vh[:k]).float()
        ranks.append(k)
        del dW, U, S, Vh
    el = time.perf_counter() - t
    return {"what": "naive (dense + SVD)", "modules": len(names), "fold_s": el, "total_s": el,
            "peak_rss_gib": peak_rss_gib(), "ranks": sorted(set(ranks))}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    src = Path(args.src)
    res = run_fold(src, args.child_compute) if args.child == "fold" else run_naive(src, args.naive_modules)
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--compute", default="float64,float32", help="fold compute dtypes to time")
    p.add_argument("--naive-modules", type=int, default=7, help="first-layer modules for the naive fold (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", default=None, help="where to write the synthetic adapter")
    p.add_argument("--child", choices=["fold", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--child-compute", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(dir=args.workdir) as wd:
        src = Path(wd) / "nlora_7b_r128"
        t = time.perf_counter()
        make_adapter(src, args.layers, args.rank)
        size = sum(f.stat().st_size for f in src.iterdir()) / 2**30
        print(f"synthetic NLoRA adapter: {args.layers} layers x 7 modules, rank {args.rank}, "
              f"{size:.2f} GiB fp32 (made in {time.perf_counter() - t:.1f} s)")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
              f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
        jobs = [("fold", c) for c in args.compute.split(",") if c]
        if args.naive_modules:
            jobs.append(("naive", ""))
        header = (f"\n{'what':<22} {'modules':>7} {'fold s':>8} {'s/module':>9} {'total s':>8} "
                  f"{'peak RSS':>9} {'threads':>7}  ranks")
        print(header, flush=True)
        for kind, compute in jobs:
            cmd = [sys.executable, __file__, "--child", kind, "--src", str(src),
                   "--naive-modules", str(args.naive_modules), "--threads", str(args.threads)]
            if compute:
                cmd += ["--child-compute", compute]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"{kind} failed:\n{out.stderr[-3000:]}")
                continue
            r = json.loads(line[0][7:])
            print(f"{r['what']:<22} {r['modules']:>7} {r['fold_s']:>8.2f} "
                  f"{r['fold_s'] / max(1, r['modules']):>9.4f} {r['total_s']:>8.2f} "
                  f"{r['peak_rss_gib']:>7.2f} G {r['threads']:>7}  {r['ranks']}", flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} at end (other processes share these cores)")


if __name__ == "__main__":
    main()
