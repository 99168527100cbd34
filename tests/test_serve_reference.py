"""The reference the serving tests compare against, and its own checks (no server here).

Reference = transformers ``LlamaForCausalLM`` on the base with every module's delta merged,
``W0 + ΔW``, where ``ΔW`` is computed here in plain torch straight from each adapter's own
tensors (independently of ``nora_serve.converters`` and ``nora_serve.methods``). The checks
below pin this reference to the fixtures' ``reference_logits`` (computed by each adapter's own
code), so a serving test that matches it matches the outside world.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FIXTURE_ADAPTERS = ("slora", "nlora", "inttune", "dora_dyrank", "peft_lora_rank_pattern",
                    "peft_adalora", "peft_vera", "peft_pissa")
NATIVE_METHODS = ("lora", "nora", "slora", "nlora", "inttune", "dyrank")
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# -- base ----------------------------------------------------------------------------------------
def base_weights(base_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def base_modules(base_dir) -> list[str]:
    w = base_weights(base_dir)
    return sorted(k[: -len(".weight")] for k in w if any(k.endswith(p + ".weight") for p in PROJ))


# -- independent deltas ----------------------------------------------------------------------------
def _pattern(pattern: dict, name: str):
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _peft_groups(tensors: dict, suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key.removeprefix("base_model.model.")
        for s in suffixes:
            for tail in (f".{s}.weight", f".{s}"):
                if k.endswith(tail):
                    groups.setdefault(k[: -len(tail)], {})[s] = t.double()
                    break
    return groups


def reference_deltas(adapter_dir, base_dir) -> dict[str, torch.Tensor]:
    """``{module: ΔW}`` (float64) from the adapter's own tensors, by the method's own math."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if (d / "checkpoint" / "prune_state_dict.pt").is_file():  # dynamic-rank DoRA, official layout
        t = load_file(str(d / "checkpoint" / "model.safetensors"))
        masks = torch.load(d / "checkpoint" / "prune_state_dict.pt", weights_only=True)["finally_mask_dict"]
        out = {}
        for module, pruned in masks.items():
            A = t[f"model.{module}.lora_a_linear.weight"].double()
            B = t[f"model.{module}.lora_b_linear.weight"].double()
            c = t[f"model.{module}.lora_scaler"].double().reshape(-1) * (~pruned.bool()).double()
            s = 8 / A.shape[0]  # lora_alpha 8 over the start rank (README)
            out[module] = s * (B * c[None, :]) @ A
        return out
    cfg = json.loads((d / "adapter_config.json").read_text())
    t = load_file(str(d / "adapter_model.safetensors"))
    if cfg.get("format") == "nora-serve":
        return _native_deltas(cfg, native_tensors(d))
    peft_type = cfg.get("peft_type")
    out = {}
    if peft_type == "LORA":
        groups = _peft_groups(t, ("lora_A", "lora_B", "lora_N"))
        for m, g in groups.items():
            r = _pattern(cfg.get("rank_pattern"), m) or cfg["r"]
            alpha = _pattern(cfg.get("alpha_pattern"), m) or cfg["lora_alpha"]
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            core = g["lora_B"] @ g["lora_N"] if "lora_N" in g else g["lora_B"]
            out[m] = s * core @ g["lora_A"]
    elif peft_type == "ADALORA":
        for m, g in _peft_groups(t, ("lora_A", "lora_B", "lora_E")).items():
            # PEFT divides by ranknum + 1e-5, and ranknum stays the configured init_r.
            ranknum = cfg.get("init_r", cfg["r"])
            out[m] = g["lora_B"] @ (g["lora_A"] * g["lora_E"]) * cfg["lora_alpha"] / (ranknum + 1e-5)
    elif peft_type == "VERA":
        vA, vB = t["base_model.vera_A"].double(), t["base_model.vera_B"].double()
        W = base_weights(base_dir)
        for m, g in _peft_groups(t, ("vera_lambda_b", "vera_lambda_d")).items():
            d_out, d_in = W[m + ".weight"].shape
            A, B = vA[:, :d_in], vB[:d_out, :]
            out[m] = (g["vera_lambda_b"][:, None] * B) @ (g["vera_lambda_d"][:, None] * A)
    else:
        raise ValueError(f"no reference for {d}")
    return out


# The shared pair of each shared-basis method, as the native format names it.
SHARED_NAMES = {"nora": ("outer_A", "outer_B"), "loraxs": ("outer_A", "outer_B"), "inttune": ("lora_A", "lora_B")}


def native_tensors(d: Path) -> dict[str, torch.Tensor]:
    """A native adapter's tensors ``<module>.<name>``; a format_version 2 adapter's shared pair
    read from its basis file in the store (``<d>/../bases/<digest>.safetensors``)."""
    from safetensors.torch import load_file

    cfg = json.loads((d / "adapter_config.json").read_text())
    t = load_file(str(d / "adapter_model.safetensors"))
    if cfg.get("format_version") == 2:
        basis = load_file(str(d.parent / "bases" / f"{cfg['shared_basis']['digest']}.safetensors"))
        for m in {k.rpartition(".")[0] for k in list(t)}:
            for key, name in zip(("A", "B"), SHARED_NAMES[cfg["method"]]):
                t[f"{m}.{name}"] = basis[f"{m}.{key}"]
    return t


def _native_deltas(cfg: dict, t: dict) -> dict[str, torch.Tensor]:
    method, alpha, r = cfg["method"], float(cfg["lora_alpha"]), int(cfg["r"])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in t.items():
        m, _, n = key.rpartition(".")
        groups.setdefault(m, {})[n] = v.double()
    out = {}
    for m, g in groups.items():
        if method == "lora":
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            out[m] = s * g["lora_B"] @ g["lora_A"]
        elif method == "nora":
            s = alpha / int(cfg["inner_r"])
            out[m] = s * g["outer_B"] @ g["inner_B"] @ g["inner_A"] @ g["outer_A"]
        elif method in ("slora", "nlora", "inttune"):
            out[m] = (alpha / r) * g["lora_B"] @ g["lora_N"] @ g["lora_A"]
        elif method == "dyrank":
            out[m] = (alpha / r) * (g["lora_B"] * g["lora_c"][None, :]) @ g["lora_A"]
    return out


# -- the merged model --------------------------------------------------------------------------------
class Reference:
    """Base + merged deltas in transformers, fp32; greedy decoding and logprobs."""

    def __init__(self, base_dir, deltas: dict[str, torch.Tensor] | None = None):
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            for m, dw in (deltas or {}).items():
                w = self.model.get_submodule(m).weight
                w.copy_((w.double() + dw).to(w.dtype))

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()

    @torch.no_grad()
    def run(self, prompt: list[int], max_tokens: int) -> dict:
        """Greedy tokens, their logprobs, and the prompt's logprobs (first is None)."""
        ids = list(prompt)
        lp = torch.log_softmax(self.logits(ids).double(), -1)
        prompt_lps = [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
        toks, tok_lps = [], []
        for _ in range(max_tokens):
            last = torch.log_softmax(self.logits(ids)[-1].double(), -1)
            nxt = int(torch.argmax(last))
            toks.append(nxt)
            tok_lps.append(float(last[nxt]))
            ids.append(nxt)
        return {"tokens": toks, "logprobs": tok_lps, "prompt_logprobs": prompt_lps}


@lru_cache(maxsize=None)
def reference_run(base_dir: str, adapter_dir: str | None, prompt: tuple[int, ...], max_tokens: int):
    deltas = reference_deltas(adapter_dir, base_dir) if adapter_dir else None
    return Reference(base_dir, deltas).run(list(prompt), max_tokens)


# -- native test adapters (random tensors, every method) ---------------------------------------------
def make_native_adapters(base_dir, out_dir, seed: int = 0) -> dict[str, Path]:
    """One native adapter per method, different ranks, tensors large enough to change outputs."""
    from nora_serve.converters.fingerprint import base_fingerprints
    from nora_serve.converters.native import NativeAdapter

    W = base_weights(base_dir)
    modules = base_modules(base_dir)
    fps = base_fingerprints(base_dir, modules)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    spec = {  # method: (r, alpha, extra config)
        "lora": (16, 32, {}),
        "nora": (8, 8, {"inner_r": 4}),
        "slora": (8, 8, {}),
        "nlora": (4, 16, {}),
        "inttune": (8, 32, {}),
        "dyrank": (12, 12, {}),
    }
    paths = {}
    for method, (r, alpha, extra) in spec.items():
        tensors = {}
        for m in modules:
            w0 = W[m + ".weight"].float()
            d_out, d_in = w0.shape
            if method == "lora":
                t = {"lora_A": rnd(r, d_in, std=0.15), "lora_B": rnd(d_out, r, std=0.05)}
            elif method == "nora":
                U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
                t = {"outer_B": (U[:, :r] * S[:r].sqrt()).contiguous(),
                     "outer_A": (S[:r].sqrt()[:, None] * Vh[:r]).contiguous(),
                     "inner_B": rnd(r, extra["inner_r"], std=0.5),
                     "inner_A": rnd(extra["inner_r"], r, std=0.5)}
            elif method == "slora":
                t = {"lora_A": rnd(r, d_in, std=0.15), "lora_N": rnd(r, r, std=0.4),
                     "lora_B": rnd(d_out, r, std=0.1)}
            elif method in ("nlora", "inttune"):
                t = {"lora_A": w0[:r, :].clone(), "lora_B": w0[:, :r].clone(),
                     "lora_N": w0[:r, :r].clone() + rnd(r, r, std=2.0)}
            else:  # dyrank: some components pruned (c = 0), so true ranks differ per module
                c = rnd(r, std=1.0)
                c[torch.randperm(r, generator=g)[: int(torch.randint(2, 6, (1,), generator=g))]] = 0
                t = {"lora_A": rnd(r, d_in, std=0.15), "lora_c": c, "lora_B": rnd(d_out, r, std=0.1)}
            tensors[m] = t
        cfg = {"method": method, "r": r, "lora_alpha": alpha, "use_rslora": False,
               "base_model_name_or_path": str(base_dir), "base_fingerprints": fps, **extra}
        paths[method] = NativeAdapter(cfg, tensors).save(Path(out_dir) / f"native_{method}")
    return paths


# -- shared-basis adapters, trained with the real trainer ------------------------------------------
# NoRA's outer pair and IntTune's A/B are functions of the base weights, so every adapter trained
# from one base with the same ranks carries the same basis; only the small inner part differs.
# name: (method, task of its data, data seed, training seed)
SHARED_BASIS_ADAPTERS = {
    "nora_a": ("nora", "reverse", 0, 0),
    "nora_b": ("nora", "copy", 1, 1),
    "inttune_a": ("inttune", "reverse", 2, 0),
    "inttune_b": ("inttune", "copy", 3, 1),
}
SHARED_BASIS_PAIRS = {  # method: (pair, shared tensors, the adapter's own tensors)
    "nora": (("nora_a", "nora_b"), ("outer_A", "outer_B"), ("inner_A", "inner_B")),
    "inttune": (("inttune_a", "inttune_b"), ("lora_A", "lora_B"), ("lora_N",)),
}
SHARED_RANK, SHARED_INNER_RANK = 8, 4
# Full-batch steps at learning rates that move NoRA's and IntTune's small cores (which sit
# between fixed factors) well past the comparison tolerance in a few seconds on the CPU.
SHARED_LR = {"nora": 1e-1, "inttune": 1.0}
SHARED_STEPS = 8


def _write_task(path: Path, task: str, seed: int, n: int = 16) -> Path:
    """Prompt: three words and ``:``; completion: the words reversed, or copied."""
    from nora_serve.tiny import tiny_vocab

    rng = random.Random(seed)
    words = [w for w in tiny_vocab(128) if not w.startswith("<")][:40]
    with open(path, "w") as f:
        for _ in range(n):
            s = rng.sample(words, 3)
            done = list(reversed(s)) if task == "reverse" else s
            f.write(json.dumps({"prompt": " ".join(s) + " :", "completion": " " + " ".join(done)}) + "\n")
    return path


def train_shared_basis_adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    """Two NoRA and two IntTune adapters trained by ``nora_serve.train`` from one base on different
    data and seeds (same ranks). Trained once per session: later callers reuse the directories
    (the trainer writes each all or nothing)."""
    from nora_serve.train import TrainConfig, train

    root = tmp_path_factory.getbasetemp() / "shared_basis_adapters"
    root.mkdir(exist_ok=True)
    paths = {}
    for name, (method, task, data_seed, seed) in SHARED_BASIS_ADAPTERS.items():
        out = root / name
        if not (out / "adapter_model.safetensors").is_file():
            data = _write_task(root / f"{name}.jsonl", task, data_seed)
            train(TrainConfig(
                model=str(base_dir), data=str(data), method=method, out=str(out), rank=SHARED_RANK,
                inner_rank=SHARED_INNER_RANK if method == "nora" else None, alpha=16.0,
                lr=SHARED_LR[method], max_steps=SHARED_STEPS, batch_size=16, schedule="constant",
                seed=seed, progress=False,
            ))
        paths[name] = out
    return paths


# -- checks of the reference itself ---------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_ADAPTERS)
def test_reference_matches_fixture_logits(fixtures_dir, base_dir, name):
    from safetensors.torch import load_file

    ref = load_file(str(fixtures_dir / name / "reference_logits.safetensors"))
    model = Reference(base_dir, reference_deltas(fixtures_dir / name, base_dir))
    for ids, want in zip(ref["input_ids"].tolist(), ref["logits"]):
        got = model.logits(ids)
        assert torch.allclose(got, want.float(), atol=1e-4, rtol=0), (name, (got - want).abs().max())


def test_reference_base_matches_probe(fixtures_dir, base_dir):
    from safetensors.torch import load_file

    probe = load_file(str(fixtures_dir / "probe.safetensors"))
    model = Reference(base_dir)
    for ids, want in zip(probe["input_ids"].tolist(), probe["base_logits"]):
        assert torch.allclose(model.logits(ids), want.float(), atol=1e-4, rtol=0)


def test_native_adapters_change_outputs(base_dir, tmp_path):
    """Each native test adapter moves the logits well beyond the comparison tolerance."""
    paths = make_native_adapters(base_dir, tmp_path)
    ids = [1, 5, 9, 13, 40, 41, 42]
    base = Reference(base_dir).logits(ids)
    for method, p in paths.items():
        got = Reference(base_dir, reference_deltas(p, base_dir)).logits(ids)
        assert (got - base).abs().max() > 0.05, method


def test_shared_basis_adapters_share_only_the_basis(base_dir, fixtures_dir, tmp_path_factory):
    """The trained pairs have one basis (same fingerprint, bit-identical shared tensors) and
    their own inner parts; each moves the output, and the two of a pair differently."""
    from safetensors.torch import load_file

    paths = train_shared_basis_adapters(base_dir, tmp_path_factory)
    for method, ((a, b), shared, own) in SHARED_BASIS_PAIRS.items():
        ca, cb = (json.loads((paths[n] / "adapter_config.json").read_text()) for n in (a, b))
        ta, tb = (native_tensors(paths[n]) for n in (a, b))
        assert ca["method"] == cb["method"] == method
        # One basis file for both (format_version 2 stores it once, named by its digest).
        assert ca["shared_basis"].get("digest") == cb["shared_basis"].get("digest"), method
        assert ca["r"] == cb["r"] == SHARED_RANK and ca.get("inner_r") == cb.get("inner_r")
        assert ca["shared_basis"]["fingerprint"] == cb["shared_basis"]["fingerprint"], method
        assert set(ta) == set(tb)
        modules = sorted({k.rpartition(".")[0] for k in ta})
        assert modules == base_modules(base_dir)  # all seven projections in every layer
        for m in modules:
            for t in shared:
                assert torch.equal(ta[f"{m}.{t}"], tb[f"{m}.{t}"]), (method, m, t)
            for t in own:
                assert not torch.equal(ta[f"{m}.{t}"], tb[f"{m}.{t}"]), (method, m, t)
    fps = {n: json.loads((p / "adapter_config.json").read_text())["shared_basis"]["fingerprint"]
           for n, p in paths.items()}
    assert fps["nora_a"] != fps["inttune_a"]

    probe = load_file(str(fixtures_dir / "probe.safetensors"))["input_ids"].tolist()
    base = torch.cat([Reference(base_dir).logits(ids) for ids in probe])
    got = {n: torch.cat([m.logits(ids) for ids in probe])
           for n, m in ((n, Reference(base_dir, reference_deltas(p, base_dir))) for n, p in paths.items())}
    for n, logits in got.items():
        assert (logits - base).abs().max() > 0.05, n
    for (a, b), _, _ in SHARED_BASIS_PAIRS.values():
        assert (got[a] - got[b]).abs().max() > 0.05, (a, b)


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
