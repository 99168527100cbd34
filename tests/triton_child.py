"""Triton's interpreter (TRITON_INTERPRET=1) must be set before triton is imported and reroutes
CPU tensors of the whole process to Triton, so a test file that needs it reruns itself in a
child pytest with the variable set; its tests run only there (or directly on a CUDA machine)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

CHILD = os.environ.get("NORA_TRITON_CHILD") == "1"
HAVE_CUDA = torch.cuda.is_available()
RUN_HERE = CHILD or HAVE_CUDA


def have_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except Exception:
        return False


def run_child(test_file: str, timeout: int) -> str:
    """Run ``test_file`` in a child pytest under the interpreter; its output, after checking
    that it passed with no failures."""
    env = dict(os.environ, TRITON_INTERPRET="1", NORA_TRITON_CHILD="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail
    return proc.stdout
