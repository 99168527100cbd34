"""Test adapters: one native adapter per method with random tensors, and shared-basis adapters
trained with the real trainer, training data, and a saved native adapter read back
(``from adapters import ...``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from reference import base_modules, base_weights

NATIVE_METHODS = ("lora", "nora", "slora", "nlora", "inttune", "dyrank")


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


def write_task(path: Path, task: str, seed: int, n: int = 16) -> Path:
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
            data = write_task(root / f"{name}.jsonl", task, data_seed)
            train(TrainConfig(
                model=str(base_dir), data=str(data), method=method, out=str(out), rank=SHARED_RANK,
                inner_rank=SHARED_INNER_RANK if method == "nora" else None, alpha=16.0,
                lr=SHARED_LR[method], max_steps=SHARED_STEPS, batch_size=16, schedule="constant",
                seed=seed, progress=False,
            ))
        paths[name] = out
    return paths


# -- training data and saved native adapters -----------------------------------------------------
def _words():
    from nora_serve.tiny import tiny_vocab

    return [w for w in tiny_vocab(128) if not w.startswith("<")][:30]


def write_reverse_task(path, n, seed):
    """Prompt: three words; completion: the same words reversed."""
    rng = random.Random(seed)
    words = _words()
    with open(path, "w") as f:
        for _ in range(n):
            s = rng.sample(words, 3)
            f.write(json.dumps({"prompt": " ".join(s) + " :", "completion": " " + " ".join(reversed(s))}) + "\n")
    return path


def load_native(path):
    """``(config, {module: {name: tensor}})`` of a native adapter; a format_version 2 adapter's
    shared pair read from its basis file in the store, ``<path>/../bases/<digest>.safetensors``."""
    from nora_serve.methods import get_method

    cfg = json.loads((path / "adapter_config.json").read_text())
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / "adapter_model.safetensors")).items():
        m, _, n = key.rpartition(".")
        groups.setdefault(m, {})[n] = t
    if cfg.get("format_version") == 2:
        basis = load_file(str(path.parent / "bases" / f"{cfg['shared_basis']['digest']}.safetensors"))
        for m, t in groups.items():
            for key, n in zip(("A", "B"), get_method(cfg["method"]).shared):
                t[n] = basis[f"{m}.{key}"]
    return cfg, groups
