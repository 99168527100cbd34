"""GPU: vLLM's Triton punica kernels already skip no-adapter rows; this subclass only makes sure
the worker-side hooks (convert on load, prompt-logprob row mapping) are installed."""

from __future__ import annotations

from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU


class NoraPunicaWrapperGPU(PunicaWrapperGPU):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from . import hooks

        hooks.install_worker_hooks()
