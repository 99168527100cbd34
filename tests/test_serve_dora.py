"""PEFT's DoRA (``use_dora=True``) served per request: a LoRA in the adapter's slot plus a per-slot
scale of the base output. Served next to the base model and other adapters in one concurrent
batch, each request matches its own reference: stock PEFT's forward for the DoRA adapters, the
merged-delta reference for the others (prompt logprobs within 1e-3, fp32)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dora_cases import make_peft_dora, moves_beyond_lora, peft_run, train_dora  # noqa: E402
from adapters import make_native_adapters  # noqa: E402
from reference import reference_run  # noqa: E402
from vllm_server import assert_matches, complete  # noqa: E402
from vllm_server import NORA_ENTRY, VLLMServer  # noqa: E402

pytestmark = pytest.mark.server

MAX_TOKENS = 6
PROMPTS = [[1, 127, 91, 85, 88, 39, 78, 92, 20], [1, 23, 112, 123, 18, 47, 40]]


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    native = make_native_adapters(base_dir, root / "native", seed=5)
    return {"peft_dora": make_peft_dora(base_dir, root / "peft_dora", seed=1),
            "peft_dora_b": make_peft_dora(base_dir, root / "peft_dora_b", seed=2, r=4, alpha=4),
            "trained_dora": train_dora(base_dir, root / "trained_dora"),
            "lora": native["lora"], "nora": native["nora"]}


@pytest.fixture(scope="module")
def server(base_dir, adapters, tmp_path_factory):
    cache = tmp_path_factory.mktemp("nora-cache")
    with VLLMServer(base_dir, ["--enable-nora", "--nora-cache-dir", str(cache), "--max-num-seqs", "16",
                               "--max-loras", "6", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items())],
                    entry=NORA_ENTRY) as srv:
        yield srv


def _want(base_dir, adapters, name, prompt):
    if name is None or "dora" not in name:
        return reference_run(str(base_dir), str(adapters[name]) if name else None, tuple(prompt), MAX_TOKENS)
    return peft_run(str(base_dir), str(adapters[name]), tuple(prompt), MAX_TOKENS)


def test_dora_needs_its_magnitudes(base_dir, adapters):
    """Otherwise a server that served DoRA's ``s B A`` as a plain LoRA would pass."""
    for name in ("peft_dora", "peft_dora_b", "trained_dora"):
        assert moves_beyond_lora(base_dir, adapters[name], PROMPTS[0], MAX_TOKENS) > 1e-2, name


def test_dora_per_request_in_a_mixed_batch(server, base_dir, adapters):
    names = [None, "peft_dora", "lora", "trained_dora", "nora", "peft_dora_b", None]
    jobs = [(n, p) for n in names for p in PROMPTS]
    wants = [_want(base_dir, adapters, n, p) for n, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as ex:
        gots = list(ex.map(lambda j: complete(server.client, j[0] or str(base_dir), j[1], MAX_TOKENS), jobs))
    for (n, _), got, want in zip(jobs, gots, wants):
        assert_matches(got, want, n or "base")


def test_convert_refuses_dora_and_says_how_to_serve(adapters, tmp_path):
    exe = Path(sys.executable).parent / "nora-convert"
    p = subprocess.run([str(exe), str(adapters["peft_dora"]), str(tmp_path / "out")], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert "nora-serve" in p.stderr and "DoRA" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
