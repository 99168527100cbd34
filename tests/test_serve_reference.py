"""Checks of the reference the serving tests compare against (``reference.py``; no server here).

Reference = transformers ``LlamaForCausalLM`` on the base with every module's delta merged,
``W0 + ΔW``, where ``ΔW`` is computed in plain torch straight from each adapter's own tensors.
These checks pin it to the fixtures' ``reference_logits`` (computed by each adapter's own code),
so a serving test that matches it matches the outside world.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import SHARED_BASIS_PAIRS, SHARED_RANK, make_native_adapters, train_shared_basis_adapters  # noqa: E402
from reference import FIXTURE_ADAPTERS, Reference, base_modules, native_tensors, reference_deltas  # noqa: E402


# -- checks of the reference itself ---------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURE_ADAPTERS)
def test_reference_matches_fixture_logits(fixtures_dir, base_dir, name):
    from safetensors.torch import load_file

    ref = load_file(str(fixtures_dir / name / "reference_logits.safetensors"))
    model = Reference(base_dir, reference_deltas(fixtures_dir / name, base_dir))
    for ids, want in zip(ref["input_ids"].tolist(), ref["logits"]):
        got = model.logits(ids)
        assert torch.allclose(got, want.float(), atol=1e-4, rtol=0), (name, (got - want).abs().max())


def test_reference_base_matches_probe(fixtures_dir, base_dir):
    from safetensors.torch import load_file

    probe = load_file(str(fixtures_dir / "probe.safetensors"))
    model = Reference(base_dir)
    for ids, want in zip(probe["input_ids"].tolist(), probe["base_logits"]):
        assert torch.allclose(model.logits(ids), want.float(), atol=1e-4, rtol=0)


def test_native_adapters_change_outputs(base_dir, tmp_path):
    """Each native test adapter moves the logits well beyond the comparison tolerance."""
    paths = make_native_adapters(base_dir, tmp_path)
    ids = [1, 5, 9, 13, 40, 41, 42]
    base = Reference(base_dir).logits(ids)
    for method, p in paths.items():
        got = Reference(base_dir, reference_deltas(p, base_dir)).logits(ids)
        assert (got - base).abs().max() > 0.05, method


def test_shared_basis_adapters_share_only_the_basis(base_dir, fixtures_dir, tmp_path_factory):
    """The trained pairs have one basis (same fingerprint, bit-identical shared tensors) and
    their own inner parts; each moves the output, and the two of a pair differently."""
    from safetensors.torch import load_file

    paths = train_shared_basis_adapters(base_dir, tmp_path_factory)
    for method, ((a, b), shared, own) in SHARED_BASIS_PAIRS.items():
        ca, cb = (json.loads((paths[n] / "adapter_config.json").read_text()) for n in (a, b))
        ta, tb = (native_tensors(paths[n]) for n in (a, b))
        assert ca["method"] == cb["method"] == method
        # One basis file for both (format_version 2 stores it once, named by its digest).
        assert ca["shared_basis"].get("digest") == cb["shared_basis"].get("digest"), method
        assert ca["r"] == cb["r"] == SHARED_RANK and ca.get("inner_r") == cb.get("inner_r")
        assert ca["shared_basis"]["fingerprint"] == cb["shared_basis"]["fingerprint"], method
        assert set(ta) == set(tb)
        modules = sorted({k.rpartition(".")[0] for k in ta})
        assert modules == base_modules(base_dir)  # all seven projections in every layer
        for m in modules:
            for t in shared:
                assert torch.equal(ta[f"{m}.{t}"], tb[f"{m}.{t}"]), (method, m, t)
            for t in own:
                assert not torch.equal(ta[f"{m}.{t}"], tb[f"{m}.{t}"]), (method, m, t)
    fps = {n: json.loads((p / "adapter_config.json").read_text())["shared_basis"]["fingerprint"]
           for n, p in paths.items()}
    assert fps["nora_a"] != fps["inttune_a"]

    probe = load_file(str(fixtures_dir / "probe.safetensors"))["input_ids"].tolist()
    base = torch.cat([Reference(base_dir).logits(ids) for ids in probe])
    got = {n: torch.cat([m.logits(ids) for ids in probe])
           for n, m in ((n, Reference(base_dir, reference_deltas(p, base_dir))) for n, p in paths.items())}
    for n, logits in got.items():
        assert (logits - base).abs().max() > 0.05, n
    for (a, b), _, _ in SHARED_BASIS_PAIRS.values():
        assert (got[a] - got[b]).abs().max() > 0.05, (a, b)
