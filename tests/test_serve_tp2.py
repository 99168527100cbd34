"""The concurrent mixed batch (base + adapters of several formats and ranks, shared-basis NoRA and
IntTune adapters trained from one base on different data, prompt logprobs on) with
``--tensor-parallel-size 2``: every worker converts and applies its shard correctly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_serve_reference import (  # noqa: E402
    assert_mixed_batch,
    assert_stored_as_cores,
    make_native_adapters,
    train_shared_basis_adapters,
)
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
