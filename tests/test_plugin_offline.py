"""Offline ``vllm.LLM(...).generate(lora_request=...)`` with nora enabled through
``additional_config``: foreign and native adapters are converted in the worker on load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_serve_reference import make_native_adapters, reference_run  # noqa: E402

pytestmark = pytest.mark.server

SCRIPT = r'''
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from nora_serve.vllm_plugin import llm_kwargs
    base, cache, prompt, adapters = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    llm = LLM(model=base, dtype="float32", max_model_len=128, gpu_memory_utilization=0.05,
              **llm_kwargs(cache_dir=cache))
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    reqs = [LoRARequest(name, i + 1, path) if path else None for i, (name, path) in enumerate(adapters)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(reqs), sp, lora_request=reqs)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
    print("RESULT " + json.dumps(res), flush=True)
'''


def test_offline_llm_converts_on_load(base_dir, fixtures_dir, tmp_path):
    native = make_native_adapters(base_dir, tmp_path / "native", seed=4)
    adapters = [("base", None), ("three", str(fixtures_dir / "nlora")), ("adalora", str(fixtures_dir / "peft_adalora")),
                ("nora", str(native["nora"])), ("dyrank", str(native["dyrank"]))]
    prompt = [1, 40, 41, 42, 13, 9, 5]
    cache = tmp_path / "cache"
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    p = subprocess.run([sys.executable, str(script), str(base_dir), str(cache), json.dumps(prompt), json.dumps(adapters)],
                       capture_output=True, text=True, timeout=600, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, p.stdout[-3000:] + p.stderr[-5000:]
    got = json.loads(line[len("RESULT "):])
    for (name, path), g in zip(adapters, got):
        want = reference_run(str(base_dir), path, tuple(prompt), 6)
        assert g["tokens"] == want["tokens"], name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["logprobs"], want["logprobs"])), name
    # The worker converted into the cache: one entry per adapter, nothing half-written.
    entries = [d for d in cache.iterdir() if not d.name.startswith(".")]
    assert len(entries) == 4 and all((d / "nora-cache.json").is_file() for d in entries)
    assert not [d for d in cache.iterdir() if d.name.startswith(".")]
