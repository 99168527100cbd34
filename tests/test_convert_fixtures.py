"""Every fixture adapter, converted, reproduces the reference logits of its own code.

Applied to base/ two independent ways: stock PEFT (PeftModel.from_pretrained on transformers'
LlamaForCausalLM) and plain ``W += scale · B @ A``. Ranks are the true ranks of the deltas.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402

from nora_serve.converters import convert_adapter, detect_format, read_adapter  # noqa: E402

# fixture folder (SRC relative to fixtures/) -> detected format
FIXTURES = {
    "slora": ("slora", "three_matrix"),
    "nlora": ("nlora", "three_matrix"),
    "inttune": ("inttune", "three_matrix"),
    "dora_dyrank": ("dora_dyrank/checkpoint", "dora_dyrank"),
    "peft_lora_rank_pattern": ("peft_lora_rank_pattern", "peft_lora"),
    "peft_adalora": ("peft_adalora", "peft_adalora"),
    "peft_vera": ("peft_vera", "peft_vera"),
    "peft_pissa": ("peft_pissa", "peft_lora"),
}
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(fixtures_dir, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    reports = {}
    for name, (src, _) in FIXTURES.items():
        reports[name] = convert_adapter(fixtures_dir / src, out / name, base=base_dir,
                                        verify=True, progress=False)
    return out, reports


@pytest.fixture(scope="module")
def base_model(base_dir):
    return ref.load_base(base_dir)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_detect_format(fixtures_dir, name):
    src, fmt = FIXTURES[name]
    assert detect_format(fixtures_dir / src) == fmt


def test_methods_recognised(converted):
    _, reports = converted
    assert reports["slora"].method == "slora"
    assert reports["nlora"].method == "nlora"
    assert reports["inttune"].method == "inttune"  # A, B are still W0 slices: checked with --base
    assert reports["dora_dyrank"].method == "dyrank"
    assert reports["peft_adalora"].method == "adalora"
    assert reports["peft_vera"].method == "vera"


@pytest.mark.parametrize("name", list(FIXTURES))
def test_plain_merge_reproduces_reference(fixtures_dir, base_dir, converted, name):
    out, _ = converted
    ids, want = ref.reference_logits(fixtures_dir / name)
    model = ref.merge_plain(ref.load_base(base_dir), out / name)
    got = ref.logits(model, ids)
    assert ref.max_abs_diff(got, want) <= TOL
    # The adapter matters: the base alone is far from the reference.
    base_logits = ref.logits(ref.load_base(base_dir), ids)
    assert ref.max_abs_diff(base_logits, want) > 10 * TOL


@pytest.mark.parametrize("name", list(FIXTURES))
def test_stock_peft_reproduces_reference(fixtures_dir, base_dir, converted, name):
    out, _ = converted
    assert (out / name / "README.md").is_file()  # the model card does not disturb PEFT
    ids, want = ref.reference_logits(fixtures_dir / name)
    model = ref.peft_model(base_dir, out / name)
    assert ref.max_abs_diff(ref.logits(model, ids), want) <= TOL


@pytest.mark.parametrize("name", list(FIXTURES))
def test_model_card(base_dir, converted, name):
    """README.md as PEFT's save_pretrained writes one (YAML front matter: library_name, base_model)
    plus what the conversion did: source method and format, ranks, truncation error, base."""
    from nora_serve.converters.peft_writer import base_identity

    out, reports = converted
    rep = reports[name]
    text = (out / name / "README.md").read_text()
    head, sep, body = text.removeprefix("---\n").partition("\n---\n")
    assert text.startswith("---\n") and sep
    front = dict(l.split(": ", 1) for l in head.splitlines() if ": " in l)
    assert front["library_name"] == "peft"
    assert json.loads(front["base_model"]) == str(base_dir.resolve())  # converted with --base
    meta = json.loads((out / name / "nora_convert.json").read_text())
    ranks = [r for _, _, r, _ in rep.rows if r > 0]
    assert f"| source method | `{rep.method}` |" in body
    assert f"| source format | `{FIXTURES[name][1]}` |" in body
    assert f"| modules | {len(ranks)} folded" in body
    assert f"| folded rank | min {min(ranks)}, max {max(ranks)} " in body
    assert f"| max truncation error | {rep.max_rel_error:.3e} " in body
    assert f"| base model | `{base_dir.resolve()}` |" in body
    assert base_identity(meta) in body and base_identity(meta).startswith("sha256:")


def test_model_card_without_base(fixtures_dir, base_dir, tmp_path):
    """No --base and a source that names none: no base_model line, and the card says so; the
    folder still loads through stock PEFT (checked with the base for the shapes)."""
    src = fixtures_dir / "peft_lora_rank_pattern"
    cfg = json.loads((src / "adapter_config.json").read_text())
    if cfg.get("base_model_name_or_path"):
        cfg["base_model_name_or_path"] = None
        src = tmp_path / "src"
        src.mkdir()
        for f in (fixtures_dir / "peft_lora_rank_pattern").iterdir():
            (src / f.name).write_bytes(f.read_bytes())
        (src / "adapter_config.json").write_text(json.dumps(cfg))
    rep = convert_adapter(src, tmp_path / "o", progress=False)
    text = (tmp_path / "o/README.md").read_text()
    assert "library_name: peft" in text and "base_model:" not in text
    assert "| base model | not recorded |" in text
    assert f"max {rep.max_rank} " in text
    model = ref.peft_model(base_dir, tmp_path / "o")
    assert type(model).__name__.startswith("PeftModel")


def _true_rank(P: torch.Tensor, Q: torch.Tensor) -> int:
    dW = P.double() @ Q.double()
    if dW.abs().max() == 0:
        return 0
    return int(torch.linalg.matrix_rank(dW))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_folded_rank_is_true_rank(fixtures_dir, base_dir, converted, name):
    out, reports = converted
    d = read_adapter(fixtures_dir / FIXTURES[name][0], base=base_dir)
    rows = {m: (k, r, e) for m, k, r, e in reports[name].rows}
    assert set(rows) == set(d.entries)
    for m, f in d.modules.items():
        k, r, e = rows[m]
        assert r == _true_rank(f.P, f.Q), m
        assert e == 0.0
    if name == "dora_dyrank":
        # Per-module ranks survive: unpruned components with c != 0, 5 to 10 by the README.
        ranks = {r for _, r, _ in rows.values()}
        assert min(ranks) == 5 and max(ranks) == 10
        pruned = torch.load(fixtures_dir / "dora_dyrank/checkpoint/prune_state_dict.pt",
                            weights_only=True)["finally_mask_dict"]
        for m, mask in pruned.items():
            assert rows[m][1] <= int((~mask).sum())
    if name == "peft_pissa":
        assert max(r for _, r, _ in rows.values()) <= 16  # at most 2r, r = 8


@pytest.mark.parametrize("name", list(FIXTURES))
def test_verify_reports_tiny_error(converted, name):
    _, reports = converted
    assert reports[name].verify_error is not None
    assert reports[name].verify_error < 1e-6


@pytest.mark.parametrize("name", list(FIXTURES))
def test_output_is_stock_peft_lora_with_unit_scale(converted, name):
    out, reports = converted
    d = out / name
    assert sorted(p.name for p in d.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "nora_convert.json"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    ranks = {m: r for m, _, r, _ in reports[name].rows if r > 0}
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert cfg["r"] == max(ranks.values()) == cfg["lora_alpha"]
    assert cfg["rank_pattern"] == ranks == cfg["alpha_pattern"]
    assert sorted(cfg["target_modules"]) == sorted(ranks)
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        for m, r in ranks.items():
            A = fh.get_tensor(f"base_model.model.{m}.lora_A.weight")
            B = fh.get_tensor(f"base_model.model.{m}.lora_B.weight")
            assert A.shape[0] == r == B.shape[1]
            # Balanced: ||B'||_F == ||A'||_F.
            assert math.isclose(float(A.norm()), float(B.norm()), rel_tol=1e-4)
    assert keys == {f"base_model.model.{m}.lora_{x}.weight" for m in ranks for x in "AB"}
    meta = json.loads((d / "nora_convert.json").read_text())
    assert meta["source_format"] == FIXTURES[name][1]
    assert set(meta["base_fingerprints"]) == set(reports[name].rows[i][0] for i in range(len(reports[name].rows)))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_vllm_peft_helper_sees_unit_scale(converted, name):
    """vLLM's own config reader gives every module its rank and a scale of exactly 1."""
    pytest.importorskip("vllm")
    from vllm.lora.peft_helper import PEFTHelper

    out, reports = converted
    helper = PEFTHelper.from_local_dir(str(out / name), max_position_embeddings=None)
    assert helper._validate_features() == []
    for m, _, r, _ in reports[name].rows:
        if r:
            assert helper.get_rank_and_scaling(m) == (r, 1.0)


def test_dora_lora_alpha_option(fixtures_dir, tmp_path):
    """--lora-alpha scales the whole delta (default: the target rank, 8 for start rank 12)."""
    src = fixtures_dir / "dora_dyrank/checkpoint"
    d_default = read_adapter(src)
    d_16 = read_adapter(src, lora_alpha=16)
    m = next(iter(d_default.entries))
    a, b = d_default.modules[m], d_16.modules[m]
    torch.testing.assert_close(2 * (a.P @ a.Q), b.P @ b.Q)
    assert any("lora_alpha" in n for n in d_default.notes) and not d_16.notes


def test_dtype_bf16_output(fixtures_dir, base_dir, tmp_path):
    rep = convert_adapter(fixtures_dir / "nlora", tmp_path / "o", dtype="bfloat16", verify=True,
                          progress=False)
    with safe_open(str(tmp_path / "o/adapter_model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    assert 1e-4 < rep.verify_error < 2e-2  # bf16 rounding, reported honestly


@pytest.mark.parametrize("name", list(FIXTURES))
def test_float32_compute_keeps_ranks(fixtures_dir, base_dir, converted, tmp_path, name):
    """The faster float32 fold never invents rank, and reports what it drops (components
    under 1.2e-4 of the largest: NLoRA's W0-slice factors have some) in its error column."""
    _, reports = converted
    rep = convert_adapter(fixtures_dir / FIXTURES[name][0], tmp_path / "o", base=base_dir,
                          verify=True, progress=False, compute_dtype=torch.float32)
    for (m, k, r, e), (m64, k64, r64, _) in zip(rep.rows, reports[name].rows):
        assert (m, k) == (m64, k64) and r <= r64
        assert (e > 0) == (r < r64)
        assert e < 1.2e-4 * math.sqrt(k)
    assert rep.verify_error < 2 * rep.max_rel_error + 1e-5  # random inputs estimate it
