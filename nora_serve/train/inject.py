"""Put adapter layers into a Hugging Face causal LM, and the frozen factors they start from.

Each layer is the registered method's (``nora_serve.methods.get_method``): its init, its
trainable tensors, its forward. Frozen outer factors (NoRA's and LoRA-XS's SVD pairs, IntTune's
Nyström slices: a method's ``basis``) are computed from the base
weights *as stored* (the safetensors files, not a dtype-converted copy), so they are a
deterministic function of (base weights, method, ranks, calibration settings); the trainer
computes them once per such recipe and hands them in (``basis``, see :mod:`.basis`), so two
adapters trained from one base share them bit for bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from collections.abc import Mapping

from nora_serve.methods import InitArgs, get_method, method_names

from .layers import AdapterLinear, MethodLinear

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The methods the trainer can train: every registered method with an init.
METHODS = method_names(trainable=True)


def find_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose name ends with one of ``targets``
    (a suffix of whole name parts: ``q_proj`` or ``self_attn.q_proj``), in model order."""
    if isinstance(targets, str):
        targets = targets.split(",")
    targets = [t.strip().strip(".") for t in targets if t.strip()]
    if not targets:
        raise ValueError("no target modules given")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found, unknown = [], []
    for t in targets:
        hits = [n for n in linears if n == t or n.endswith("." + t)]
        if not hits:
            unknown.append(t)
        found += hits
    if unknown:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"unknown target module(s) {', '.join(map(repr, unknown))}: no nn.Linear in this model "
            f"has that name; its linear layers are named {', '.join(kinds)}"
        )
    order = {n: i for i, n in enumerate(linears)}
    return sorted(set(found), key=order.__getitem__)


def model_dir(name_or_path: str) -> Path | None:
    """The local directory holding the model's files (a path, or a cached Hub snapshot)."""
    from nora_serve.converters.base_identity import local_model_dir

    return local_model_dir(name_or_path)  # one resolver for the trainer, converter and server


def stored_weights(model: nn.Module, names: list[str], mdir: Path | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module, weight)`` one at a time, from the safetensors files when they hold the
    module's weight, else from the loaded module (e.g. a checkpoint with renamed keys)."""
    wanted = {f"{n}.weight": n for n in names}
    done: set[str] = set()
    if mdir is not None:
        from safetensors import safe_open

        for f in sorted(mdir.glob("*.safetensors")):
            with safe_open(f, framework="pt") as fh:
                for key in fh.keys():
                    if key in wanted and wanted[key] not in done:
                        done.add(wanted[key])
                        yield wanted[key], fh.get_tensor(key)
    for n in names:
        if n not in done:
            yield n, model.get_submodule(n).weight.detach().to("cpu")


@torch.no_grad()
def activation_scales(model: nn.Module, names: list[str], batches: list[list[int]], power: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-input-channel ``mean(|x|) ** power`` of each target's input over the calibration
    sequences (one at a time on the CPU, no padding: the same numbers on every run)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        for ids in batches:
            model(input_ids=torch.tensor([ids], device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # Clamped so that dividing the scale back out of A_o stays finite for dead channels.
    return {n: (sums[n] / counts[n]).clamp_min(1e-6) ** power for n in names}


def build_layer(
    method: str,
    base: nn.Linear,
    W0: torch.Tensor,
    *,
    r: int,
    alpha: float,
    config: Mapping | None = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    act_scale: torch.Tensor | None = None,
    gen: torch.Generator | None = None,
    basis: dict[str, torch.Tensor] | None = None,
) -> AdapterLinear:
    """One adapter layer around ``base``: the method's init (``W0``: its weight as stored, for
    methods that read it; ``basis``: its frozen shared pair, when the run has it) in the
    method's layer. ``config``: the method's own config keys (``TrainOptions.config``, e.g.
    NoRA's ``inner_r``)."""
    spec = get_method(method)
    if spec.init is None:
        raise ValueError(f"method {method!r} cannot be trained (trainable: {', '.join(METHODS)})")
    r_used = spec.start_rank(r)
    config = {"r": r_used, "lora_alpha": alpha, "use_rslora": bool(use_rslora and spec.rslora),
              **(config or {})}
    tensors = spec.init(InitArgs(r_used, base.out_features, base.in_features, config, W0, gen, act_scale,
                                 basis))
    return MethodLinear(base, spec, tensors, spec.scale(config), r_used, dropout=dropout)


def module_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one module's random init: depends on (seed, module name) only."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def inject(
    model: nn.Module,
    method: str,
    names: list[str],
    *,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    seed: int = 0,
    act_scales: dict[str, torch.Tensor] | None = None,
    basis: dict[str, dict[str, torch.Tensor]] | None = None,
    **layer_kw,
) -> dict[str, AdapterLinear]:
    """Freeze the model and replace each named ``nn.Linear`` with its adapter layer.

    ``weights`` yields ``(module, stored weight)`` (default: :func:`stored_weights` of the
    loaded modules); only methods with ``needs_w0`` read it, one weight at a time. ``basis``:
    ``{module: shared tensors}`` of a shared-basis method (else each init computes its own)."""
    model.requires_grad_(False)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if get_method(method).needs_w0:
        pairs = weights if weights is not None else stored_weights(model, names, None)
    else:
        pairs = ((n, None) for n in names)
    layers: dict[str, AdapterLinear] = {}
    for n, W0 in pairs:
        base = model.get_submodule(n)
        if W0 is not None and tuple(W0.shape) != tuple(base.weight.shape):
            raise ValueError(f"{n}: stored weight {tuple(W0.shape)} != loaded {tuple(base.weight.shape)}")
        layer = build_layer(
            method, base, W0, act_scale=(act_scales or {}).get(n), gen=module_generator(seed, n),
            basis=(basis or {}).get(n), **layer_kw
        )
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        layers[n] = layer
    # Model order, whatever order the weights came in.
    return {n: layers[n] for n in names}
