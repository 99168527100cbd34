"""``--nora-preload-store``: the store's adapters are resident when the server first answers,
and answer exactly as without it.

One real ``nora-serve`` over a store of shared-basis adapters (``format_version 2``: two NoRA,
two IntTune, trained from the test base), two dense ones (a native LoRA and an SLoRA) and two at
fault (a core-only adapter whose basis is nowhere, a NaN core). Right after ``/health``,
before any request, ``/metrics`` must show the six good ones resident (four as cores, two
dense); then each one's first request answers its reference (transformers on the merged weights,
tokens and logprobs within 1e-3) without a conversion or a new resident adapter, and the two at
fault answer their one-line 400 as without preload.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters, train_shared_basis_adapters  # noqa: E402
from reference import reference_run  # noqa: E402
from vllm_server import NORA_ENTRY, VLLMServer, assert_matches, complete  # noqa: E402

PROMPT = [1, 23, 112, 123, 18, 47, 40, 109]
N_TOKENS = 4
CORES = ("nora_a", "nora_b", "inttune_a", "inttune_b")
DENSE = ("n_lora", "n_slora")


def _store(base_dir, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("preload")
    store = root / "store"
    store.mkdir()
    shared = train_shared_basis_adapters(base_dir, tmp_path_factory)
    for name in CORES:
        shutil.copytree(shared[name], store / name)
    shutil.copytree(shared[CORES[0]].parent / "bases", store / "bases")  # each basis once, as nora-train keeps it
    native = make_native_adapters(base_dir, root / "native", seed=5)
    for name in DENSE:
        shutil.copytree(native[name.removeprefix("n_")], store / name)
    # At fault: a basis digest found nowhere, and a NaN in a core-only adapter's own tensors.
    no_basis = store / "no_basis"
    shutil.copytree(shared["nora_a"], no_basis)
    cfg = json.loads((no_basis / "adapter_config.json").read_text())
    cfg["shared_basis"]["digest"] = "0123456789abcdef0123456789abcdef"
    (no_basis / "adapter_config.json").write_text(json.dumps(cfg))
    nan = store / "nan_core"
    shutil.copytree(shared["nora_b"], nan)
    t = load_file(str(nan / "adapter_model.safetensors"))
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    save_file(t, str(nan / "adapter_model.safetensors"))
    return store


@pytest.mark.server
def test_preloaded_store_adapters_are_resident_at_start_and_answer_as_before(base_dir, tmp_path_factory):
    store = _store(base_dir, tmp_path_factory)
    want = {n: reference_run(str(base_dir), str(store / n), tuple(PROMPT), N_TOKENS) for n in CORES + DENSE}
    assert len({tuple(w["tokens"]) for w in want.values()}) >= len(want) - 1, "adapters too alike"
    cache = tmp_path_factory.mktemp("preload-cache")
    with VLLMServer(base_dir, ["--enable-nora", "--nora-adapter-dir", str(store), "--nora-cache-dir", str(cache),
                               "--nora-preload-store", "--max-loras", "8", "--max-cpu-loras", "8",
                               "--max-lora-rank", "16", "--nora-dense-loras", "4"],
                    entry=NORA_ENTRY, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0"}) as srv:
        at_start = srv.metrics("nora:")
        resident = {s: at_start.get(f'nora:adapters_resident{{storage="{s}"}}') for s in ("cores", "dense")}
        assert resident == {"cores": len(CORES), "dense": len(DENSE)}, at_start
        assert at_start.get("nora:bases_resident") == 2, at_start  # NoRA's and IntTune's
        # The workers made the core-only ones from the cores the API server sent (not reading
        # and hashing each entry again), the dense ones through the cache.
        assert "nora: 6 adapters loaded in bulk (4 of them from the cores the API server sent), 0 not" \
            in srv.log.read_text(errors="replace")
        converted = sum(v for k, v in at_start.items() if k.startswith("nora:adapter_conversions_total"))
        listed = {m["id"] for m in srv.get("/v1/models").json()["data"]}
        assert set(CORES + DENSE) <= listed, listed  # known to the API server as resolved
        assert not {"no_basis", "nan_core"} & listed
        for name in CORES + DENSE:
            assert_matches(complete(srv.client, name, PROMPT, N_TOKENS), want[name], f"preloaded {name}")
        after = srv.metrics("nora:")
        # Their first requests found them resident: nothing converted, nothing loaded.
        assert sum(v for k, v in after.items() if k.startswith("nora:adapter_conversions_total")) == converted
        assert {s: after.get(f'nora:adapters_resident{{storage="{s}"}}') for s in ("cores", "dense")} == resident
        # The adapters at fault answer as without preload: one line, 400, naming the fault.
        for name, words in (("no_basis", "0123456789abcdef0123456789abcdef"), ("nan_core", "NaN")):
            r = srv.post("/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2})
            msg = r.json().get("error", {}).get("message", "")
            assert r.status_code == 400 and words in msg and "\n" not in msg, (name, r.status_code, r.text)
        # The base model is unchanged by all of it.
        assert_matches(complete(srv.client, str(base_dir), PROMPT, N_TOKENS),
                       reference_run(str(base_dir), None, tuple(PROMPT), N_TOKENS), "base")
        assert srv.get("/health").status_code == 200


def test_preload_needs_the_store(base_dir):
    p = subprocess.run([sys.executable, "-m", NORA_ENTRY, str(base_dir), "--enable-nora", "--nora-preload-store"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "--nora-preload-store" in p.stderr and "--nora-adapter-dir" in p.stderr, p.stderr[-2000:]
