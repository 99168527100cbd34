"""Bad input: one clear line naming file, module and tensor; non-zero exit; no output at all."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nora_serve.cli.convert import main
from nora_serve.converters import AdapterError, convert_adapter, read_adapter

Q0 = "model.layers.0.self_attn.q_proj"
PQ0 = f"base_model.model.{Q0}"


def copy(fixtures_dir: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name.replace("/", "_")
    shutil.copytree(fixtures_dir / name, dst)
    return dst


def edit_tensors(path: Path, fn) -> None:
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def edit_config(src: Path, fn) -> None:
    """Apply ``fn`` to the parsed ``adapter_config.json`` of ``src`` and write it back."""
    path = src / "adapter_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("nora-convert: error:")]
    return code, lines


def assert_fails(capsys, tmp_path, src, *extra, contains=()) -> str:
    out = tmp_path / "OUT"
    code, lines = run_cli(capsys, src, out, "--quiet", *extra)
    assert code != 0
    assert len(lines) == 1, lines
    for c in contains:
        assert c in lines[0], lines[0]
    assert not out.exists()
    # No temporary leftovers beside OUT either.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".OUT")]
    return lines[0]


def test_missing_config(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "slora", tmp_path)
    (src / "adapter_config.json").unlink()
    assert_fails(capsys, tmp_path, src, contains=[str(src), "unknown adapter format"])


def test_malformed_config(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "slora", tmp_path)
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    assert_fails(capsys, tmp_path, src, contains=["adapter_config.json", "malformed JSON"])


def test_config_missing_r(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_lora_rank_pattern", tmp_path)
    edit_config(src, lambda cfg: cfg.pop("r"))
    assert_fails(capsys, tmp_path, src, contains=["adapter_config.json", "'r'"])


def test_unknown_peft_type(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "slora", tmp_path)
    edit_config(src, lambda cfg: cfg.update({"peft_type": "IA3"}))
    assert_fails(capsys, tmp_path, src, contains=["adapter_config.json", "IA3"])


def test_not_a_directory(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert_fails(capsys, tmp_path, f, contains=[str(f), "not a directory"])


def test_missing_tensor(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "nlora", tmp_path)
    edit_tensors(src / "adapter_model.safetensors", lambda t: t.pop(f"{PQ0}.lora_N.weight"))
    assert_fails(capsys, tmp_path, src, contains=["adapter_model.safetensors", f"module {Q0}",
                                                   f"{PQ0}.lora_N.weight", "missing"])


def test_extra_tensor_lm_head(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_lora_rank_pattern", tmp_path)
    edit_tensors(src / "adapter_model.safetensors",
                 lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(128, 64)))
    assert_fails(capsys, tmp_path, src, contains=["base_model.model.lm_head.weight",
                                                   "a LoRA cannot carry"])


def test_unknown_tensor_name(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_pissa", tmp_path)
    edit_tensors(src / "adapter_model.safetensors",
                 lambda t: t.__setitem__(f"{PQ0}.lora_magnitude_vector", torch.ones(64)))
    assert_fails(capsys, tmp_path, src, contains=[f"{PQ0}.lora_magnitude_vector", "DoRA"])


def test_inner_shape_mismatch(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "slora", tmp_path)
    edit_tensors(src / "adapter_model.safetensors",
                 lambda t: t.__setitem__(f"{PQ0}.lora_N.weight", torch.zeros(8, 7)))
    assert_fails(capsys, tmp_path, src, contains=[f"module {Q0}", f"{PQ0}.lora_N.weight", "shape"])


def test_shape_mismatch_with_base(fixtures_dir, base_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_pissa", tmp_path)

    def widen(t):
        t[f"{PQ0}.lora_A.weight"] = torch.randn(16, 32)  # base q_proj has d_in 64

    edit_tensors(src / "adapter_model.safetensors", widen)
    assert_fails(capsys, tmp_path, src, "--base", base_dir,
                 contains=[f"module {Q0}", "shape mismatch with the base model", "[64, 32]"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf(fixtures_dir, tmp_path, capsys, bad):
    src = copy(fixtures_dir, "nlora", tmp_path)

    def poison(t):
        t[f"{PQ0}.lora_B.weight"][3, 2] = bad

    edit_tensors(src / "adapter_model.safetensors", poison)
    word = "NaN" if bad != bad else "Inf"
    assert_fails(capsys, tmp_path, src, contains=[f"{PQ0}.lora_B.weight", word, f"module {Q0}"])


def test_rank_over_max_rank(fixtures_dir, tmp_path, capsys):
    src = fixtures_dir / "slora"
    line = assert_fails(capsys, tmp_path, src, "--max-rank", "4",
                        contains=["exceeds --max-rank 4", "module model.layers."])
    assert str(src) in line


def test_tolerance_not_enough_for_max_rank(fixtures_dir, tmp_path, capsys):
    assert_fails(capsys, tmp_path, fixtures_dir / "slora", "--max-rank", "2", "--tolerance", "1e-6",
                 contains=["exceeds --max-rank 2", "tolerance"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_code_pickle_adapter_bin(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_pissa", tmp_path)
    (src / "adapter_model.safetensors").unlink()
    with open(src / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    assert_fails(capsys, tmp_path, src, contains=["adapter_model.bin", "refusing to load"])


def test_accepts_weights_only_adapter_bin(fixtures_dir, base_dir, tmp_path):
    """A plain tensor pickle loads through weights_only and converts like the safetensors."""
    src = copy(fixtures_dir, "peft_pissa", tmp_path)
    t = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(t, src / "adapter_model.bin")
    rep = convert_adapter(src, tmp_path / "o", base=base_dir, verify=True, progress=False)
    assert rep.verify_error < 1e-6


def test_refuses_code_pickle_dora_metadata(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "dora_dyrank/checkpoint", tmp_path)
    with open(src / "prune_state_dict.pt", "wb") as f:
        pickle.dump(Evil(), f, protocol=2)
    assert_fails(capsys, tmp_path, src, "--base", fixtures_dir / "base", contains=["prune_state_dict.pt", "refusing to load"])


def test_dora_changed_lm_head(fixtures_dir, base_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "dora_dyrank/checkpoint", tmp_path)
    edit_tensors(src / "model.safetensors", lambda t: t["model.lm_head.weight"].add_(0.01))
    assert_fails(capsys, tmp_path, src, "--base", base_dir,
                 contains=["model.safetensors", "model.lm_head.weight", "cannot carry"])


def test_dora_changed_linear_weight(fixtures_dir, base_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "dora_dyrank/checkpoint", tmp_path)
    key = f"model.{Q0}.linear.weight"
    edit_tensors(src / "model.safetensors", lambda t: t[key].mul_(1.001))
    assert_fails(capsys, tmp_path, src, "--base", base_dir,
                 contains=[f"module {Q0}", key, "differs from the base"])


def test_fingerprint_mismatch(fixtures_dir, base_dir, tmp_path, capsys):
    """A native adapter records its base's fingerprints; another base is refused."""
    from nora_serve.converters.fingerprint import base_fingerprints
    from nora_serve.converters.native import NativeAdapter

    g = torch.Generator().manual_seed(0)
    tensors = {Q0: {"lora_A": torch.randn(4, 64, generator=g), "lora_B": torch.randn(64, 4, generator=g)}}
    cfg = {"method": "lora", "r": 4, "lora_alpha": 8, "base_fingerprints": base_fingerprints(base_dir, [Q0])}
    src = NativeAdapter(cfg, tensors).save(tmp_path / "native")
    other = tmp_path / "other_base"
    shutil.copytree(base_dir, other)
    edit_tensors(other / "model.safetensors", lambda t: t[f"{Q0}.weight"].add_(1e-3))
    # The matching base passes...
    convert_adapter(src, tmp_path / "ok", base=base_dir, progress=False)
    # ...a different one is refused, naming module and tensor.
    assert_fails(capsys, tmp_path, src, "--base", other,
                 contains=["fingerprint mismatch", f"module {Q0}", f"{Q0}.weight"])


def test_a_passed_base_check_is_never_reused_for_another_base_or_adapter(base_dir, tmp_path):
    """The check against a base is remembered once passed (a store checks thousands of adapters
    of one base): a base changed on disk since, or an adapter recording another base's
    fingerprints, is still refused."""
    from nora_serve.converters.fingerprint import base_fingerprints
    from nora_serve.converters.native import NativeAdapter

    g = torch.Generator().manual_seed(0)
    tensors = {Q0: {"lora_A": torch.randn(4, 64, generator=g), "lora_B": torch.randn(64, 4, generator=g)}}
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    mine = NativeAdapter({"method": "lora", "r": 4, "lora_alpha": 8,
                          "base_fingerprints": base_fingerprints(base, [Q0])}, tensors).save(tmp_path / "mine")
    read_adapter(mine, base=base)
    read_adapter(mine, base=base)  # remembered
    other = tmp_path / "other_base"
    shutil.copytree(base_dir, other)
    edit_tensors(other / "model.safetensors", lambda t: t[f"{Q0}.weight"].add_(1e-3))
    theirs = NativeAdapter({"method": "lora", "r": 4, "lora_alpha": 8,
                            "base_fingerprints": base_fingerprints(other, [Q0])}, tensors).save(tmp_path / "theirs")
    with pytest.raises(AdapterError, match="fingerprint mismatch"):
        read_adapter(theirs, base=base)
    # The base itself changes on disk: what passed against it before is checked again.
    edit_tensors(base / "model.safetensors", lambda t: t[f"{Q0}.weight"].add_(1e-3))
    with pytest.raises(AdapterError, match="fingerprint mismatch"):
        read_adapter(mine, base=base)
    read_adapter(theirs, base=base)


def test_use_dora_refused(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_lora_rank_pattern", tmp_path)
    edit_config(src, lambda cfg: cfg.update({"use_dora": True}))
    assert_fails(capsys, tmp_path, src, contains=["adapter_config.json", "use_dora"])


def test_unconverted_pissa_refused(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_pissa", tmp_path)
    edit_config(src, lambda cfg: cfg.update({"init_lora_weights": "pissa_niter_4"}))
    assert_fails(capsys, tmp_path, src, contains=["residualised base"])


def test_vera_needs_base(fixtures_dir, tmp_path, capsys):
    assert_fails(capsys, tmp_path, fixtures_dir / "peft_vera", contains=["need --base"])


def test_rank_pattern_disagrees_with_tensors(fixtures_dir, tmp_path, capsys):
    src = copy(fixtures_dir, "peft_lora_rank_pattern", tmp_path)
    edit_config(src, lambda cfg: cfg.update({"rank_pattern": {}}))
    assert_fails(capsys, tmp_path, src, contains=["rank 4 on disk", "r=8", "mlp.down_proj"])


def test_unknown_forced_format(fixtures_dir):
    with pytest.raises(AdapterError, match="unknown format"):
        read_adapter(fixtures_dir / "slora", fmt="lokr")


def test_forced_wrong_format_is_clear(fixtures_dir, tmp_path, capsys):
    assert_fails(capsys, tmp_path, fixtures_dir / "slora", "--format", "peft_lora",
                 contains=["lora_N.weight", "unexpected tensor"])


def test_existing_output_untouched(fixtures_dir, tmp_path, capsys):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, lines = run_cli(capsys, fixtures_dir / "slora", out, "--quiet")
    assert code != 0 and len(lines) == 1 and "already exists" in lines[0]
    assert (out / "keep.txt").read_text() == "mine"
    assert main([str(fixtures_dir / "slora"), str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_interrupted_write_leaves_nothing(fixtures_dir, tmp_path, monkeypatch):
    import nora_serve.converters.convert as conv

    def boom(tmp, *a, **k):
        (tmp / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "write_peft_lora", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_adapter(fixtures_dir / "slora", tmp_path / "OUT", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_subprocess_no_traceback(fixtures_dir, tmp_path):
    """The installed entry point: one line on stderr, exit code 1, no traceback."""
    src = copy(fixtures_dir, "nlora", tmp_path)
    edit_tensors(src / "adapter_model.safetensors",
                 lambda t: t.__setitem__(f"{PQ0}.lora_A.weight", torch.full((8, 64), float("nan"))))
    r = subprocess.run([sys.executable, "-m", "nora_serve.cli.convert", str(src), str(tmp_path / "o"),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "NaN" in err[0] and f"{PQ0}.lora_A.weight" in err[0]
    assert not (tmp_path / "o").exists()


def test_multi_source_partial_failure(fixtures_dir, tmp_path, capsys):
    """Several sources: each one complete or absent; the failing one is named; exit non-zero."""
    bad = copy(fixtures_dir, "slora", tmp_path)
    (bad / "adapter_config.json").write_text("nope")
    out = tmp_path / "ALL"
    code, lines = run_cli(capsys, fixtures_dir / "nlora", bad, fixtures_dir / "dora_dyrank/checkpoint", out, "--quiet",
                          "--base", fixtures_dir / "base")
    assert code == 1 and len(lines) == 1 and "malformed JSON" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["dora_dyrank", "nlora"]


def test_multi_source_duplicate_names(fixtures_dir, tmp_path, capsys):
    code, lines = run_cli(capsys, fixtures_dir / "nlora", fixtures_dir / "nlora", tmp_path / "ALL")
    assert code == 2 and "several sources" in lines[0]
