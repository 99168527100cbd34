"""LoRA-XS, added as one method module (``nora_serve/methods/loraxs.py``): it trains with only
its ``r x r`` cores moving, its frozen factors are the truncated SVD of the base weight, two
adapters of one base share them bit for bit, it converts exactly into stock PEFT LoRA, and vLLM
serves it from one shared basis plus each adapter's cores.

References are independent of ``nora_serve.methods``: the SVD here is plain ``torch.linalg.svd``
and the deltas are merged in plain torch (``ΔW = s · U_r R Σ_r V_rᵀ``, ``s = alpha / r``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference as ref  # noqa: E402
from offline_llm import run_offline  # noqa: E402
from adapters import write_task  # noqa: E402
from reference import Reference  # noqa: E402
from adapters import load_native  # noqa: E402

RANK, ALPHA, LR, STEPS = 4, 8.0, 1.0, 8
# ``method == "x"`` / ``method in ("x", ...`` / ``method != "x"``: the literal is checked against
# the registered names (``fold(method="qr")`` names an algorithm, not an adapter method).
METHOD_NAME_COMPARE = re.compile(r"""method\s*(?:==|!=|(?:not\s+)?in\s*[(\[{])\s*["']([\w-]+)["']""")


def _train(base_dir, out: Path, task: str, data_seed: int, seed: int, out_dir: Path | None = None):
    from nora_serve.train import TrainConfig, train

    data = write_task(out.parent / f"{out.name}.jsonl", task, data_seed)
    return train(TrainConfig(model=str(base_dir), data=str(data), method="loraxs", out=str(out), rank=RANK,
                             alpha=ALPHA, lr=LR, max_steps=STEPS, batch_size=16, schedule="constant",
                             seed=seed, progress=False))


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loraxs")
    return {"a": _train(base_dir, root / "xs_a", "reverse", 0, 0), "b": _train(base_dir, root / "xs_b", "copy", 1, 1)}


def independent_deltas(path: Path) -> dict[str, torch.Tensor]:
    """``ΔW = (alpha / r) · outer_B @ lora_R @ outer_A`` per module, float64, plain torch."""
    cfg, groups = load_native(path)
    s = cfg["lora_alpha"] / cfg["r"]
    return {m: s * g["outer_B"].double() @ g["lora_R"].double() @ g["outer_A"].double() for m, g in groups.items()}


def test_registered_with_its_definition():
    from nora_serve.methods import get_method, method_names

    m = get_method("loraxs")
    assert m.tensors == ("outer_A", "outer_B", "lora_R") and m.trainable == ("lora_R",)
    assert m.shared == ("outer_A", "outer_B") and m.needs_w0
    assert "loraxs" in method_names(shared_basis=True) and "loraxs" in method_names(trainable=True)
    assert m.scale({"r": 4, "lora_alpha": 8}) == 2.0 and m.scale({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0


def test_trains_only_the_cores(trained, base_dir):
    from nora_serve.converters.fingerprint import load_base_weights

    r = trained["a"]
    loss = r.log["loss"]
    assert loss[-1] < loss[0] - 0.1, loss
    assert len(r.layers) == 14 and r.log["trainable_params"] == 14 * RANK * RANK
    assert all(p.shape == (RANK, RANK) for p in r.model.parameters() if p.requires_grad)
    W = load_base_weights(base_dir, list(r.layers))
    for n, layer in r.layers.items():
        t = layer.native_tensors()
        # The frozen factors are U_r and Σ_r V_rᵀ of W0 (up to each singular pair's sign).
        U, S, Vh = torch.linalg.svd(W[n].double(), full_matrices=False)
        sign = torch.sign((t["outer_B"].double() * U[:, :RANK]).sum(0))
        assert torch.allclose(t["outer_B"].double(), U[:, :RANK] * sign, atol=1e-5), n
        assert torch.allclose(t["outer_A"].double(), sign[:, None] * S[:RANK, None] * Vh[:RANK], atol=1e-5), n
        assert not torch.equal(t["lora_R"], torch.zeros_like(t["lora_R"]))


def test_saved_config_and_shared_basis(trained):
    from nora_serve.converters.fingerprint import fingerprint_tensors

    (ca, ga), (cb, gb) = load_native(trained["a"].out), load_native(trained["b"].out)
    for cfg, groups in ((ca, ga), (cb, gb)):
        assert cfg["format"] == "nora-serve" and cfg["method"] == "loraxs" and cfg["r"] == RANK
        assert cfg["scaling"] == ALPHA / RANK
        sb = cfg["shared_basis"]
        assert sb["rule"] == "svd_xs" and sb["r"] == RANK
        shared = {f"{m}.{t}": groups[m][t] for m in sorted(groups) for t in ("outer_A", "outer_B")}
        assert sb["fingerprint"] == fingerprint_tensors(shared)
    # Other data and seed, same base and rank: the same basis bit for bit, other cores.
    assert ca["shared_basis"] == cb["shared_basis"]
    for m in ga:
        assert torch.equal(ga[m]["outer_A"], gb[m]["outer_A"]) and torch.equal(ga[m]["outer_B"], gb[m]["outer_B"])
        assert not torch.equal(ga[m]["lora_R"], gb[m]["lora_R"])


def test_saved_adapter_reproduces_trainer_forward(trained, base_dir):
    r = trained["a"]
    ids = torch.tensor([[1, 40, 41, 42, 13, 9, 5, 7]])
    with torch.no_grad():
        want = r.model(input_ids=ids).logits[0]
    got = Reference(base_dir, independent_deltas(r.out)).logits(ids[0].tolist())
    base = Reference(base_dir).logits(ids[0].tolist())
    assert (got - want).abs().max() <= 1e-4
    assert (want - base).abs().max() > 1e-2  # the adapter does something


def test_converts_exactly_to_stock_peft(trained, base_dir, tmp_path):
    """``nora-convert`` folds it at rank r; stock PEFT's forward of the result equals the method's
    own forward (the trainer's model), and ``--verify`` recomputes that forward."""
    from nora_serve.converters import convert_adapter, read_adapter

    r = trained["a"]
    d = read_adapter(r.out, base=base_dir)
    assert (d.format, d.method) == ("native", "loraxs")
    for m, dw in independent_deltas(r.out).items():
        assert torch.allclose(d.modules[m].dense(), dw, atol=1e-6), m
    rep = convert_adapter(r.out, tmp_path / "peft", base=base_dir, verify=True, progress=False)
    assert rep.method == "loraxs" and rep.max_rank <= RANK and rep.verify_error < 1e-6
    assert rep.max_rel_error == 0.0
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        want = r.model(input_ids=ids).logits
    got = ref.logits(ref.peft_model(base_dir, tmp_path / "peft"), ids)
    assert ref.max_abs_diff(got, want) <= 1e-4


def test_split_into_basis_and_cores(trained):
    from nora_serve.converters.shared_basis import shared_basis_method, split_shared_basis

    a, b = (split_shared_basis(trained[k].out) for k in ("a", "b"))
    assert shared_basis_method(trained["a"].out) == "loraxs"
    assert a.method == "loraxs" and a.rank == RANK and a.key == b.key
    for m, dw in independent_deltas(trained["a"].out).items():
        got = a.basis[f"{m}.B"].double() @ a.cores[m].double() @ a.basis[f"{m}.A"].double()
        assert torch.allclose(got, dw, atol=1e-6), m


def test_method_names_compared_only_in_the_registry():
    """Outside ``nora_serve/methods/`` no code compares a method name (formats may)."""
    from nora_serve.methods import is_method

    root = Path(__file__).resolve().parents[1]
    hits = []
    for d in ("nora_serve", "converters", "kernels"):
        for f in (root / d).rglob("*.py"):
            if "methods" in f.relative_to(root).parts:
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                found = METHOD_NAME_COMPARE.search(line)
                if found and is_method(found.group(1)):
                    hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, hits


@pytest.mark.server
def test_served_from_shared_cores(trained, base_dir, tmp_path):
    """Two LoRA-XS adapters and the base in one batch through offline ``vllm.LLM`` with the
    plugin: each answer (tokens, logprobs, prompt logprobs) matches the merged reference within
    1e-3, and both adapters were loaded as cores on one shared basis."""
    prompt = [1, 40, 41, 42, 13, 9, 5]
    adapters = [("base", None), ("xs_a", str(trained["a"].out)), ("xs_b", str(trained["b"].out))]
    got, log = run_offline(base_dir, tmp_path, adapters, prompt,
                           {"max_loras": 4, "max_lora_rank": 16, "prompt_logprobs": True})
    wants = []
    for (name, path), g in zip(adapters, got):
        want = Reference(base_dir, independent_deltas(Path(path)) if path else None).run(prompt, 6)
        wants.append(want)
        assert g["tokens"] == want["tokens"], name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["logprobs"], want["logprobs"])), name
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g["prompt_logprobs"][1:], want["prompt_logprobs"][1:])), name
    # The two adapters answer differently, so a server that mixed them up would fail above.
    assert wants[1]["prompt_logprobs"] != wants[2]["prompt_logprobs"]
    keys = dict(re.findall(r"nora: adapter (\S+): loraxs with shared basis (\w+), cores only", log))
    assert set(keys) == {"xs_a", "xs_b"} and keys["xs_a"] == keys["xs_b"], log[-3000:]
    assert len(list((tmp_path / "cache" / "bases").iterdir())) == 1
