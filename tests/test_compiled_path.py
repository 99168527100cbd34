"""vLLM's torch.compile stays on when nora serves adapters on the CPU, and the compiled path
gives the same tokens as the eager one: one mixed batch of the base model, dense adapters and
shared-basis adapters (two bases), run once compiled (vLLM's default) and once with
``enforce_eager``, each in its own process, both checked against the transformers reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters, train_shared_basis_adapters  # noqa: E402
from offline_llm import run_llm  # noqa: E402
from reference import reference_run  # noqa: E402

pytestmark = pytest.mark.server

PROMPTS = [[1, 40, 41, 42, 13, 9, 5], [1, 7, 7, 30, 31, 2, 90, 91, 17]]


def _run(base_dir, tmp_path, adapters, eager: bool) -> dict:
    """Every adapter with every prompt, all submitted at once: mixed steps in prefill and decode."""
    jobs = [(p, j) for p in range(len(PROMPTS)) for j in range(len(adapters))]
    out, _ = run_llm(base_dir, tmp_path / f"cache{int(eager)}", adapters, PROMPTS, jobs=jobs,
                     llm={"max_loras": 8, "max_lora_rank": 64, "enforce_eager": eager},
                     nora={"dense_loras": 4, "max_bases": 2}, timeout=900)
    return out


def test_compiled_equals_eager_mixed_batch(base_dir, fixtures_dir, tmp_path, tmp_path_factory):
    shared = train_shared_basis_adapters(base_dir, tmp_path_factory)
    native = make_native_adapters(base_dir, tmp_path / "native", seed=8)
    adapters = [("base", None), ("nora_a", str(shared["nora_a"])), ("lora", str(native["lora"])),
                ("inttune_a", str(shared["inttune_a"])), ("nlora", str(fixtures_dir / "nlora")),
                ("nora_b", str(shared["nora_b"])), ("dyrank", str(native["dyrank"]))]
    compiled = _run(base_dir, tmp_path, adapters, eager=False)
    eager = _run(base_dir, tmp_path, adapters, eager=True)
    # vLLM's CPU default (Dynamo traced once, Inductor) was kept although LoRA is on.
    assert compiled["mode"] != "0" and "NONE" not in compiled["mode"], compiled["mode"]
    assert eager["mode"] == "0" or "NONE" in eager["mode"], eager["mode"]
    for c, e in zip(compiled["results"], eager["results"]):
        name = adapters[c["adapter"]][0]
        assert c["tokens"] == e["tokens"], (name, c["prompt"])
        assert max(abs(a - b) for a, b in zip(c["logprobs"], e["logprobs"])) <= 1e-3, (name, c["prompt"])
        want = reference_run(str(base_dir), adapters[c["adapter"]][1], tuple(PROMPTS[c["prompt"]]), 6)
        assert c["tokens"] == want["tokens"], (name, c["prompt"])
