"""The method registry: one :class:`Method` per adapter method, defined in its own module
(``nora_serve/methods/<method>.py``) and registered once with :func:`register_method`.

Everything outside ``nora_serve/methods/`` asks the registry (``get_method(name)``) for what a
method is: its tensors, its scale rule, its factors ``ΔW = P Q``, its forward, its shared basis
and core, its trainable tensors and their init, its own training hyperparameters and hooks
(``options``, :mod:`.training`). Nothing else compares method names.

A method's tensors, per module, are keyed by their short names (``lora_A``, ``outer_B``, ...);
the native format stores them as ``<module>.<name>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .base import Factors
from .training import TrainOptions

Tensors = Mapping[str, torch.Tensor]


def lora_rule(config: Mapping) -> float:
    """PEFT's scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
    alpha, r = float(config["lora_alpha"]), int(config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


@dataclass(frozen=True)
class InitArgs:
    """What a method's trainer init may use for one module."""

    r: int  # the configured rank (NoRA: outer; dyrank: the target)
    d_out: int
    d_in: int
    config: Mapping  # r, lora_alpha, use_rslora and the method's own keys (TrainOptions.config)
    W0: torch.Tensor | None = None  # the base weight as stored (methods with ``needs_w0``)
    gen: torch.Generator | None = None  # this module's generator
    act_scale: torch.Tensor | None = None  # activation-aware SVD scale (``calibration`` methods)
    # The frozen shared tensors (named as in ``shared``), computed or found once per run by the
    # trainer (the basis file); None: the init computes them with ``basis``.
    basis: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Method:
    """Everything about one method. Callables take a module's tensors ``t`` (short names)."""

    name: str
    summary: str  # one line: its delta and scale (``nora-train --help``, the README)
    tensors: tuple[str, ...]  # per module, in saving order
    factors: Callable[[Tensors, float], Factors]  # ΔW = P Q with the scale folded in
    # x [n, d_in] -> x ΔWᵀ by the method's own sequence of operations (the trainer's forward and
    # ``--verify``'s). ``W`` is the base weight, for methods with ``needs_weight``.
    forward: Callable[..., torch.Tensor]
    check: Callable[[Tensors], tuple[str, str] | None]  # shapes: None or (tensor, what is wrong)
    rank: Callable[[Tensors], int]  # source rank (inner size of the factors)
    shape: Callable[[Tensors], tuple[int, int]]  # (d_out, d_in)
    scale: Callable[[Mapping], float] = lora_rule  # ``s`` from the adapter config
    vectors: tuple[str, ...] = ()  # the 1-D tensors among ``tensors``
    config_keys: tuple[str, ...] = ()  # numeric config keys the scale needs beyond r, lora_alpha
    rslora: bool = False  # takes ``use_rslora``
    # ΔW = L C R without forming L C (the fold's Chain), where cheaper than the factors.
    chain: Callable[[Tensors, float], tuple] | None = None
    # Shared basis: ``ΔW = B_sh C A_sh`` with (A_sh, B_sh) = the tensors named in ``shared``, a
    # deterministic function of the base weight (``basis``), and C the adapter's own core.
    shared: tuple[str, str] | None = None
    shared_rule: str | None = None  # recorded in the config's ``shared_basis``
    basis: Callable[..., dict[str, torch.Tensor]] | None = None  # (W0, r[, act_scale]) -> tensors
    # C from the adapter's own tensors: products and scalings only (``@``, ``*``), so that one
    # call serves every module at once on a float64 stack of them (converters/shared_basis.py).
    core: Callable[[Tensors, float], torch.Tensor] | None = None
    frozen_variant: str | None = None  # the method with this one's shared tensors frozen
    # Training.
    trainable: tuple[str, ...] = ()  # the tensors that train; the others are frozen buffers
    init: Callable[[InitArgs], dict[str, torch.Tensor]] | None = None
    needs_w0: bool = False  # init reads the stored base weight
    needs_weight: bool = False  # forward reads the base weight (not a delta of the input alone)
    start_rank: Callable[[int], int] = lambda r: r  # the rank trained from the configured one
    # Its own hyperparameters and training hooks (a TrainOptions dataclass, see .training).
    options: type[TrainOptions] = TrainOptions
    # Storage.
    native: bool = True  # has the native format (else only its foreign one)
    foldable: bool = True  # a low-rank delta relative to W0 (else ``nora-convert`` refuses)
    # Served though not foldable: (t, s, W) -> (A, B', v), ``y = v ⊙ (W x) + B' A x + bias``: a
    # LoRA plus a per-row scale of the base output (the plugin's output_scale.py).
    serving_form: Callable[[Tensors, float, torch.Tensor], tuple] | None = None
    # Save in a foreign format instead of the native one: (config, {module: tensors}) ->
    # (adapter_config.json, flat tensors).
    export: Callable[[dict, dict], tuple[dict, dict[str, torch.Tensor]]] | None = None

    @property
    def shared_basis(self) -> bool:
        return self.shared is not None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method``; another method under a registered name is an error."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r} (known: {', '.join(method_names())})") from None


def method_names(*, native: bool | None = None, trainable: bool | None = None,
                 shared_basis: bool | None = None) -> tuple[str, ...]:
    """Registered method names in registration order, filtered by what they have."""
    out = []
    for name, m in _METHODS.items():
        if native is not None and m.native != native:
            continue
        if trainable is not None and (m.init is not None) != trainable:
            continue
        if shared_basis is not None and m.shared_basis != shared_basis:
            continue
        out.append(name)
    return tuple(out)


def is_method(name) -> bool:
    return isinstance(name, str) and name in _METHODS


# -- helpers the method modules share -----------------------------------------------------------
def kaiming_(t: torch.Tensor, gen: torch.Generator | None, a: float = math.sqrt(5)) -> torch.Tensor:
    """``nn.init.kaiming_uniform_`` (fan_in = t.shape[1]) drawn from ``gen``."""
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = gain * math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound)
    return t


def mm(x: torch.Tensor, *ts: torch.Tensor) -> torch.Tensor:
    """``x @ t1ᵀ @ t2ᵀ ...`` in ``x``'s dtype: a chain of small products, never a dense ΔW."""
    for t in ts:
        x = x @ t.to(x.dtype).T
    return x


def check_pairs(t: Tensors, *rules: tuple[str, bool, str]) -> tuple[str, str] | None:
    """The first failing ``(tensor, ok, message)`` rule as ``(tensor, message)``."""
    for name, ok, msg in rules:
        if not ok:
            return name, msg
    return None


def max_rank_check(name: str, r: int, d_out: int, d_in: int) -> None:
    if r > min(d_out, d_in):
        raise ValueError(f"{name} rank {r} exceeds min(d_out, d_in) = {min(d_out, d_in)} of a target")
