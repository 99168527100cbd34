"""Offline ``vllm.LLM(...).generate(lora_request=...)`` with nora enabled through
``additional_config``: foreign and native adapters are converted in the worker on load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters, train_shared_basis_adapters  # noqa: E402
from offline_llm import run_offline  # noqa: E402
from reference import reference_run  # noqa: E402

pytestmark = pytest.mark.server


def _run_offline(base_dir, tmp_path, adapters, prompt, extra=None) -> str:
    """Run every adapter offline, check every request against the reference; returns the run's log."""
    got, log = run_offline(base_dir, tmp_path, adapters, prompt, extra)
    for (name, path), g in zip(adapters, got):
        want = reference_run(str(base_dir), path, tuple(prompt), 6)
        assert g["tokens"] == want["tokens"], name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["logprobs"], want["logprobs"])), name
    return log


def test_offline_llm_converts_on_load(base_dir, fixtures_dir, tmp_path):
    native = make_native_adapters(base_dir, tmp_path / "native", seed=4)
    adapters = [("base", None), ("three", str(fixtures_dir / "nlora")), ("adalora", str(fixtures_dir / "peft_adalora")),
                ("nora", str(native["nora"])), ("dyrank", str(native["dyrank"]))]
    prompt = [1, 40, 41, 42, 13, 9, 5]
    cache = tmp_path / "cache"
    _run_offline(base_dir, tmp_path, adapters, prompt)
    # The worker converted into the cache: one entry per adapter (and the NoRA adapter's basis,
    # once), nothing half-written.
    entries = [d for d in cache.iterdir() if not d.name.startswith(".") and d.name != "bases"]
    assert len(entries) == 4 and all((d / "nora-cache.json").is_file() for d in entries)
    assert len(list((cache / "bases").iterdir())) == 1
    assert not [d for d in cache.rglob(".*")]


def test_offline_thousand_slots_shared_basis(base_dir, fixtures_dir, tmp_path, tmp_path_factory):
    """--max-loras 1024 with 2 dense slots and 2 resident bases: shared-basis adapters cost their
    cores only, the scheduler defers what does not fit in a step, and every request (base,
    3 dense adapters, 5 shared-basis adapters of 3 bases, all submitted at once) is exact."""
    import re

    shared = train_shared_basis_adapters(base_dir, tmp_path_factory)
    native = make_native_adapters(base_dir, tmp_path / "native", seed=6)
    adapters = [("base", None), ("nora_a", str(shared["nora_a"])), ("lora", str(native["lora"])),
                ("inttune_a", str(shared["inttune_a"])), ("nora_b", str(shared["nora_b"])),
                ("slora", str(fixtures_dir / "slora")), ("native_nora", str(native["nora"])),
                ("inttune_b", str(shared["inttune_b"])), ("dyrank", str(native["dyrank"])), ("base", None)]
    log = _run_offline(base_dir, tmp_path, adapters, [1, 40, 41, 42, 13, 9, 5],
                       {"max_loras": 1024, "max_lora_rank": 64, "nora": {"dense_loras": 2, "max_bases": 2}})
    assert len(set(re.findall(r"nora: adapter (\S+): \w+ with shared basis \w+, cores only", log))) == 5
    m = re.search(r"nora: adapter storage \(MiB\): dense ([\d.]+), bases ([\d.]+), cores ([\d.]+)", log)
    dense, bases, cores = map(float, m.groups())
    stock = dense / 2 * 1024  # vLLM's padded storage: a dense slot for each of the 1024
    assert dense + bases + cores < stock / 8, (dense, bases, cores, stock)


def test_offline_shared_basis_folded_only_for_a_dense_slot(base_dir, tmp_path, tmp_path_factory):
    """With ``core_rank`` 0 no adapter is kept as cores: a shared-basis adapter (format_version 2
    from nora-train, and 1) is cached as its cores first and folded into a PEFT LoRA of its own
    only when the worker needs a dense slot for it; served exactly either way."""
    shared = train_shared_basis_adapters(base_dir, tmp_path_factory)
    native = make_native_adapters(base_dir, tmp_path / "native", seed=8)
    adapters = [("nora_a", str(shared["nora_a"])), ("base", None), ("inttune_b", str(shared["inttune_b"])),
                ("native_nora", str(native["nora"]))]
    log = _run_offline(base_dir, tmp_path, adapters, [1, 40, 41, 42, 13, 9, 5], {"nora": {"core_rank": 0}})
    assert "cores only" not in log
    entries = [d for d in (tmp_path / "cache").iterdir() if len(d.name) == 32]
    folded = [d for d in entries if (d / "adapter" / "adapter_config.json").is_file()]
    cores = [d for d in entries if (d / "cores.safetensors").is_file()]
    assert len(folded) == 3 and len(cores) == 3, sorted(p.name for d in entries for p in d.iterdir())


def test_offline_many_dense_rows_batched(base_dir, fixtures_dir, tmp_path):
    """Four dense adapters on two prompts each, submitted at once: prompt steps of 32 rows or
    more of several adapters run through the batched dense path (one padded segment per slot,
    one ``bmm`` per stage; how vLLM splits the 96 prompt rows into steps varies from run to run),
    and every answer (tokens, logprobs, prompt logprobs) equals its own adapter's reference
    within 1e-3."""
    import re

    from offline_llm import run_llm

    native = make_native_adapters(base_dir, tmp_path / "native", seed=10)
    adapters = [("lora", str(native["lora"])), ("slora", str(native["slora"])),
                ("rank_pattern", str(fixtures_dir / "peft_lora_rank_pattern")),
                ("adalora", str(fixtures_dir / "peft_adalora"))]
    prompts = [[1, 40 + 3 * p, 41, 42 + p, 13, 9, 5 + p, 7, 60 - p, 11, 30 + 2 * p, 8] for p in range(8)]
    jobs = [(p, p // 2) for p in range(8)]
    out, log = run_llm(base_dir, tmp_path / "cache", adapters, prompts, jobs=jobs, prompt_logprobs=True,
                       llm={"max_loras": 4, "max_lora_rank": 32}, nora={"dense_loras": 4})
    batched = re.search(r"first step on the batched path \((\d+) rows, (\d+) slots\)", log)
    assert batched and int(batched.group(1)) >= 32 and int(batched.group(2)) >= 2, log[-3000:]
    for g in out["results"]:
        name, path = adapters[g["adapter"]]
        want = reference_run(str(base_dir), path, tuple(prompts[g["prompt"]]), 6)
        assert g["tokens"] == want["tokens"], name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["logprobs"], want["logprobs"])), name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["prompt_logprobs"][1:], want["prompt_logprobs"][1:])), name


def _peft_lora_with_heads(base_dir, out: Path, seed: int) -> Path:
    """A stock PEFT LoRA on q/v and lm_head, every weight random (non-zero). (Embedding LoRA the
    converter refuses: test_punica_cpu covers the dense-slot embedding.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


def _peft_greedy(base_dir, adapter: Path, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from transformers + PEFT (the independent reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32),
                                      adapter).eval()
    ids, tokens, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            t = int(logp.argmax())
            tokens.append(t)
            lps.append(float(logp[t]))
            ids.append(t)
    return tokens, lps


def test_offline_lm_head_lora_in_dense_slots(base_dir, tmp_path, tmp_path_factory):
    """The embedding and logits LoRA stacks hold the dense slots only (not one per --max-loras
    slot: [max_loras, vocab, rank] each), and lm_head LoRA is
    served from its dense index exactly (a PEFT LoRA with lm_head weights), beside shared-basis adapters and the base, with more
    slots than dense indices (its slot is not its dense index)."""
    import re

    heads = _peft_lora_with_heads(base_dir, tmp_path / "heads", seed=3)
    shared = train_shared_basis_adapters(base_dir, tmp_path_factory)
    native = make_native_adapters(base_dir, tmp_path / "native", seed=12)
    adapters = [("nora_a", str(shared["nora_a"])), ("base", None), ("lora", str(native["lora"])),
                ("nora_b", str(shared["nora_b"])), ("heads", str(heads))]
    prompt = [1, 40, 41, 42, 13, 9, 5]
    got, log = run_offline(base_dir, tmp_path, adapters, prompt,
                           {"max_loras": 64, "max_lora_rank": 64, "nora": {"dense_loras": 2}})
    for (name, path), g in zip(adapters, got):
        if name == "heads":
            want_tokens, want_lps = _peft_greedy(base_dir, heads, prompt, 6)
        else:
            want = reference_run(str(base_dir), path, tuple(prompt), 6)
            want_tokens, want_lps = want["tokens"], want["logprobs"]
        assert g["tokens"] == want_tokens, name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["logprobs"], want_lps)), (name, g["logprobs"], want_lps)
    base = next(g for (name, _), g in zip(adapters, got) if name == "base")
    assert got[-1]["tokens"] != base["tokens"] or got[-1]["logprobs"] != base["logprobs"]
    m = re.search(r"nora: adapter storage \(MiB\):.*embedding and logits ([\d.]+)", log)
    assert m, log[-3000:]
    # 2 dense slots of [vocab 128, rank 64] + [1, hidden 64, 64] (embedding) and [1, 64, 64] +
    # [1, 128, 64] (logits), float32; one per --max-loras slot would be 32x that.
    want = 2 * 4 * 2 * (128 * 64 + 64 * 64) / 2**20
    assert abs(float(m.group(1)) - want) < 0.01, (m.group(1), want)
