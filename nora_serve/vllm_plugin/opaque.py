"""One opaque custom op through which compiled graphs reach the CPU wrapper's LoRA work.

vLLM compiles the model's forward with torch.compile (on the CPU: Dynamo traced once, then
Inductor). The LoRA delta of a step depends on which adapters the step's rows use, which is
decided per step outside the graph (``update_metadata``), so the traced graph must not bake
any of it in. Every LoRA entry point of the CPU wrapper therefore becomes one call of
``torch.ops.nora.cpu_lora`` when traced: the graph sees an op that mutates ``y`` (its fake
implementation does nothing), and at run time the op hands ``y``/``x`` to the object that
registered ``key`` (a punica wrapper or a shared-basis layer), which reads this step's routes.
vLLM reaches its own layers the same way (``forward_context.no_compile_layers[layer_name]``).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_objects: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_keys = itertools.count(1)


def register(obj: Any) -> int:
    """A key under which ``cpu_lora`` finds ``obj`` (held weakly: lives as long as ``obj``)."""
    key = next(_keys)
    _objects[key] = obj
    return key


@torch.library.custom_op("nora::cpu_lora", mutates_args=("y",))
def cpu_lora(y: torch.Tensor, x: torch.Tensor, key: int, call: str,
             weights: list[torch.Tensor], scale: float, sizes: list[int]) -> None:
    _objects[key].nora_eager(call, y, x, weights, scale, sizes)


@cpu_lora.register_fake
def _(y, x, key, call, weights, scale, sizes) -> None:
    return None
