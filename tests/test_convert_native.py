"""The native format (what nora-train writes), every method: read, fold, convert, apply."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402

from nora_serve.converters import convert_adapter, detect_format, read_adapter  # noqa: E402
from nora_serve.converters.fingerprint import base_fingerprints, load_base_weights  # noqa: E402
from nora_serve.converters.native import NativeAdapter  # noqa: E402
from nora_serve.methods import nystrom_init, svd_outer  # noqa: E402

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.1.mlp.gate_proj",
]


def make_native(method: str, base_dir: Path, seed: int = 0) -> NativeAdapter:
    g = torch.Generator().manual_seed(seed)
    W = load_base_weights(base_dir, MODULES)
    r, inner = 8, 4
    cfg = {"method": method, "r": r, "lora_alpha": 16, "base_model_name_or_path": str(base_dir),
           "base_fingerprints": base_fingerprints(base_dir, MODULES)}
    tensors = {}
    for m in MODULES:
        d_out, d_in = W[m].shape
        rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
        if method == "lora":
            t = {"lora_A": rnd(r, d_in), "lora_B": rnd(d_out, r)}
        elif method == "nora":
            oA, oB = svd_outer(W[m], r)
            t = {"outer_A": oA, "outer_B": oB, "inner_A": rnd(inner, r), "inner_B": rnd(r, inner)}
        elif method in ("slora", "nlora", "inttune"):
            A, N, B = nystrom_init(W[m], r) if method != "slora" else (rnd(r, d_in), rnd(r, r), rnd(d_out, r))
            t = {"lora_A": A, "lora_N": N + rnd(r, r), "lora_B": B}
        elif method == "dyrank":
            c = rnd(r)
            c[[1, 5]] = 0.0  # pruned components
            t = {"lora_A": rnd(r, d_in), "lora_c": c, "lora_B": rnd(d_out, r)}
        tensors[m] = t
    if method == "nora":
        cfg["inner_r"] = inner
        cfg["shared_basis"] = {"rule": "svd", "r": r, "calibration": None}
    return NativeAdapter(cfg, tensors)


METHODS = ["lora", "nora", "slora", "nlora", "inttune", "dyrank"]
EXPECTED_RANK = {"lora": 8, "nora": 4, "slora": 8, "nlora": 8, "inttune": 8, "dyrank": 6}


@pytest.mark.parametrize("method", METHODS)
def test_native_roundtrip(method, base_dir, tmp_path):
    ad = make_native(method, base_dir)
    src = ad.save(tmp_path / "src")
    assert detect_format(src) == "native"
    d = read_adapter(src, base=base_dir)
    assert (d.format, d.method) == ("native", method)
    assert set(d.modules) == set(MODULES)
    assert d.base_fingerprints == ad.config["base_fingerprints"]
    if method == "nora":
        assert d.shared_basis["rule"] == "svd"
    for m in MODULES:
        # The reader's factors are the method's own: same delta as NativeAdapter.factors.
        torch.testing.assert_close(d.modules[m].dense(), ad.factors(m).dense().double(),
                                   rtol=1e-5, atol=1e-6)
    rep = convert_adapter(src, tmp_path / "out", base=base_dir, verify=True, progress=False)
    assert {r for _, _, r, _ in rep.rows} == {EXPECTED_RANK[method]}
    assert {k for _, k, _, _ in rep.rows} == {EXPECTED_RANK[method]}
    assert rep.verify_error < 1e-6

    # End to end: the converted adapter through stock PEFT equals the native deltas merged.
    ids = torch.arange(1, 25).reshape(2, 12)
    want = ref.load_base(base_dir)
    named = dict(want.named_modules())
    with torch.no_grad():
        for m in MODULES:
            named[m].weight += ad.factors(m).dense().to(torch.float32)
    got = ref.peft_model(base_dir, tmp_path / "out")
    assert ref.max_abs_diff(ref.logits(got, ids), ref.logits(want, ids)) <= 1e-4


def test_native_scale_mismatch_refused(base_dir, tmp_path):
    from nora_serve.converters import AdapterError

    ad = make_native("lora", base_dir)
    src = ad.save(tmp_path / "src")
    import json

    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["scaling"] = 3.0
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="scaling"):
        read_adapter(src)


def test_native_without_base_keeps_recorded_fingerprints(base_dir, tmp_path):
    ad = make_native("slora", base_dir)
    src = ad.save(tmp_path / "src")
    rep = convert_adapter(src, tmp_path / "out", progress=False)
    import json

    meta = json.loads((tmp_path / "out/nora_convert.json").read_text())
    assert meta["base_fingerprints"] == ad.config["base_fingerprints"]
    assert meta["method"] == "slora" and rep.format == "native"


def test_truncation_reports_exact_error(base_dir, tmp_path):
    ad = make_native("lora", base_dir)
    src = ad.save(tmp_path / "src")
    rep = convert_adapter(src, tmp_path / "out", max_rank=3, allow_truncation=True, verify=True,
                          progress=False)
    d = read_adapter(src)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "out/adapter_model.safetensors"))
    for m, k, r, e in rep.rows:
        assert (k, r) == (8, 3)
        dW = d.modules[m].dense()
        got = t[f"base_model.model.{m}.lora_B.weight"].double() @ t[f"base_model.model.{m}.lora_A.weight"].double()
        assert abs(float((dW - got).norm() / dW.norm()) - e) < 1e-5
    assert rep.verify_error > 0.01  # verify sees the truncation too
