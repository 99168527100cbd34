"""Modes and assets of ``bench_serve.py``: the random base model and the adapters it serves.

Everything here is made on the spot (no downloads) and cached under ``<work>/<sizes key>/``, so
repeated runs with the same sizes reuse the model and the adapters:

- ``model/``: a random Llama (``nora_serve.tiny.make_tiny_llama``, fp32 safetensors; vLLM
  serves it in bf16) with ``max_position_embeddings`` raised so 512-token prompts fit.
- ``peft_lora/lora_XX``: stock PEFT LoRA directories (``adapter_config.json`` from peft's
  ``LoraConfig``, ``adapter_model.safetensors`` with random non-zero ``A`` and ``B``), rank 16 on
  q/k/v/o/gate/up/down.
- ``nora/nora_XXXX``, ``inttune/inttune_XXXX``: native nora-serve adapters written the way
  ``nora-train`` writes them, without training: the frozen outer factors are computed exactly as
  the trainer computes them (NoRA: the method's ``basis``, the SVD of each stored weight; IntTune: the
  Nystrom slices ``W0[:r, :]`` / ``W0[:, :r]``), so every adapter of a method shares its basis
  bit for bit (same ``shared_basis`` fingerprint); only the inner factors (NoRA ``inner_A`` /
  ``inner_B``, IntTune's ``r x r`` ``lora_N``) are random per adapter.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16  # every adapter: rank 16 (NoRA: outer rank 16, inner rank 8; IntTune: 16x16 core)
NORA_INNER = 8


# -- sizes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSize:
    hidden: int = 1024
    layers: int = 4
    intermediate: int = 2816
    head_dim: int = 64
    kv_ratio: int = 4  # num_heads / num_kv_heads (GQA as in Llama-2-70B / Llama-3)
    vocab: int = 4096
    max_pos: int = 2048
    init_std: float = 0.02

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // self.kv_ratio)

    def key(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"h{self.hidden}-l{self.layers}-i{self.intermediate}-d{self.head_dim}-v{self.vocab}-{h}"


def default_intermediate(hidden: int) -> int:
    # Llama's 8/3 * hidden rounded up to a multiple of 256: 1024 -> 2816, 2048 -> 5632.
    return ((hidden * 8 // 3 + 255) // 256) * 256


# -- modes ----------------------------------------------------------------------------------------
@dataclass
class Mode:
    name: str
    kind: str  # base | stock | nora  (which LLM(...) configuration)
    family: str  # plot series / comparison group
    peft: int = 0  # distinct PEFT LoRA adapters
    nora: int = 0  # distinct shared-basis NoRA adapters
    inttune: int = 0  # distinct shared-basis IntTune adapters
    eager: bool = False  # force compilation_config mode 0 (base-eager only)
    prefill: bool = False  # long prompts, few output tokens
    default: bool = True  # in the default sweep (else only when named in --modes)
    stock_ref: str | None = None  # the stock-LoRA mode with the same adapters
    notes: str = ""

    @property
    def adapters(self) -> int:
        return self.peft + self.nora + self.inttune


def all_modes() -> dict[str, Mode]:
    modes = [
        Mode("base", "base", "base", notes="vLLM defaults (torch.compile as vLLM-CPU sets it)"),
        Mode("base-eager", "base", "base-eager", eager=True, notes="compilation_config mode 0"),
        Mode("stock-lora-1", "stock", "stock-lora", peft=1),
        Mode("stock-lora-8", "stock", "stock-lora", peft=8),
        Mode("nora-lora-1", "nora", "nora-lora", peft=1, stock_ref="stock-lora-1"),
        Mode("nora-lora-8", "nora", "nora-lora", peft=8, stock_ref="stock-lora-8"),
    ]
    for n in (64, 256, 1024):
        modes.append(Mode(f"nora-shared-{n}", "nora", "nora-shared", nora=n))
    for n in (64, 256, 1024):
        modes.append(Mode(f"inttune-shared-{n}", "nora", "inttune-shared", inttune=n))
    modes += [
        Mode("mix-8-256", "nora", "mix", peft=8, nora=256),
        Mode("prefill-base", "base", "prefill", prefill=True),
        Mode("prefill-stock-lora-1", "stock", "prefill", peft=1, prefill=True, default=False),
        Mode("prefill-nora-lora-1", "nora", "prefill", peft=1, prefill=True, stock_ref="prefill-stock-lora-1"),
        Mode("prefill-nora-shared-64", "nora", "prefill", nora=64, prefill=True),
    ]
    return {m.name: m for m in modes}


# --quick: compiled base, stock vLLM LoRA, and the plugin with dense and shared-basis adapters in
# one batch (each mode is a fresh vLLM engine: ~1 min each on 2 cores).
QUICK_MODES = ("base", "stock-lora-8", "mix-8-256")


def run_order(names: list[str]) -> list[str]:
    """The order modes run in: the largest shared-basis sets first, so that on a fresh
    conversion cache the 1024-adapter modes pay (and report) the cold conversion of all their
    adapters; the smaller sets then find theirs converted."""
    def key(name: str):
        m = all_modes()[name]
        return (m.family, -m.adapters) if m.family in ("nora-shared", "inttune-shared") else (m.family, 0)

    fams = list(dict.fromkeys(all_modes()[n].family for n in names))
    return sorted(names, key=lambda n: (fams.index(all_modes()[n].family), key(n)[1]))


# -- assets ---------------------------------------------------------------------------------------
@dataclass
class Assets:
    root: Path
    model: Path
    peft: list[Path] = field(default_factory=list)
    nora: list[Path] = field(default_factory=list)
    inttune: list[Path] = field(default_factory=list)
    made: dict = field(default_factory=dict)  # what was made this run, with seconds


def _log(msg: str) -> None:
    print(f"[assets] {msg}", flush=True)


def make_model(size: ModelSize, out: Path) -> Path:
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    from nora_serve.tiny import make_tiny_llama

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    make_tiny_llama(tmp, vocab_size=size.vocab, hidden_size=size.hidden,
                    intermediate_size=size.intermediate, num_layers=size.layers,
                    num_heads=size.heads, num_kv_heads=size.kv_heads, head_dim=size.head_dim,
                    seed=0, init_std=size.init_std)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = size.max_pos  # tiny.py writes 256: too short for 512-token prompts
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.rename(out)
    return out


def target_modules(model_dir: Path) -> list[str]:
    cfg = json.loads((model_dir / "config.json").read_text())
    out = []
    for i in range(cfg["num_hidden_layers"]):
        for t in TARGETS:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"model.layers.{i}.{part}.{t}")
    return out


def _base_weights(model_dir: Path, modules: list[str]) -> dict:
    from nora_serve.converters.fingerprint import load_base_weights

    return load_base_weights(model_dir, modules)


def _weight(W: dict, module: str):
    return W[module + ".weight"] if module + ".weight" in W else W[module]


def make_peft_loras(model_dir: Path, out: Path, n: int, seed: int = 1) -> list[Path]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = target_modules(model_dir)
    paths = []
    W = None
    for j in range(n):
        d = out / f"lora_{j:02d}"
        paths.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        if W is None:
            W = _base_weights(model_dir, modules)
        g = torch.Generator().manual_seed(seed * 100003 + j)
        tensors = {}
        for m in modules:
            d_out, d_in = _weight(W, m).shape
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g) / d_in**0.5
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.05
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(TARGETS), lora_dropout=0.0,
                   bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=str(model_dir)).save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        tmp.rename(d)
    return paths


def make_shared_basis(model_dir: Path, out: Path, method: str, n: int, seed: int = 2) -> list[Path]:
    """``n`` native adapters of ``method`` (nora | inttune) sharing one basis."""
    import torch

    from nora_serve.converters.fingerprint import base_fingerprints, fingerprint_tensors
    from nora_serve.converters.native import NativeAdapter
    from nora_serve.methods import get_method
    from nora_serve.methods.three_matrix import nystrom_init

    paths = [out / f"{method}_{j:04d}" for j in range(n)]
    todo = [j for j, p in enumerate(paths) if not (p / "adapter_model.safetensors").is_file()]
    if not todo:
        return paths
    modules = target_modules(model_dir)
    W = _base_weights(model_dir, modules)
    fps = base_fingerprints(model_dir, modules)
    basis = {}
    for m in modules:
        w0 = _weight(W, m)  # as stored (fp32 here), as the trainer reads it
        if method == "nora":
            basis[m] = {k: t.contiguous() for k, t in get_method("nora").basis(w0, RANK).items()}
        else:
            A, _N, B = (t.to(torch.float32) for t in nystrom_init(w0, RANK))
            basis[m] = {"lora_A": A.contiguous(), "lora_B": B.contiguous()}
    shared = {f"{m}.{t}": basis[m][t] for m in modules for t in get_method(method).shared}
    cfg = {"method": method, "r": RANK, "use_rslora": False,
           "base_model_name_or_path": str(model_dir), "base_fingerprints": fps,
           "shared_basis": {"rule": get_method(method).shared_rule, "r": RANK, "calibration": None,
                            "fingerprint": fingerprint_tensors(shared)}}
    if method == "nora":
        cfg.update(inner_r=NORA_INNER, lora_alpha=float(NORA_INNER))  # scale 1
    else:
        cfg.update(lora_alpha=float(RANK))  # scale 1
    for j in todo:
        g = torch.Generator().manual_seed(seed * 1000003 + j)
        tensors = {}
        for m in modules:
            t = dict(basis[m])
            if method == "nora":
                t["inner_A"] = torch.randn(NORA_INNER, RANK, generator=g) * 0.3
                t["inner_B"] = torch.randn(RANK, NORA_INNER, generator=g) * 0.3
            else:
                t["lora_N"] = torch.randn(RANK, RANK, generator=g) * 2.0
            tensors[m] = t
        NativeAdapter(dict(cfg), tensors).save(paths[j], overwrite=True)
    return paths


def ensure_assets(root: Path, size: ModelSize, peft: int, nora: int, inttune: int) -> Assets:
    root.mkdir(parents=True, exist_ok=True)
    a = Assets(root=root, model=root / "model")
    t = time.perf_counter()
    existed = (a.model / "config.json").is_file()
    make_model(size, a.model)
    if not existed:
        a.made["model_s"] = round(time.perf_counter() - t, 1)
        _log(f"made the random model in {a.made['model_s']} s: {a.model}")
    for attr, n, fn in (("peft", peft, lambda n: make_peft_loras(a.model, root / "peft_lora", n)),
                        ("nora", nora, lambda n: make_shared_basis(a.model, root / "nora", "nora", n)),
                        ("inttune", inttune, lambda n: make_shared_basis(a.model, root / "inttune", "inttune", n))):
        if n <= 0:
            continue
        t = time.perf_counter()
        paths = fn(n)
        dt = time.perf_counter() - t
        if dt > 1.0:
            a.made[f"{attr}_s"] = round(dt, 1)
            _log(f"{attr}: {n} adapters ready in {dt:.1f} s under {paths[0].parent}")
        setattr(a, attr, paths)
    return a
