"""PEFT's weight-decomposed DoRA as a registered method ("dora"): ``nora-train --method dora``
trains it and saves PEFT's own format, which stock ``PeftModel.from_pretrained`` loads with the
trainer's forward; the method's forward and serving form equal PEFT's layer; the reader reads
PEFT-saved DoRA, and ``nora-convert`` refuses to fold it with one line saying how to serve it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference as ref  # noqa: E402
from dora_cases import make_peft_dora  # noqa: E402
from adapters import write_reverse_task  # noqa: E402

RANK, ALPHA = 4, 8.0
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    from nora_serve.train import TrainConfig, train

    d = tmp_path_factory.mktemp("dora")
    data = write_reverse_task(d / "a.jsonl", 16, seed=0)
    return train(TrainConfig(model=str(base_dir), data=str(data), method="dora", out=str(d / "dora"), rank=RANK,
                             alpha=ALPHA, lr=1e-2, max_steps=8, batch_size=16, schedule="constant", seed=0,
                             progress=False))


def peft_saved_dora(base_dir, out: Path, seed: int = 0, use_rslora: bool = False) -> Path:
    """A DoRA adapter saved by stock PEFT, with B and the magnitudes moved off their init."""
    return make_peft_dora(base_dir, out, seed, r=RANK, alpha=ALPHA, targets=["q_proj", "v_proj", "down_proj"],
                          use_rslora=use_rslora)


def test_trains_and_saves_peft_format(trained):
    r = trained
    assert r.log["loss"][-1] < r.log["loss"][0] - 0.1, r.log["loss"]
    cfg = json.loads((r.out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == RANK
    assert cfg["lora_alpha"] == ALPHA and cfg["target_modules"] == sorted(r.layers)
    t = load_file(str(r.out / "adapter_model.safetensors"))
    n = len(r.layers)
    assert len(t) == 3 * n
    for m, layer in r.layers.items():
        p = f"base_model.model.{m}"
        assert t[f"{p}.lora_A.weight"].shape == (RANK, layer.in_features)
        assert t[f"{p}.lora_B.weight"].shape == (layer.out_features, RANK)
        assert t[f"{p}.lora_magnitude_vector"].shape == (layer.out_features,)
    # Every DoRA tensor trains, the magnitude included (it started at ||W0|| per row).
    i, o = r.layers[Q0].in_features, r.layers[Q0].out_features
    assert r.log["trainable_params"] == sum(RANK * (l.in_features + l.out_features) + l.out_features
                                            for l in r.layers.values())
    W0 = r.layers[Q0].base.weight
    assert not torch.allclose(t[f"base_model.model.{Q0}.lora_magnitude_vector"], W0.norm(dim=1))
    assert (i, o) == (W0.shape[1], W0.shape[0])


def test_stock_peft_loads_it_with_the_trainers_forward(trained, base_dir):
    r = trained
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        want = r.model(input_ids=ids).logits
    with _no_warning():
        pm = ref.peft_model(base_dir, r.out)
    got = ref.logits(pm, ids)
    assert ref.max_abs_diff(got, want) <= 1e-5
    base = ref.logits(ref.load_base(base_dir), ids)
    assert ref.max_abs_diff(want, base) > 1e-2  # the adapter does something


class _no_warning:
    """PEFT warns about config keys it does not know: there must be none."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        bad = [str(w.message) for w in self.caught if "Unexpected keyword" in str(w.message)]
        assert not bad, bad


@pytest.mark.parametrize("use_rslora", [False, True])
def test_method_forward_and_serving_form_equal_peft_layer(base_dir, tmp_path, use_rslora):
    """On a stock-PEFT-saved DoRA: the method's forward (what it adds to the base layer) and its
    serving form ``v ⊙ (W x) + B' A x + bias`` equal PEFT's layer output, per module."""
    from nora_serve.converters import read_adapter
    from nora_serve.methods import dora_forward, dora_serving_form, get_method

    src = peft_saved_dora(base_dir, tmp_path / "dora", use_rslora=use_rslora)
    d = read_adapter(src, base=base_dir)
    assert (d.format, d.method) == ("peft_lora", "dora")
    pm = ref.peft_model(base_dir, src)
    named = dict(pm.base_model.model.named_modules())
    spec = get_method("dora")
    s = spec.scale({"r": RANK, "lora_alpha": ALPHA, "use_rslora": use_rslora})
    assert s == (ALPHA / RANK**0.5 if use_rslora else ALPHA / RANK)
    g = torch.Generator().manual_seed(0)
    for m, e in d.entries.items():
        layer = named[m]
        x = torch.randn(5, e.shape[1], generator=g)
        W, bias = layer.base_layer.weight, layer.base_layer.bias
        with torch.no_grad():
            want = layer(x)
            base_out = layer.base_layer(x)
        t = {"lora_A": e.raw["lora_A"], "lora_B": e.raw["lora_B"], "lora_magnitude": e.raw["lora_magnitude"]}
        assert torch.equal(t["lora_magnitude"], layer.lora_magnitude_vector["default"].weight.detach())
        torch.testing.assert_close(base_out + dora_forward(t, s, x, W), want, rtol=0, atol=1e-5)
        A, Bp, v = dora_serving_form(W, t["lora_A"], t["lora_B"], t["lora_magnitude"], s)
        served = v * (x @ W.T) + (x @ A.T) @ Bp.T + (bias if bias is not None else 0)
        torch.testing.assert_close(served, want, rtol=0, atol=1e-5)
        assert (v - 1).abs().max() > 1e-3  # the magnitudes were moved: v is not 1


def test_convert_refuses_to_fold_and_says_how_to_serve(base_dir, tmp_path, capsys):
    from nora_serve.cli.convert import main

    src = peft_saved_dora(base_dir, tmp_path / "dora")
    out = tmp_path / "OUT"
    assert main([str(src), str(out), "--quiet"]) == 1
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("nora-convert: error:")]
    assert len(err) == 1, err
    for part in ("adapter_config.json", "use_dora", "not a low-rank delta", "nora-serve MODEL --enable-nora"):
        assert part in err[0], err[0]
    assert not out.exists()


def test_registered_with_its_definition():
    from nora_serve.methods import get_method, method_names

    m = get_method("dora")
    assert m.tensors == ("lora_A", "lora_B", "lora_magnitude") and not m.foldable and not m.native
    assert m.export is not None and m.needs_weight and "dora" in method_names(trainable=True)
    with pytest.raises(ValueError, match="not low-rank"):
        m.factors({}, 1.0)


@pytest.mark.parametrize("method", ["dora", "loraxs"])
def test_cli_trains_the_new_methods(base_dir, tmp_path, capsys, method):
    """``nora-train --method dora|loraxs``: the choices and help come from the registry."""
    from nora_serve.cli.train import main

    data = write_reverse_task(tmp_path / "a.jsonl", 8, seed=0)
    out = tmp_path / method
    assert main(["--base", str(base_dir), "--data", str(data), "--out", str(out), "--method", method,
                 "--rank", "2", "--max-steps", "2", "--batch-size", "4", "--targets", "q_proj", "--quiet"]) == 0
    assert f"saved {method} adapter" in capsys.readouterr().out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg.get("use_dora", False) is (method == "dora") and cfg.get("method", "dora") == method
    with pytest.raises(SystemExit):
        main(["--help"])
    helptext = capsys.readouterr().out
    assert "  dora " in helptext and "  loraxs " in helptext
    # NoRA's inner rank is refused for methods that take none (usage error, exit 2).
    assert main(["--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "x"), "--method", method,
                 "--inner-rank", "1"]) == 2
