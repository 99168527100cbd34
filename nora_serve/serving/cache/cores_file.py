"""A cache entry's cores file (``cores.safetensors``): a shared-basis adapter's ``r x r`` cores
stacked by shape and dtype, one tensor per stack (``stack.<i>``, ``[n, r, c]``) with the module
names of each stack in the file's metadata. Writing, reading and casting an adapter's cores then
costs an op or two, not one per module: a store's bulk load reads thousands of them, and per
module that was most of its time. A file with one tensor per module name (as entries were first
written) reads as well."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT = "nora-stacked-cores"


def write_cores(path: str | Path, cores: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    stacks: dict[tuple, list[str]] = {}
    for name in sorted(cores):
        t = cores[name]
        stacks.setdefault((t.dtype, tuple(t.shape)), []).append(name)
    tensors, meta = {}, {"format": FORMAT}
    for i, names in enumerate(stacks.values()):
        tensors[f"stack.{i}"] = torch.stack([cores[n] for n in names]).contiguous()
        meta[f"stack.{i}"] = json.dumps(names)
    save_file(tensors, str(path), metadata=meta)


def read_cores(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{module: core}``, each in ``dtype`` if given (one cast per stack; the cores are views
    of their stack)."""
    return unstack(read_stacks(path), dtype)


def read_stacks(path: str | Path) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """The file's stacks as they are stored: ``(module names, [n, r, c] tensor)`` each (a file
    of one tensor per module: one stack per module). What ``--nora-preload-store`` hands the
    workers: a tensor or two per adapter to send, not one per module."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("format") != FORMAT:
        return [((k,), t.unsqueeze(0)) for k, t in tensors.items()]
    out = []
    for key, t in tensors.items():
        names = json.loads(meta.get(key, "[]"))
        if not isinstance(names, list) or len(names) != t.shape[0]:
            raise ValueError(f"{path}: tensor {key}: {t.shape[0]} cores but "
                             f"{len(names) if isinstance(names, list) else 'no'} module names")
        out.append((tuple(names), t))
    return out


def stacks_to_wire(stacks) -> list:
    """The stacks as plain values (names, dtype name, shape, bytes) for vLLM's engine calls,
    whose encoding carries no tensors to the workers; :func:`stacks_from_wire` undoes it."""
    return [[list(names), str(t.dtype).removeprefix("torch."), list(t.shape), _bytes(t)]
            for names, t in stacks]


def _bytes(t: torch.Tensor) -> bytes:  # through an integer view: numpy has no bfloat16
    t = t.contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def stacks_from_wire(wire) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    out = []
    for names, dtype, shape, data in wire:
        kind = getattr(torch, dtype)
        t = (torch.frombuffer(bytearray(data), dtype=kind) if data else torch.empty(0, dtype=kind)).reshape(shape)
        out.append((tuple(names), t))
    return out


def unstack(stacks, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``{module: core}`` from :func:`read_stacks`' stacks, each in ``dtype`` if given."""
    out: dict[str, torch.Tensor] = {}
    for names, t in stacks:
        out.update(zip(names, (t if dtype is None else t.to(dtype)).unbind(0)))
    return out
