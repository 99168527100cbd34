"""nora-train: every method trains on a tiny Llama on the CPU, keeps its frozen parts frozen,
trains the right number of parameters, and saves an adapter that reproduces its forward."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from nora_serve.converters.fingerprint import base_fingerprints, fingerprint_tensors, load_base_weights
from nora_serve.converters.native import method_scale, module_factors
from nora_serve.methods import dyrank_budget, get_method, nystrom_init, svd_outer
from nora_serve.train import DataError, TrainConfig, load_examples, train
from nora_serve.train.inject import LLAMA_TARGETS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import load_native, write_reverse_task  # noqa: E402

METHODS = ("lora", "nora", "slora", "nlora", "inttune", "dyrank")
# Per-method learning rates that move the loss visibly in a few full-batch steps: IntTune's
# and NoRA's trainable cores sit between small frozen factors, so they need larger ones.
LR = {"lora": 1e-2, "nora": 1e-1, "slora": 1e-2, "nlora": 1e-2, "inttune": 1.0, "dyrank": 1e-2}
RANK, INNER = 4, 2
STEPS = 10


def base_model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def apply_native_plainly(model, path):
    """``W <- W0 + P Q`` for every module of a saved native adapter (plain PyTorch)."""
    cfg, groups = load_native(path)
    scale = method_scale(cfg)
    with torch.no_grad():
        for m, t in groups.items():
            P, Q = module_factors(cfg["method"], scale, t)
            w = model.get_submodule(m).weight
            w += (P.double() @ Q.double()).to(w.dtype)
    return model


def sample_batch(examples, pad=0):
    from nora_serve.train.data import collate

    return collate(examples[:6], pad)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "a": write_reverse_task(d / "a.jsonl", 16, seed=0),
        "b": write_reverse_task(d / "b.jsonl", 16, seed=1),
    }


@pytest.fixture(scope="module")
def trained(base_dir, data, tmp_path_factory):
    """Each method trained once for STEPS full-batch steps; shared by the tests below."""
    out = tmp_path_factory.mktemp("adapters")
    res = {}
    for m in METHODS:
        cfg = TrainConfig(
            model=str(base_dir), data=str(data["a"]), method=m, out=str(out / m), rank=RANK,
            inner_rank=INNER if m == "nora" else None, alpha=8.0, lr=LR[m], max_steps=STEPS,
            batch_size=16, schedule="constant", seed=0, progress=False,
        )
        res[m] = train(cfg)
    return res


def expected_trainable(method, layers):
    n = 0
    for layer in layers.values():
        i, o = layer.in_features, layer.out_features
        n += {
            "lora": RANK * (i + o),
            "nora": 2 * RANK * INNER,
            "slora": RANK * (i + o) + RANK * RANK,
            "nlora": RANK * (i + o) + RANK * RANK,
            "inttune": RANK * RANK,
            "dyrank": math.ceil(1.5 * RANK) * (i + o + 1),
        }[method]
    return n


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls(trained, method):
    loss = trained[method].log["loss"]
    assert len(loss) == STEPS
    # Full batch: each entry is the loss of the same batch before that step's update.
    assert loss[-1] < loss[0] - 0.1, loss


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count(trained, method):
    r = trained[method]
    assert len(r.layers) == 14  # all seven projections in both layers
    assert r.log["trainable_params"] == expected_trainable(method, r.layers)
    params = [p for p in r.model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == expected_trainable(method, r.layers)
    if method == "inttune":
        assert all(p.shape == (RANK, RANK) for p in params)


@pytest.mark.parametrize("method", METHODS)
def test_frozen_parts_did_not_move(trained, base_dir, method):
    r = trained[method]
    W = load_base_weights(base_dir, list(r.layers))
    for n, layer in r.layers.items():
        assert torch.equal(layer.base.weight, W[n]), n  # the base weight itself
        t = layer.native_tensors()
        if method == "nora":
            A_o, B_o = svd_outer(W[n], RANK)
            assert torch.equal(t["outer_A"], A_o) and torch.equal(t["outer_B"], B_o), n
        if method == "inttune":
            A, _, B = nystrom_init(W[n], RANK)
            assert torch.equal(t["lora_A"], A) and torch.equal(t["lora_B"], B), n
            # ... while the core did train away from its init
            assert not torch.equal(t["lora_N"], W[n][:RANK, :RANK]), n


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reproduces_trainer_forward(trained, base_dir, method):
    r = trained[method]
    out = r.out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    ex = load_examples(r.log["config"]["data"], r.tokenizer, 64)
    b = sample_batch(ex)
    with torch.no_grad():
        want = r.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        plain = apply_native_plainly(base_model(base_dir), out)
        got = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        base_logits = base_model(base_dir)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (got - want).abs().max().item() <= 1e-4
    # The adapter does something (else the comparison above proves nothing).
    assert (want - base_logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_saved_config(trained, base_dir, method):
    r = trained[method]
    cfg, groups = load_native(r.out)
    assert cfg["format"] == "nora-serve" and cfg["method"] == method
    assert cfg["base_model_name_or_path"] == str(base_dir)
    mods = sorted(r.layers)
    assert cfg["target_modules"] == mods
    assert mods[0] == "model.layers.0.mlp.down_proj"  # full HF module names
    assert cfg["base_fingerprints"] == base_fingerprints(base_dir, mods)
    assert math.isclose(cfg["scaling"], method_scale(cfg))
    if get_method(method).shared_basis:
        sb = cfg["shared_basis"]
        assert sb["rule"] == {"nora": "svd", "inttune": "nystrom"}[method]
        assert sb["r"] == RANK and sb["calibration"] is None
        shared = {f"{m}.{t}": groups[m][t] for m in mods for t in get_method(method).shared}
        assert sb["fingerprint"] == fingerprint_tensors(shared)
    else:
        assert cfg["shared_basis"] is None
    log = json.loads((r.out / "train_log.json").read_text())
    assert log["loss"] == r.log["loss"] and len(log["step"]) == STEPS
    assert (r.out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nora_config(trained):
    cfg, _ = load_native(trained["nora"].out)
    assert cfg["inner_r"] == INNER and cfg["r"] == RANK
    assert cfg["scaling"] == 8.0 / INNER


@pytest.mark.parametrize("method", METHODS)
def test_init_delta(base_dir, data, method):
    """ΔW = 0 at the start except for NLoRA/IntTune, whose Nyström init is the delta itself."""
    from nora_serve.train import prepare

    cfg = TrainConfig(model=str(base_dir), data=str(data["a"]), method=method, rank=RANK,
                      inner_rank=INNER if method == "nora" else None)
    _, _, layers, _, _ = prepare(cfg)
    for n, layer in layers.items():
        delta = layer.factors().dense()
        if method in ("nlora", "inttune"):
            W0 = layer.base.weight
            want = layer.scale * W0[:, :RANK] @ W0[:RANK, :RANK] @ W0[:RANK, :]
            torch.testing.assert_close(delta, want)
            assert delta.abs().max() > 0
        else:
            assert delta.abs().max() == 0, n


def test_dyrank_pruned_to_target(trained):
    r = trained["dyrank"]
    cfg, groups = load_native(r.out)
    r0 = math.ceil(1.5 * RANK)
    assert cfg["r"] == r0 and cfg["scaling"] == 8.0 / r0
    pattern = cfg["rank_pattern"]
    assert set(pattern) == set(groups)
    for m, t in groups.items():
        assert t["lora_c"].shape == (r0,) and pattern[m] == int((t["lora_c"] != 0).sum())
    # The global budget: on average r_target components kept, spread unevenly over modules.
    assert sum(pattern.values()) == dyrank_budget(len(groups) * r0, r0, RANK, 1.0) == len(groups) * RANK
    assert len(set(pattern.values())) > 1
    hist = r.log["dyrank"]["prune_history"]
    kept = [k for _, k in hist]
    assert kept == sorted(kept, reverse=True) and kept[-1] == len(groups) * RANK


def test_dyrank_budget_is_cubic():
    total, r0, r = 120, 12, 8
    assert dyrank_budget(total, r0, r, 0.0) == total
    assert dyrank_budget(total, r0, r, 0.5) == total - int(total * (r0 - r) / r0 * 0.125)
    assert dyrank_budget(total, r0, r, 1.0) == total * r // r0


def test_nora_outer_shared_across_data(trained, base_dir, data, tmp_path):
    """Same base and outer settings, different data and seed: identical outer factors."""
    other = train(TrainConfig(
        model=str(base_dir), data=str(data["b"]), method="nora", out=str(tmp_path / "b"), rank=RANK,
        inner_rank=INNER, alpha=8.0, lr=LR["nora"], max_steps=3, batch_size=8, seed=1, progress=False,
    ))
    cfg_a, ga = load_native(trained["nora"].out)
    cfg_b, gb = load_native(other.out)
    assert cfg_a["shared_basis"] == cfg_b["shared_basis"]
    for m in ga:
        assert torch.equal(ga[m]["outer_A"], gb[m]["outer_A"]) and torch.equal(ga[m]["outer_B"], gb[m]["outer_B"])
        assert not torch.equal(ga[m]["inner_B"], gb[m]["inner_B"])


def test_nora_activation_aware_calibration(base_dir, data, tmp_path):
    def run(path, out, seed):
        return train(TrainConfig(
            model=str(base_dir), data=str(path), method="nora", out=str(tmp_path / out), rank=RANK,
            inner_rank=INNER, lr=1e-2, max_steps=1, batch_size=4, calibration=4, seed=seed, progress=False,
        ))

    a, a2, b = run(data["a"], "a", 0), run(data["a"], "a2", 5), run(data["b"], "b", 0)
    ca, _ = load_native(a.out)
    ca2, _ = load_native(a2.out)
    cb, _ = load_native(b.out)
    calib = ca["shared_basis"]["calibration"]
    assert calib["examples"] == 4 and calib["stat"] == "mean_abs"
    # Deterministic in the calibration batch; a different batch is a different basis.
    assert ca["shared_basis"] == ca2["shared_basis"]
    assert ca["shared_basis"]["fingerprint"] != cb["shared_basis"]["fingerprint"]
    plain = svd_outer(load_base_weights(base_dir, ["model.layers.0.self_attn.q_proj"])["model.layers.0.self_attn.q_proj"], RANK)[0]
    assert not torch.allclose(a.layers["model.layers.0.self_attn.q_proj"].outer_A, plain)


def test_prompt_tokens_carry_no_loss(base_dir, data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    ex = load_examples(data["a"], tok, 64)[0]
    rec = json.loads(data["a"].read_text().splitlines()[0])
    n_prompt = len(rec["prompt"].split())
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id and len(ex.input_ids) == n_prompt + 3 + 1


@pytest.mark.parametrize(
    "line, msg",
    [
        ('{"prompt": "a b"', "not valid JSON"),
        ('{"prompt": "a b"}', "no 'completion'"),
        ('{"input": "a"}', "needs a 'text' field"),
        ('{"text": 3}', "'text' must be a string"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_bad_data_names_file_and_line(tmp_path, base_dir, line, msg):
    from transformers import AutoTokenizer

    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "the cat"}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_examples(p, AutoTokenizer.from_pretrained(base_dir), 32)
    assert f"{p}:3:" in str(e.value) and msg in str(e.value)


def test_cli_trains_and_reports_errors(base_dir, data, tmp_path, capsys):
    """Exit status: 0 trained, 1 runtime error (one line on stderr), 2 usage error."""
    from nora_serve.cli.train import main

    out = tmp_path / "cli"
    args = ["--model", str(base_dir), "--data", str(data["a"]), "--out", str(out), "--rank", "4",
            "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    assert main(args + ["--method", "slora", "--targets", "q_proj,v_proj"]) == 0
    cfg, _ = load_native(out)
    assert cfg["target_modules"] == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    capsys.readouterr()

    def runtime_error(argv, msg):
        assert main(argv) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("nora-train: error: ") and msg in err[0], err

    # Existing output without --overwrite: refused before training.
    runtime_error(args + ["--method", "slora"], "already exists")
    runtime_error(args + ["--method", "lora", "--targets", "qproj", "--overwrite"],
                  "unknown target module(s) 'qproj'")
    runtime_error(args[:2] + ["--data", str(tmp_path / "none.jsonl")] + args[4:] + ["--method", "lora", "--overwrite"],
                  "no such data file")
    runtime_error(["--model", str(tmp_path / "nobase")] + args[2:] + ["--method", "lora", "--overwrite"],
                  "nobase")
    # Settings that contradict each other: a usage error, before anything loads.
    assert main(args + ["--method", "nora", "--inner-rank", "4", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nora-train") and "nora-train: error: " in err and "inner_rank < rank" in err
    with pytest.raises(SystemExit) as e:  # argparse's own: exit 2
        main(args + ["--method", "lora", "--rank", "four"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--rank", "--inner-rank", "--alpha", "--targets", "--lr", "--max-steps", "--epochs",
                 "--batch-size", "--max-length", "--seed", "--dtype", "--device", "--calibration",
                 "--base", "--model", "--lora-alpha", "--quiet", "--no-progress", "--version"):
        assert flag in helptext
    assert all(t in helptext for t in LLAMA_TARGETS)


def test_cli_flags_are_the_config_fields():
    """Every TrainConfig field is a flag (its dest the field name) with the field's default;
    the old spellings still work."""
    import dataclasses

    from nora_serve.cli.train import build_parser

    p = build_parser()
    dests = {a.dest for a in p._actions}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(fields) <= dests
    req = ["--base", "B", "--data", "D", "--method", "lora", "--out", "O"]
    got = vars(p.parse_args(req))
    want = TrainConfig(model="B", data="D", method="lora", out="O")
    for name in fields:
        assert got[name] == getattr(want, name), name
    old = vars(p.parse_args(["--model", "B", "--data", "D", "--method", "nora", "--out", "O",
                             "--alpha", "4", "--no-progress", "--rslora", "--inner-rank", "2",
                             "--targets", "q_proj, v_proj", "--max-steps", "3", "--dtype", "bfloat16",
                             "--dyrank-interval", "5"]))
    new = vars(p.parse_args(["--base", "B", "--data", "D", "--method", "nora", "--out", "O",
                             "--lora-alpha", "4", "--quiet", "--use-rslora", "--inner-rank", "2",
                             "--targets", "q_proj,v_proj", "--max-steps", "3", "--dtype", "bfloat16",
                             "--dyrank-interval", "5"]))
    assert old == new
    assert new["model"] == "B" and new["alpha"] == 4.0 and new["progress"] is False
    assert new["use_rslora"] is True and new["targets"] == ("q_proj", "v_proj")
    assert new["inner_rank"] == 2 and new["max_steps"] == 3 and new["dyrank_interval"] == 5
    TrainConfig(**{k: new[k] for k in fields}).validate()


def test_cli_without_matplotlib_warns_and_keeps_the_adapter(base_dir, data, tmp_path, capsys, monkeypatch):
    """No matplotlib: a one-line warning on stderr before training naming the extra, then the
    adapter and log are saved (no loss.png) and the exit status is 0. The progress bar, not
    asked off, writes nothing when stderr is not a terminal."""
    from nora_serve.cli.train import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    out = tmp_path / "noplot"
    assert main(["--base", str(base_dir), "--data", str(data["a"]), "--out", str(out), "--method", "lora",
                 "--rank", "2", "--max-steps", "2", "--batch-size", "4"]) == 0
    cap = capsys.readouterr()
    warn = [l for l in cap.err.splitlines() if l.startswith("nora-train: warning:")]
    assert len(warn) == 1 and "matplotlib" in warn[0] and "pip install 'nora-serve[train]'" in warn[0]
    assert "\r" not in cap.err and "warning" not in cap.out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "train_log.json"]
    assert cap.out.startswith(f"saved lora adapter to {out}")


@pytest.mark.parametrize("method", ["nora", "dyrank", "inttune"])
def test_converted_adapter_matches_through_stock_peft(trained, base_dir, tmp_path, method):
    """The trained adapter, converted to PEFT LoRA, gives the trainer's logits via PeftModel."""
    from nora_serve import converters
    from peft import PeftModel

    r = trained[method]
    out = tmp_path / "peft"
    converters.convert_adapter(r.out, out, base=base_dir, progress=False)
    ex = load_examples(r.log["config"]["data"], r.tokenizer, 64)
    b = sample_batch(ex)
    peft_model = PeftModel.from_pretrained(base_model(base_dir), str(out)).eval()
    with torch.no_grad():
        want = r.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_bf16_base_keeps_float32_adapter(base_dir, data):
    """A low-precision base trains with float32 adapter weights (and the base stays frozen)."""
    r = train(TrainConfig(
        model=str(base_dir), data=str(data["a"]), method="nora", rank=RANK, inner_rank=INNER,
        lr=1e-1, max_steps=2, batch_size=8, dtype="bfloat16", progress=False,
    ))
    layer = r.layers["model.layers.0.self_attn.q_proj"]
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.inner_B.dtype == layer.outer_A.dtype == torch.float32
    assert r.log["dtype"] == "bfloat16" and all(math.isfinite(x) for x in r.log["loss"])
    # The outer pair comes from the weights as stored (float32 here), not the bf16 copy.
    W = load_base_weights(base_dir, ["model.layers.0.self_attn.q_proj"])["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layer.outer_A, svd_outer(W, RANK)[0])


def test_epochs_set_the_step_count(base_dir, data):
    r = train(TrainConfig(model=str(base_dir), data=str(data["a"]), method="lora", rank=2, epochs=2,
                          batch_size=6, lr=1e-3, progress=False))
    assert r.log["total_steps"] == len(r.log["loss"]) == 2 * math.ceil(16 / 6)
    assert r.out is None
