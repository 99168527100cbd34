"""The concurrent mixed batch (base + adapters of several formats and ranks, shared-basis NoRA and
IntTune adapters trained from one base on different data, prompt logprobs on) with
``--tensor-parallel-size 2``: every worker converts and applies its shard correctly."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters, train_shared_basis_adapters  # noqa: E402
from vllm_server import assert_mixed_batch, assert_stored_as_cores  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.tp2]

MAX_TOKENS = 6
PROMPTS = [[1, 127, 91, 85, 88, 39, 78, 92, 20], [1, 23, 112, 123, 18, 47, 40]]


@pytest.fixture(scope="module")
def adapters(fixtures_dir, base_dir, tmp_path_factory):
    native = make_native_adapters(base_dir, tmp_path_factory.mktemp("native"), seed=3)
    shared = train_shared_basis_adapters(base_dir, tmp_path_factory)
    return {"slora": fixtures_dir / "slora", "nora_a": shared["nora_a"], "dora": fixtures_dir / "dora_dyrank",
            "inttune_a": shared["inttune_a"], "vera": fixtures_dir / "peft_vera", "nora_b": shared["nora_b"],
            "rank_pattern": fixtures_dir / "peft_lora_rank_pattern", "inttune_b": shared["inttune_b"],
            "nora": native["nora"], "lora16": native["lora"]}


@pytest.fixture(scope="module")
def server(base_dir, adapters, tmp_path_factory):
    cache = tmp_path_factory.mktemp("nora-cache")
    # Some adapters up front, the rest loaded over HTTP into the running TP2 engine.
    static = [f"{n}={adapters[n]}" for n in ("slora", "nora", "nora_a", "inttune_a")]
    with VLLMServer(base_dir, ["--enable-nora", "--nora-cache-dir", str(cache), "--tensor-parallel-size", "2",
                               # Room for all 24 requests in one step, but only 4 dense slots for the
                               # 5 adapters without a shared basis and 2 resident bases for 3: the
                               # scheduler defers what does not fit.
                               "--max-num-seqs", "32", "--max-loras", "10", "--nora-dense-loras", "4",
                               "--nora-max-bases", "2", "--lora-modules", *static],
                    entry="nora_serve.cli.serve",
                    env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as srv:
        yield srv


def test_mixed_batch_tp2(server, base_dir, adapters):
    for name in ("dora", "vera", "rank_pattern", "lora16", "nora_b", "inttune_b"):
        r = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapters[name])})
        assert r.status_code == 200, r.text
    names = [None, *adapters, None]
    assert_mixed_batch(server, base_dir, adapters, names, PROMPTS, MAX_TOKENS)


def test_shared_basis_storage_tp2(server, adapters):
    assert_stored_as_cores(server, ["nora", "nora_a", "nora_b", "inttune_a", "inttune_b"],
                           same_basis=[("nora_a", "nora_b"), ("inttune_a", "inttune_b")],
                           dense=["slora", "dora", "vera", "rank_pattern", "lora16"])


def test_peft_dora_tp2(server, base_dir, adapters, tmp_path_factory):
    """PEFT DoRA per request at TP 2: the output scale is cut like a LoRA B (column-parallel) or
    applied to each partial sum (row-parallel); against stock PEFT's forward."""
    from concurrent.futures import ThreadPoolExecutor

    from dora_cases import make_peft_dora, peft_run
    from dora_cases import train_dora
    from reference import reference_run
    from vllm_server import assert_matches, complete

    root = tmp_path_factory.mktemp("dora")
    doras = {"peft_dora": make_peft_dora(base_dir, root / "peft_dora", seed=7),
             "trained_dora": train_dora(base_dir, root / "trained_dora")}
    for name, path in doras.items():
        r = server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        assert r.status_code == 200, r.text
    jobs = [(n, p) for n in (None, "peft_dora", "slora", "trained_dora") for p in PROMPTS]

    def want(n, p):
        if n in doras:
            return peft_run(str(base_dir), str(doras[n]), tuple(p), MAX_TOKENS)
        return reference_run(str(base_dir), str(adapters[n]) if n else None, tuple(p), MAX_TOKENS)

    wants = [want(n, p) for n, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as ex:
        gots = list(ex.map(lambda j: complete(server.client, j[0] or str(base_dir), j[1], MAX_TOKENS), jobs))
    for (n, _), got, w in zip(jobs, gots, wants):
        assert_matches(got, w, n or "base")


def test_metrics_count_deferrals_and_residency_tp2(server, base_dir, adapters):
    """Requests for 5 dense adapters (4 dense slots) and 3 bases (2 resident at once), all at
    once and long enough to overlap: the engine process holds some back a step, and
    /metrics of the API server shows it, with both workers' storage."""
    from concurrent.futures import ThreadPoolExecutor

    names = ["slora", "dora", "vera", "rank_pattern", "lora16", "nora_a", "inttune_a", "nora", "nora_b"]
    # Each adapter once first, one at a time: the front end's first look at an adapter (its
    # cache entry, a basis to load) can take longer than a short request, and the burst below
    # must reach the scheduler together, not one request after another has finished.
    for n in names:
        r = server.post("/v1/completions", {"model": n, "prompt": PROMPTS[0], "max_tokens": 1})
        assert r.status_code == 200, r.text
    before = server.metrics("nora:")
    # Three requests per adapter: on 2 cores the two TP workers and the engine core spin while
    # the API server takes the burst in, so requests can reach the scheduler a second apart.
    burst = names * 3
    with ThreadPoolExecutor(len(burst)) as ex:
        outs = list(ex.map(lambda n: server.post("/v1/completions", {
            "model": n, "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True}), burst))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]

    def held_back():
        m = server.metrics("nora:")
        return m, sum(m[f'nora:scheduler_deferrals_total{{cap="{c}"}}']
                      - before[f'nora:scheduler_deferrals_total{{cap="{c}"}}'] for c in ("dense", "basis"))

    # The engine process's counters reach the API server's /metrics through vLLM's multiprocess
    # metrics: read again for a few seconds before concluding nothing was held back.
    m, held = held_back()
    for _ in range(10):
        if held > 0:
            break
        time.sleep(0.5)
        m, held = held_back()
    assert held > 0, m
    assert m['nora:adapters_resident{storage="cores"}'] >= 1 and m["nora:bases_resident"] >= 1, m
    assert m["nora:adapter_memory_bytes"] > 0, m
