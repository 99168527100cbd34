"""Opaque custom ops: how compiled graphs reach the CPU wrapper's LoRA work.

vLLM compiles the model's forward with torch.compile (on the CPU: Dynamo traced once, then
Inductor). The LoRA delta of a step depends on which adapters the step's rows use, which is
decided per step outside the graph (``update_metadata``), so the traced graph must not bake
any of it in. Each LoRA entry point of the CPU wrapper is therefore registered here as its own
custom op (``nora::cpu_*``) around the function that does the work: when traced, the graph
sees an op that mutates ``y`` (its fake implementation does nothing); at run time the op calls
that function, which finds the wrapper (and layer weights) by the keys it was given and reads
this step's routes. vLLM reaches its own layers the same way
(``forward_context.no_compile_layers[layer_name]``).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch

objects: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_keys = itertools.count(1)


def register(obj: Any) -> int:
    """A key under which the ops find ``obj`` (held weakly: lives as long as ``obj``)."""
    key = next(_keys)
    objects[key] = obj
    return key


def custom_op(name: str, fn: Callable[..., None]):
    """Register ``fn`` (which adds into its first argument ``y`` and returns nothing) as the
    custom op ``nora::<name>`` and return the op; ``fn`` itself stays a plain function, which
    the eager path calls directly (an op call costs a dispatch)."""
    op = torch.library.custom_op(f"nora::{name}", fn, mutates_args=("y",))
    op.register_fake(lambda *args, **kwargs: None)
    return op
