"""vLLM's torch.compile stays on when nora serves adapters on the CPU, and the compiled path
gives the same tokens as the eager one: one mixed batch of the base model, dense adapters and
shared-basis adapters (two bases), run once compiled (vLLM's default) and once with
``enforce_eager``, each in its own process, both checked against the transformers reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters, train_shared_basis_adapters  # noqa: E402
from reference import reference_run  # noqa: E402

pytestmark = pytest.mark.server

SCRIPT = r'''
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from nora_serve.vllm_plugin import llm_kwargs
    base, cache, prompts, adapters, eager = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "1"
    llm = LLM(model=base, dtype="float32", max_model_len=128, gpu_memory_utilization=0.05,
              max_loras=8, max_lora_rank=64, enforce_eager=eager,
              **llm_kwargs(cache_dir=cache, dense_loras=4, max_bases=2))
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    reqs = [LoRARequest(name, i + 1, path) if path else None for i, (name, path) in enumerate(adapters)]
    # Every adapter with every prompt, all submitted at once: mixed steps in prefill and decode.
    jobs = [(p, j) for p in range(len(prompts)) for j in range(len(reqs))]
    outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs], sp,
                        lora_request=[reqs[j] for _, j in jobs])
    res = [{"prompt": p, "adapter": j, "tokens": list(o.outputs[0].token_ids),
            "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
           for (p, j), o in zip(jobs, outs)]
    mode = str(llm.llm_engine.vllm_config.compilation_config.mode)
    print("RESULT " + json.dumps({"mode": mode, "results": res}), flush=True)
'''

PROMPTS = [[1, 40, 41, 42, 13, 9, 5], [1, 7, 7, 30, 31, 2, 90, 91, 17]]


def _run(base_dir, tmp_path, adapters, eager: bool) -> dict:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    p = subprocess.run([sys.executable, str(script), str(base_dir), str(tmp_path / f"cache{int(eager)}"),
                        json.dumps(PROMPTS), json.dumps(adapters), "1" if eager else "0"],
                       capture_output=True, text=True, timeout=900, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(line[len("RESULT "):])


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
