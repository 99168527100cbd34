"""The CPU punica wrapper on its own: routes built once per step, logits / embedding LoRA
skipped unless a slot of the step has weights there, and its entry points traced by
torch.compile as one opaque op that reads the current step at run time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _wrapper(mapping, slot_ids):
    from vllm.lora.layers import LoRAMapping

    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    w = NoraPunicaWrapperCPU(64, 16, "cpu")
    w.update_metadata(LoRAMapping(mapping, mapping, is_prefill=True), slot_ids, len(slot_ids), 100)
    return w


@pytest.mark.parametrize("route_mode", ["all", "seg"])
def test_logits_lora_only_where_a_slot_has_weights(route_mode):
    """Slot 1 has lm_head weights, slot 0 none: a step of slot-0 rows skips the logits LoRA
    (its slot is all zero anyway), a step with slot-1 rows applies it to exactly those rows."""
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(2, 1, 4, 16)
    b = torch.zeros(2, 1, 32, 4)
    a[1, 0] = torch.randn(4, 16, generator=g)
    b[1, 0] = torch.randn(32, 4, generator=g)
    mapping = (5, 5, 5) if route_mode == "all" else (5, 7, 0)
    w = _wrapper(mapping, [5, 7])
    x = torch.randn(3, 16, generator=g)
    y = torch.zeros(3, 32)
    w.add_lora_logits(y, x, a, b, 1.0)
    want = torch.zeros(3, 32)
    if route_mode == "seg":
        want[1] = x[1] @ a[1, 0].T @ b[1, 0].T
    torch.testing.assert_close(y, want)
    # The live check is cached per (stack, slot, adapter id) and sees new weights under a new id.
    assert not w._any_live(b, [0]) and w._any_live(b, [1])


def test_compiled_graph_reads_each_steps_routes():
    """torch.compile(fullgraph=True) of a layer call: the graph holds the opaque op, and one
    compiled function serves two steps with different adapters exactly as eager does."""
    import nora_layer_cases as cases
    from vllm.lora.layers import LoRAMapping

    from nora_serve.vllm_plugin import opaque  # noqa: F401  (registers torch.ops.nora.cpu_lora)
    from nora_serve.vllm_plugin.punica_cpu import NoraPunicaWrapperCPU

    lay, plan, want = cases.build()
    lay = type("Layer", (type(lay),), {})(**vars(lay))  # weak-referencable, as a real layer
    lay._nora_key = opaque.register(lay)
    w = NoraPunicaWrapperCPU(64, 16, "cpu")
    lw = cases.weights(lay)
    lay.nora_eager = lambda call, y, x, weights, scale, sizes: w.nora_linear_eager(y, x, lw)
    rows = len(cases.MAPPING)
    x = torch.randn(rows, cases.D_IN, generator=torch.Generator().manual_seed(3))

    def layer_forward(x):
        y = torch.zeros(x.shape[0], sum(cases.SLICES))
        w.add_nora_linear(y, x, lw)
        return y * 1.0

    compiled = torch.compile(layer_forward, fullgraph=True, dynamic=True)
    for mapping in (cases.MAPPING, tuple(reversed(cases.MAPPING))):
        w.update_metadata(LoRAMapping(mapping, mapping, is_prefill=True), cases.SLOT_IDS,
                          cases.MAX_LORAS, 100)
        eager = layer_forward(x)
        torch.testing.assert_close(compiled(x), eager)
        assert eager.abs().sum() > 0
