"""Dynamic adapters on a live ``nora-serve --enable-nora --nora-adapter-dir`` server: load and
unload over HTTP and resolve-by-name from the store while other requests run; bad adapters of
every kind are refused with a clear 4xx error and the server keeps answering."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import make_native_adapters  # noqa: E402
from reference import reference_run  # noqa: E402
from vllm_server import assert_matches, complete  # noqa: E402
from vllm_server import VLLMServer  # noqa: E402

pytestmark = pytest.mark.server

PROMPT = [1, 23, 112, 123, 18, 47, 40, 109, 50, 127]
N = 6


@pytest.fixture(scope="module")
def native(base_dir, tmp_path_factory):
    return make_native_adapters(base_dir, tmp_path_factory.mktemp("native"), seed=1)


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _bad_adapters(base_dir, native, root: Path) -> dict[str, tuple[Path, str]]:
    """``{name: (dir, words the error must contain)}``."""
    good = native["lora"]
    cfg = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(str(good / "adapter_model.safetensors"))
    mod = "model.layers.0.self_attn.q_proj"

    def native_variant(name, cfg_=None, tensors_=None):
        d = root / name
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(cfg_ if cfg_ is not None else cfg))
        save_file(tensors_ if tensors_ is not None else tensors, str(d / "adapter_model.safetensors"))
        return d

    out = {}
    d = root / "no_config"
    d.mkdir(parents=True)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    out["no_config"] = (d, "adapter_config.json")
    d = native_variant("bad_json")
    (d / "adapter_config.json").write_text("{not json")
    out["bad_json"] = (d, "adapter_config.json")
    out["unknown_format"] = (native_variant("unknown_format", {"hello": "world"}), "unknown adapter format")
    out["unknown_peft"] = (native_variant("unknown_peft", {"peft_type": "IA3", "target_modules": ["q_proj"]}), "IA3")
    t = dict(tensors)
    del t[f"{mod}.lora_B"]
    out["missing_tensor"] = (native_variant("missing_tensor", tensors_=t), f"{mod}")
    t = dict(tensors)
    t[f"{mod}.lora_Z"] = torch.zeros(2, 2)
    out["extra_tensor"] = (native_variant("extra_tensor", tensors_=t), "lora_Z")
    t = dict(tensors)
    t[f"{mod}.lora_A"] = torch.zeros(t[f"{mod}.lora_A"].shape[0], 65)
    out["shape_mismatch"] = (native_variant("shape_mismatch", tensors_=t), "shape")
    t = dict(tensors)
    t[f"{mod}.lora_A"] = t[f"{mod}.lora_A"].clone()
    t[f"{mod}.lora_A"][0, 0] = float("nan")
    out["nan"] = (native_variant("nan", tensors_=t), "nan")
    t = dict(tensors)
    t[f"{mod}.lora_B"] = t[f"{mod}.lora_B"].clone()
    t[f"{mod}.lora_B"][1, 1] = float("inf")
    out["inf"] = (native_variant("inf", tensors_=t), "inf")
    # A pickle that would run code when unpickled: must be refused without running it.
    d = root / "evil_pickle"
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                        "target_modules": ["q_proj"]}))
    with open(d / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil(str(root / "pwned"))}, fh)
    out["evil_pickle"] = (d, "weights_only")
    # Made for another base with the same shapes: only the fingerprints tell them apart.
    from nora_serve.tiny import make_tiny_llama

    other = make_tiny_llama(root / "other_base", seed=123)
    other_native = make_native_adapters(other, root / "made_for_other", seed=2)
    out["wrong_base"] = (other_native["slora"], "fingerprint")
    # Exact rank 32 > the server's --max-lora-rank 16.
    c = {k: v for k, v in cfg.items() if k != "scaling"}
    c["r"] = 32
    big = {k: (torch.randn(32, v.shape[1]) * 0.1 if k.endswith("lora_A") else torch.randn(v.shape[0], 32) * 0.1)
           for k, v in tensors.items()}
    out["rank_too_big"] = (native_variant("rank_too_big", c, big), "rank")
    return out


@pytest.fixture(scope="module")
def store(fixtures_dir, native, tmp_path_factory):
    s = tmp_path_factory.mktemp("store")
    shutil.copytree(fixtures_dir / "peft_adalora", s / "store_adalora")
    shutil.copytree(native["nora"], s / "store_nora")
    return s


@pytest.fixture(scope="module")
def bad(base_dir, native, tmp_path_factory):
    return _bad_adapters(base_dir, native, tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def server(base_dir, fixtures_dir, store, tmp_path_factory):
    cache = tmp_path_factory.mktemp("nora-cache")
    # No VLLM_ALLOW_RUNTIME_LORA_UPDATING here: the load/unload routes are opened by our flag.
    with VLLMServer(base_dir, ["--enable-nora", "--nora-adapter-dir", str(store), "--nora-cache-dir", str(cache),
                               "--nora-allow-runtime-loading",
                               "--max-loras", "4", "--max-lora-rank", "16", "--lora-modules", f"static={fixtures_dir / 'slora'}"],
                    entry="nora_serve.cli.serve") as srv:
        yield srv


def _want(base_dir, path):
    return reference_run(str(base_dir), str(path) if path else None, tuple(PROMPT), N)


class Background:
    """Keeps requests for the base model and a static adapter running; records every result."""

    def __init__(self, srv, base_dir, fixtures_dir):
        self.jobs = [(str(base_dir), _want(base_dir, None)), ("static", _want(base_dir, fixtures_dir / "slora"))]
        self.srv, self.stop, self.results, self.errors = srv, threading.Event(), 0, []
        self.threads = [threading.Thread(target=self._loop, args=(j,), daemon=True) for j in self.jobs]

    def _loop(self, job):
        model, want = job
        while not self.stop.is_set():
            try:
                assert_matches(complete(self.srv.client, model, PROMPT, N, prompt_logprobs=False), want, model)
                self.results += 1
            except Exception as e:  # collected and asserted on in the test thread
                self.errors.append(f"{model}: {e!r}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def _load(srv, name, path, **kw):
    return srv.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **kw})


def _model_ids(srv):
    return {m["id"] for m in srv.get("/v1/models").json()["data"]}


def test_load_unload_and_resolve_while_serving(server, base_dir, fixtures_dir, native, store):
    with Background(server, base_dir, fixtures_dir) as bg:
        # Dynamic load of a native adapter (converted on load), then use it.
        r = _load(server, "dyn_dyrank", native["dyrank"])
        assert r.status_code == 200, r.text
        assert "dyn_dyrank" in _model_ids(server)
        assert_matches(complete(server.client, "dyn_dyrank", PROMPT, N), _want(base_dir, native["dyrank"]), "dyn")
        # A foreign format through the same endpoint.
        r = _load(server, "dyn_dora", fixtures_dir / "dora_dyrank")
        assert r.status_code == 200, r.text
        assert_matches(complete(server.client, "dyn_dora", PROMPT, N),
                       _want(base_dir, fixtures_dir / "dora_dyrank"), "dyn_dora")
        # Unload: gone from the list and from serving.
        r = server.post("/v1/unload_lora_adapter", {"lora_name": "dyn_dyrank"})
        assert r.status_code == 200, r.text
        assert "dyn_dyrank" not in _model_ids(server)
        r = server.post("/v1/completions", {"model": "dyn_dyrank", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404, r.text
        # Resolver: adapters in the store are servable by name on first request.
        assert "store_nora" not in _model_ids(server)
        for name, src in (("store_nora", store / "store_nora"), ("store_adalora", store / "store_adalora")):
            assert_matches(complete(server.client, name, PROMPT, N), _want(base_dir, src), name)
            assert name in _model_ids(server)
        # Unknown names are still a plain 404.
        r = server.post("/v1/completions", {"model": "no_such_adapter", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404, r.text
        time.sleep(1.0)
    assert not bg.errors, bg.errors[:3]
    assert bg.results >= 4


def test_models_root_is_the_name_not_a_path(server, store):
    """No server path in any answer: a store adapter's root is its path relative to the store."""
    r = server.post("/v1/completions", {"model": "store_nora", "prompt": PROMPT, "max_tokens": 1})
    assert r.status_code == 200, r.text
    data = {m["id"]: m for m in server.get("/v1/models").json()["data"]}
    assert data["store_nora"]["root"] == "store_nora"
    assert not any(str(store) in m["root"] or Path(m["root"]).is_absolute()
                   for m in data.values() if m["root"] != m["id"])  # the base's root is its served name


def test_bad_adapters_refused(server, base_dir, bad):
    want_base = _want(base_dir, None)
    for name, (path, words) in bad.items():
        r = _load(server, f"bad_{name}", path)
        assert r.status_code == 400, (name, r.status_code, r.text)
        msg = r.json()["error"]["message"]
        assert words.lower() in msg.lower(), (name, msg)
        assert f"bad_{name}" not in _model_ids(server)
        # The server keeps answering.
        assert_matches(complete(server.client, str(base_dir), PROMPT, N, prompt_logprobs=False), want_base, "base")
    assert not (bad["evil_pickle"][0].parent / "pwned").exists(), "the pickle ran code"


def test_missing_path_is_404(server, tmp_path):
    r = _load(server, "ghost", tmp_path / "does_not_exist")
    assert r.status_code == 404, r.text


def test_wrong_base_names_the_mismatch(server, bad):
    r = _load(server, "wrong_base_again", bad["wrong_base"][0])
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "fingerprint" in msg and "model.layers." in msg, msg


def test_bad_adapter_in_store_is_4xx_by_name(server, base_dir, store, bad):
    shutil.copytree(bad["nan"][0], store / "store_bad_nan")
    shutil.copytree(bad["wrong_base"][0], store / "store_wrong_base")
    for name, words in (("store_bad_nan", "nan"), ("store_wrong_base", "fingerprint")):
        r = server.post("/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 400, (name, r.text)
        assert words in r.json()["error"]["message"].lower(), r.text
    assert_matches(complete(server.client, str(base_dir), PROMPT, N, prompt_logprobs=False),
                   _want(base_dir, None), "base")


def test_metrics_on_vllm_metrics_endpoint(server, base_dir, native, bad, tmp_path):
    """vLLM's /metrics carries the plugin's counters and gauges, from the API server and from the
    engine process alike, and they move with what the server does."""
    before = server.metrics("nora:")
    assert 'nora:scheduler_deferrals_total{cap="dense"}' in before  # known label values start at 0
    # A conversion, then a cache hit: the same adapter under a second name.
    assert _load(server, "metrics_a", native["slora"]).status_code == 200
    assert _load(server, "metrics_b", native["slora"]).status_code == 200
    # A refusal of each kind.
    assert _load(server, "metrics_nan", bad["nan"][0]).status_code == 400
    assert _load(server, "metrics_ghost", tmp_path / "nothing_here").status_code == 404
    complete(server.client, "metrics_a", PROMPT, 2, prompt_logprobs=False)  # resident in the engine
    after = server.metrics("nora:")

    def grew(key, by=1):
        return after.get(key, 0) - before.get(key, 0) >= by

    assert grew('nora:adapter_conversions_total{format="native"}'), after
    assert grew("nora:adapter_cache_hits_total"), after
    assert grew('nora:adapter_refusals_total{reason="invalid"}'), after
    assert grew('nora:adapter_refusals_total{reason="not_found"}'), after
    assert after['nora:adapters_resident{storage="dense"}'] >= 1, after
    assert after["nora:adapter_memory_bytes"] > 0, after
    assert after["nora:adapter_cache_bytes"] > 0, after
