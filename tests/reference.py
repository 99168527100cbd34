"""The reference the tests compare against: adapters applied to a base model in plain PyTorch
(each method's delta computed here from the adapter's own tensors, independently of
``nora_serve.converters`` and ``nora_serve.methods``) or through stock PEFT; transformers runs
the merged model. ``tests/test_serve_reference.py`` pins it to the fixtures' own logits.

Importable by any test: ``from reference import ...`` (tests/ is on sys.path under pytest's
importlib mode through ``conftest``) or ``tests.reference``.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

import torch


def load_base(base_dir: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    return model.eval()


def probe_ids(fixtures_dir: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(Path(fixtures_dir) / "probe.safetensors"))["input_ids"]


def reference_logits(adapter_fixture: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, logits)`` the adapter's own code computed (fixture file)."""
    from safetensors.torch import load_file

    t = load_file(str(Path(adapter_fixture) / "reference_logits.safetensors"))
    return t["input_ids"], t["logits"]


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def read_peft_lora(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """``(config, {module: (A, B, scale)})`` of a plain PEFT LoRA directory, scales by PEFT's
    rules (rank/alpha patterns, rsLoRA)."""
    import math
    import re

    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))

    def pattern(p, name):
        for k, v in (p or {}).items():
            if re.match(rf"(.*\.)?({k})$", name):
                return v
        return None

    out = {}
    for key in t:
        if not key.endswith(".lora_A.weight"):
            continue
        m = key[len("base_model.model."): -len(".lora_A.weight")]
        A, B = t[key], t[key.replace(".lora_A.", ".lora_B.")]
        r = pattern(cfg.get("rank_pattern"), m) or cfg["r"]
        alpha = pattern(cfg.get("alpha_pattern"), m) or cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[m] = (A, B, scale)
    return cfg, out


@torch.no_grad()
def merge_plain(model, adapter_dir: str | Path):
    """``W += scale · B @ A`` for every module of a PEFT LoRA directory (in place)."""
    _, mods = read_peft_lora(adapter_dir)
    named = dict(model.named_modules())
    for m, (A, B, scale) in mods.items():
        lin = named[m]
        lin.weight += (scale * (B.double() @ A.double())).to(lin.weight.dtype)
    return model


def peft_model(base_dir: str | Path, adapter_dir: str | Path):
    """Stock PEFT: ``PeftModel.from_pretrained`` on transformers' LlamaForCausalLM."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir)).eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# -- served reference: every format's delta, merged into transformers' model -------------------
FIXTURE_ADAPTERS = ("slora", "nlora", "inttune", "dora_dyrank", "peft_lora_rank_pattern",
                    "peft_adalora", "peft_vera", "peft_pissa")
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

