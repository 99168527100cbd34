"""End-to-end demo: a tiny base model, three adapters of different methods trained on different
data with ``nora-train``, all served next to each other by ``nora-serve --enable-nora``.

    bash scripts/demo.sh          # or: python -m nora_serve.demo [--out demo_out]

Each adapter learns its own way to continue any prompt (a water chant, counting, people); the
table at the end shows the base model's continuation next to each adapter's for the same prompts.
One adapter is given on the command line (``--lora-modules``), one is loaded over HTTP, and one is
found by name in the adapter store (``--nora-adapter-dir``) on its first request.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

# (adapter name, training method, what it learns to say after any prompt)
# (Only words of the tiny model's 128-word vocabulary.)
ADAPTERS = (
    ("water", "lora", "water water oil water water oil"),
    ("counting", "nora", "one two one two one two"),
    ("people", "dyrank", "good people make good people make"),
)
PROMPTS = ("the old man said", "where is the water", "we live in a small house")


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def make_data(path: Path, answer: str, n: int, seed: int) -> None:
    from nora_serve.tiny import WORDS

    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS[:100]) for _ in range(rng.randint(3, 7)))
            fh.write(json.dumps({"prompt": prompt, "completion": " " + answer}) + "\n")


def train(base: Path, data: Path, method: str, out: Path, steps: int) -> float:
    t = time.time()
    cmd = [_bin("nora-train"), "--model", str(base), "--data", str(data), "--method", method,
           "--out", str(out), "--overwrite", "--rank", "8", "--alpha", "16", "--lr", "1e-2",
           "--max-steps", str(steps), "--batch-size", "16", "--schedule", "constant", "--no-progress"]
    from nora_serve.methods import get_method

    if "inner_r" in get_method(method).config_keys:  # NoRA's inner rank
        cmd += ["--inner-rank", "4"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.time() - t


def serve(base: Path, store: Path, static: dict[str, Path], cache: Path, log: Path):
    """nora-serve on the demo's base, store and cache (the launcher the tests share)."""
    from nora_serve.server_process import ServerProcess

    args = ["--enable-nora", "--nora-adapter-dir", str(store), "--nora-cache-dir", str(cache),
            "--nora-allow-runtime-loading",  # the demo's POST /v1/load_lora_adapter (local only)
            "--dtype", "float32", "--max-model-len", "128", "--gpu-memory-utilization", "0.05",
            "--lora-modules", *(f"{k}={v}" for k, v in static.items())]
    srv = ServerProcess(base, args, log=log)
    print("$ nora-serve", " ".join(srv.cmd[4:]), flush=True)
    return srv


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line, fmt(header), line, *map(fmt, rows), line])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="working directory [demo_out]")
    ap.add_argument("--steps", type=int, default=100, help="training steps per adapter [100]")
    ap.add_argument("--examples", type=int, default=128, help="training examples per adapter [128]")
    args = ap.parse_args(argv)

    from nora_serve.tiny import make_tiny_llama

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    if not (base / "config.json").is_file():
        make_tiny_llama(base)
    print(f"[demo] base model: {base}", flush=True)

    store = out / "store"  # the adapter store: servable by name
    trained = out / "trained"
    store.mkdir(exist_ok=True)
    trained.mkdir(exist_ok=True)
    paths: dict[str, Path] = {}
    for i, (name, method, answer) in enumerate(ADAPTERS):
        data = out / f"{name}.jsonl"
        make_data(data, answer, args.examples, seed=i)
        dest = (store if name == "people" else trained) / name
        secs = train(base, data, method, dest, args.steps)
        paths[name] = dest
        print(f"[demo] trained {name!r} ({method}) in {secs:.0f}s -> {dest}", flush=True)

    from openai import OpenAI
    import requests

    with serve(base, store, {"water": paths["water"]}, out / "cache", out / "server.log") as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
        r = requests.post(srv.url + "/v1/load_lora_adapter",
                          json={"lora_name": "counting", "lora_path": str(paths["counting"])}, timeout=300)
        print(f"[demo] POST /v1/load_lora_adapter counting -> {r.status_code} {r.text}", flush=True)

        models = [str(base)] + [n for n, _, _ in ADAPTERS]
        rows = []
        for prompt in PROMPTS:
            row = [prompt]
            for m in models:  # "people" is resolved from the store on its first request
                c = client.completions.create(model=m, prompt=prompt, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
                row.append(c.choices[0].text.strip())
            rows.append(row)
        listed = [m.id for m in client.models.list().data]

    header = ["prompt", "base model"] + [f"{n} ({m})" for n, m, _ in ADAPTERS]
    print()
    print(_table(rows, header))
    print(f"\n[demo] /v1/models: {listed}")
    print(f"[demo] done in {time.time() - t0:.0f}s")
    changed = all(row[1 + i + 1] != row[1] for row in rows for i in range(len(ADAPTERS)))
    distinct = all(len(set(row[2:])) == len(ADAPTERS) for row in rows)
    if not (changed and distinct):
        print("[demo] WARNING: some adapters did not change the output in their own way")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
