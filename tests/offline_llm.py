"""The tests' offline runner: ``vllm.LLM(...).generate(lora_request=...)`` with nora enabled
through ``additional_config``, in its own process (vLLM's CPU engine wants a fresh one and a
``__main__`` guard), greedy, every (prompt, adapter) job submitted at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from nora_serve.vllm_plugin import llm_kwargs
    base, cache, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    prompts, adapters = spec["prompts"], spec["adapters"]
    llm = LLM(model=base, dtype="float32", max_model_len=128, gpu_memory_utilization=0.05,
              **spec["llm"], **llm_kwargs(cache_dir=cache, **spec["nora"]))
    with_prompt = spec["prompt_logprobs"]
    sp = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], logprobs=0, ignore_eos=True,
                        prompt_logprobs=0 if with_prompt else None)
    reqs = [LoRARequest(name, i + 1, path) if path else None for i, (name, path) in enumerate(adapters)]
    jobs = spec["jobs"]
    outs = llm.generate([{"prompt_token_ids": prompts[p]} for p, _ in jobs], sp,
                        lora_request=[reqs[a] for _, a in jobs])
    res = []
    for (p, a), o in zip(jobs, outs):
        c = o.outputs[0]
        res.append({"prompt": p, "adapter": a, "tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]})
        if with_prompt:
            res[-1]["prompt_logprobs"] = [None] + [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], prompts[p][1:])]
    mode = str(llm.llm_engine.vllm_config.compilation_config.mode)
    print("RESULT " + json.dumps({"mode": mode, "results": res}), flush=True)
'''


def run_llm(base_dir, cache_dir, adapters, prompts, *, jobs=None, llm=None, nora=None,
            prompt_logprobs: bool = False, max_tokens: int = 6, timeout: int = 600) -> tuple[dict, str]:
    """Run SCRIPT: ``adapters`` is ``[(name, path or None for the base)]``, ``jobs``
    ``[(prompt index, adapter index)]`` (default: every adapter on prompt 0), ``llm`` extra
    ``LLM`` arguments, ``nora`` the plugin's (``llm_kwargs``). Returns ``{"mode": compilation
    mode, "results": [one dict per job]}`` and the run's log."""
    cache_dir = Path(cache_dir)
    script = cache_dir.parent / "offline_llm_run.py"
    script.write_text(SCRIPT)
    spec = {"prompts": prompts, "adapters": adapters, "llm": llm or {}, "nora": nora or {},
            "jobs": jobs if jobs is not None else [(0, a) for a in range(len(adapters))],
            "prompt_logprobs": prompt_logprobs, "max_tokens": max_tokens}
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    p = subprocess.run([sys.executable, str(script), str(base_dir), str(cache_dir), json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(line[len("RESULT "):]), p.stdout + p.stderr


def run_offline(base_dir, tmp_path, adapters, prompt, extra=None) -> tuple[list[dict], str]:
    """Every adapter on one prompt, the cache in ``tmp_path / "cache"``: each request's result,
    and the run's log. ``extra``: LLM arguments, ``"nora"``: the plugin's,
    ``"prompt_logprobs": True``: those too."""
    extra = dict(extra or {})
    nora = extra.pop("nora", {})
    with_prompt = extra.pop("prompt_logprobs", False)
    out, log = run_llm(base_dir, Path(tmp_path) / "cache", adapters, [prompt], llm=extra, nora=nora,
                       prompt_logprobs=with_prompt)
    return out["results"], log
