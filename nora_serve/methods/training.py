"""What a method may add to training: its own hyperparameters and hooks the trainer calls.

A method with settings or a procedure of its own subclasses :class:`TrainOptions` as a dataclass
and names it in its :class:`~.registry.Method` (``options=``). Each field (made with
:func:`option`) becomes a field of ``nora_serve.train.TrainConfig`` and a ``nora-train`` flag in
an argument group of the method's own; the hooks below are called by the trainer, which knows no
method by name. Every hook has a default that does nothing, so a method overrides only what it
needs (NoRA: ``validate``, ``config``, ``prepare``; dyrank: ``validate``, ``procedure``).
Pure torch: nothing here imports the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch


def option(default, help: str, **cli):
    """A hyperparameter field with what ``nora-train`` needs to make its flag: ``help``; optional
    ``flags`` (first the name shown, then aliases; default ``--field-name``), ``choices``,
    ``metavar``, ``default_help`` (shown as ``[...]`` instead of the default), ``parse``
    (str -> value), ``negate`` (a bool whose flag sets it False), ``exclusive`` (set to other
    than its default on a run of another method: a usage error)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class RunInputs:
    """What :meth:`TrainOptions.prepare` may use, before the adapter layers exist."""

    examples: list  # the encoded training examples (``.input_ids``), in file order
    max_length: int
    dtype: torch.dtype  # the base model's dtype
    # (token sequences, power) -> {module: per-input-channel mean(|x|) ** power}: one forward
    # pass of the base over the sequences, on the CPU.
    activation_scales: Callable[[list[list[int]], float], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class BasisInputs:
    """What :meth:`TrainOptions.prepare` returns for a shared-basis method: the settings its
    basis is made with (recorded in ``shared_basis.calibration`` and its recipe) and the
    activation scales (called only when the basis is computed, not found)."""

    calibration: dict | None = None
    act_scales: Callable[[], dict[str, torch.Tensor] | None] = lambda: None


class Procedure:
    """A method's own step of the training loop (dyrank's pruning), made by
    :meth:`TrainOptions.procedure` once the layers exist. The defaults do nothing."""

    def loss(self, step: int) -> torch.Tensor | None:
        """A term added to the loss at ``step`` (0-based), or None."""
        return None

    def on_step(self, step: int) -> None:
        """After optimizer step ``step``."""

    def finish(self) -> dict[str, Any]:
        """After the last step: keys the adapter config records (dyrank: ``rank_pattern``)."""
        return {}

    def log(self) -> dict[str, Any]:
        """What ``train_log.json`` records besides the loss curve."""
        return {}


@dataclass(frozen=True)
class TrainOptions:
    """No settings of its own (the default of every method): subclass as a dataclass to add some.
    Hooks receive the configured ``rank`` (``--rank``)."""

    def validate(self, rank: int) -> None:
        """Raise ``ValueError`` naming the setting (a usage error, before anything loads)."""

    def config(self, rank: int) -> dict[str, Any]:
        """Keys the adapter config records from these settings (NoRA: ``inner_r``); the init
        and the scale rule see them too."""
        return {}

    def prepare(self, run: RunInputs) -> BasisInputs | None:
        """Before the shared basis is made (NoRA: its calibration batch)."""
        return None

    def procedure(self, layers: Mapping[str, Any], total_steps: int, rank: int) -> Procedure | None:
        """The method's own part of the loop, given its layers (each with its tensors as
        attributes, ``.r`` the rank trained, ``.tensors()``)."""
        return None
