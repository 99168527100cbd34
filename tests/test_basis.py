"""The shared basis as one file (``converters/basis_file.py``) and format_version 2 adapters that
hold only what they trained: written by nora-train into a store (``<store>/bases/<digest>``),
found again by recipe, given with ``--basis``, refused when made from another base or changed;
read, converted and exported (self-contained, format_version 1) with the same fold; old (v1)
adapters still read, convert and verify."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import write_reverse_task  # noqa: E402

from nora_serve.cli.convert import main as convert_main  # noqa: E402
from nora_serve.cli.train import main as train_main  # noqa: E402
from nora_serve.converters import AdapterError, convert_adapter, read_adapter  # noqa: E402
from nora_serve.converters.basis_file import (basis_key, cache_dir, find_basis, read_basis,  # noqa: E402
                                              recipe_key, write_basis)
from nora_serve.converters.shared_basis import split_shared_basis  # noqa: E402

RANK = 4
TARGETS = "q_proj,v_proj,down_proj"
CORE = {"nora": ("inner_A", "inner_B"), "loraxs": ("lora_R",), "inttune": ("lora_N",)}
SHARED = {"nora": ("outer_A", "outer_B"), "loraxs": ("outer_A", "outer_B"), "inttune": ("lora_A", "lora_B")}


def _args(base, data, out, method, *extra):
    return ["--base", str(base), "--data", str(data), "--out", str(out), "--method", method,
            "--rank", str(RANK), "--targets", TARGETS, "--max-steps", "2", "--batch-size", "8",
            "--lr", "0.1", "--quiet", *extra]


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def _train(capsys, *argv) -> dict:
    assert train_main(list(argv)) == 0, capsys.readouterr().err
    capsys.readouterr()
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "train_log.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("basis-data")
    return {"a": write_reverse_task(d / "a.jsonl", 16, seed=0), "b": write_reverse_task(d / "b.jsonl", 16, seed=1)}


@pytest.fixture(scope="module")
def store(base_dir, data, tmp_path_factory):
    """One store, per method two adapters trained on other data and seeds: ``<method>_a`` computes
    the basis, ``<method>_b`` finds it by recipe."""
    from nora_serve.train import TrainConfig, train

    root = tmp_path_factory.mktemp("store")
    logs = {}
    for method in CORE:
        for name, seed in (("a", 0), ("b", 1)):
            r = train(TrainConfig(model=str(base_dir), data=str(data[name]), method=method,
                                  out=str(root / f"{method}_{name}"), rank=RANK, targets=tuple(TARGETS.split(",")),
                                  max_steps=2, batch_size=8, lr=0.1, seed=seed, progress=False))
            logs[f"{method}_{name}"] = r.log
    return root, logs


def _config(path: Path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _fold(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


# -- the file -----------------------------------------------------------------------------------

def test_basis_file_roundtrip_digest_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"m.q.A": torch.randn(4, 16, generator=g), "m.q.B": torch.randn(8, 4, generator=g)}
    meta = {"method": "nora", "rule": "svd", "r": 4, "calibration": None, "base_model_name_or_path": "b",
            "base_fingerprints": {"m.q": "sha256:x"}, "recipe": recipe_key("nora", "svd", 4, None, {"m.q": "sha256:x"})}
    p = write_basis(tmp_path / "bases", tensors, meta)
    digest = basis_key(tensors)
    assert len(digest) == 32 and p == tmp_path / "bases" / f"{digest}.safetensors"
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()
    assert [f.name for f in p.parent.iterdir()] == [p.name]  # no temporary left
    got, m = read_basis(p)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors) and set(got) == set(tensors)
    assert m["digest"] == digest and m["r"] == 4 and m["calibration"] is None
    assert m["base_fingerprints"] == {"m.q": "sha256:x"} and m["recipe"] == meta["recipe"]
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as fh:
        raw = fh.metadata()
    assert raw["format"] == "nora-serve-basis" and raw["format_version"] == "1"
    assert raw["calibration"] == "null" and json.loads(raw["base_fingerprints"]) == {"m.q": "sha256:x"}
    # Changed content under the same name: refused, one line naming the file and the digest.
    save_file({**tensors, "m.q.A": tensors["m.q.A"] + 1}, str(p), metadata=raw)
    with pytest.raises(AdapterError) as e:
        read_basis(p)
    assert str(p) in str(e.value) and digest in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AdapterError, match="expected 0+1"):
        read_basis(p, expect_digest="0" * 31 + "1")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_find_basis_search_order(tmp_path, monkeypatch):
    digest = "ab" * 16
    name = f"{digest}.safetensors"
    adapter = tmp_path / "store" / "ad"
    adapter.mkdir(parents=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NORA_BASIS_CACHE", str(cache))
    with pytest.raises(AdapterError) as e:
        find_basis(digest, adapter)
    msg = str(e.value)
    assert str(adapter) in msg and digest in msg and str(cache / name) in msg and "\n" not in msg
    for d in (cache, tmp_path / "store" / "bases", tmp_path / "explicit"):
        d.mkdir(exist_ok=True)
        (d / name).write_bytes(b"x")
    assert find_basis(digest, adapter, explicit=tmp_path / "explicit") == tmp_path / "explicit" / name
    assert find_basis(digest, adapter, explicit=tmp_path / "explicit" / name) == tmp_path / "explicit" / name
    assert find_basis(digest, adapter) == (tmp_path / "store" / "bases" / name).absolute()
    (tmp_path / "store" / "bases" / name).unlink()
    assert find_basis(digest, adapter) == cache / name


# -- nora-train: the layout, reuse by recipe, --basis -------------------------------------------

@pytest.mark.parametrize("method", CORE)
def test_trained_adapter_holds_only_its_own_tensors(store, method):
    root, logs = store
    path = root / f"{method}_a"
    cfg = _config(path)
    assert cfg["format_version"] == 2
    digest = cfg["shared_basis"]["digest"]
    own = load_file(str(path / "adapter_model.safetensors"))
    assert {k.rpartition(".")[2] for k in own} == set(CORE[method])
    basis_file = root / "bases" / f"{digest}.safetensors"
    tensors, meta = read_basis(basis_file)
    assert meta["method"] == method and meta["r"] == RANK and meta["digest"] == digest
    assert meta["base_fingerprints"] == cfg["base_fingerprints"]
    assert logs[f"{method}_a"]["basis"]["source"] == "computed"
    # The cache holds it too, with its recipe in the index.
    assert (cache_dir() / f"{digest}.safetensors").is_file()
    assert json.loads((cache_dir() / "recipes" / f"{meta['recipe']}.json").read_text())["digest"] == digest
    # What the adapter's layers trained against is exactly the file.
    d = read_adapter(path)
    a, b = SHARED[method]
    for m, e in d.entries.items():
        assert torch.equal(e.raw[a], tensors[f"{m}.A"]) and torch.equal(e.raw[b], tensors[f"{m}.B"])
    assert d.basis_path == basis_file.absolute()


@pytest.mark.parametrize("method", CORE)
def test_second_adapter_reuses_the_basis_by_recipe(store, method):
    root, logs = store
    a, b = _config(root / f"{method}_a"), _config(root / f"{method}_b")
    assert logs[f"{method}_b"]["basis"]["source"] == "recipe"
    assert a["shared_basis"] == b["shared_basis"]
    assert len(list((root / "bases").glob("*.safetensors"))) == len(CORE)  # one per method
    # Other data and seed: other cores.
    fa, fb = (load_file(str(root / f"{method}_{n}" / "adapter_model.safetensors")) for n in "ab")
    assert any(not torch.equal(fa[k], fb[k]) for k in fa)


def test_basis_flag_and_a_basis_from_another_base(store, base_dir, data, tmp_path, capsys):
    from nora_serve.tiny import make_tiny_llama

    root, _ = store
    digest = _config(root / "nora_a")["shared_basis"]["digest"]
    given = tmp_path / "given.safetensors"
    shutil.copy(root / "bases" / f"{digest}.safetensors", given)
    log = _train(capsys, *_args(base_dir, data["a"], tmp_path / "s" / "x", "nora", "--basis", str(given)))
    assert log["basis"]["source"] == "--basis" and log["basis"]["digest"] == digest
    # The adapter's store gets its own copy, so the adapter reads without --basis.
    assert (tmp_path / "s" / "bases" / f"{digest}.safetensors").is_file()
    read_adapter(tmp_path / "s" / "x")

    other = make_tiny_llama(tmp_path / "other_base", seed=7)
    capsys.readouterr()
    assert train_main(_args(other, data["a"], tmp_path / "s" / "y", "nora", "--basis", str(given))) == 1
    line = _one_error_line(capsys, "nora-train")
    assert str(given) in line and "another base" in line and "module model.layers.0." in line
    assert not (tmp_path / "s" / "y").exists()
    # A basis of another method, or another rank: refused too.
    assert train_main(_args(base_dir, data["a"], tmp_path / "s" / "z", "loraxs", "--basis", str(given))) == 1
    assert "rule 'svd'" in _one_error_line(capsys, "nora-train")
    # --basis on a method without a shared basis: a usage error.
    assert train_main(_args(base_dir, data["a"], tmp_path / "s" / "w", "lora", "--basis", str(given))) == 2
    capsys.readouterr()


def test_calibrated_basis_is_its_own_recipe(base_dir, data, tmp_path, capsys):
    """The activation-aware basis: recorded calibration, a recipe of its own, reused as such."""
    s = tmp_path / "s"
    la = _train(capsys, *_args(base_dir, data["a"], s / "c1", "nora", "--calibration", "4"))
    lb = _train(capsys, *_args(base_dir, data["a"], s / "c2", "nora", "--calibration", "4", "--seed", "3"))
    lp = _train(capsys, *_args(base_dir, data["a"], s / "p", "nora"))
    assert la["basis"]["source"] == "computed" and lb["basis"]["source"] == "recipe"
    assert la["basis"]["digest"] == lb["basis"]["digest"] != lp["basis"]["digest"]
    cfg = _config(s / "c1")
    assert cfg["shared_basis"]["calibration"]["examples"] == 4
    assert read_adapter(s / "c2").entries  # reads with the calibrated basis


# -- reading: moved, edited, missing or changed bases -------------------------------------------

def test_copied_renamed_and_edited_adapters_still_load(store, tmp_path):
    root, _ = store
    src = root / "nora_a"
    copy = root / "nora_copy"
    shutil.copytree(src, copy)
    renamed = root / "nora_renamed"
    shutil.copytree(src, tmp_path / "tmp")
    os.rename(tmp_path / "tmp", renamed)
    base = convert_adapter(src, tmp_path / "f_src", progress=False, verify=True)
    for p in (copy, renamed):
        convert_adapter(p, tmp_path / f"f_{p.name}", progress=False, verify=True)
        assert _fold(tmp_path / f"f_{p.name}").keys() == _fold(tmp_path / "f_src").keys()
        assert all(torch.equal(_fold(tmp_path / f"f_{p.name}")[k], v) for k, v in _fold(tmp_path / "f_src").items())
    # Its own tensor edited with safetensors: still valid (the digest binds only the basis), another fold.
    edited = root / "nora_edited"
    shutil.copytree(src, edited)
    w = load_file(str(edited / "adapter_model.safetensors"))
    key = next(k for k in w if k.endswith("inner_B"))
    w[key] = w[key] * 2 + 0.01
    save_file(w, str(edited / "adapter_model.safetensors"), metadata={"format": "pt"})
    rep = convert_adapter(edited, tmp_path / "f_edited", progress=False, verify=True)
    assert rep.verify_error < 1e-6 and base.verify_error < 1e-6
    fe, fs = _fold(tmp_path / "f_edited"), _fold(tmp_path / "f_src")
    assert any(not torch.equal(fe[k], fs[k]) for k in fs)
    for p in (copy, renamed, edited):
        shutil.rmtree(p)


def test_missing_or_changed_basis_is_refused(store, tmp_path, monkeypatch, capsys):
    root, _ = store
    digest = _config(root / "nora_a")["shared_basis"]["digest"]
    lonely = tmp_path / "elsewhere" / "nora_a"
    shutil.copytree(root / "nora_a", lonely)
    monkeypatch.setenv("NORA_BASIS_CACHE", str(tmp_path / "empty-cache"))
    # Missing: one line naming the adapter and the digest.
    assert convert_main([str(lonely), str(tmp_path / "out"), "--quiet"]) == 1
    line = _one_error_line(capsys, "nora-convert")
    assert str(lonely) in line and digest in line and "not found" in line
    with pytest.raises(AdapterError, match=digest):
        split_shared_basis(lonely)
    # Changed: the right name, other content.
    bases = tmp_path / "elsewhere" / "bases"
    bases.mkdir()
    t = load_file(str(root / "bases" / f"{digest}.safetensors"))
    k = sorted(t)[0]
    t[k] = t[k].clone()
    t[k][0, 0] += 1e-3
    from safetensors import safe_open

    with safe_open(str(root / "bases" / f"{digest}.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    save_file(t, str(bases / f"{digest}.safetensors"), metadata=meta)
    assert convert_main([str(lonely), str(tmp_path / "out"), "--quiet"]) == 1
    line = _one_error_line(capsys, "nora-convert")
    assert str(lonely) in line and digest in line and "mismatch" in line
    # --basis pointing at the right one (a file, or a directory of bases) wins the search.
    for b in (root / "bases" / f"{digest}.safetensors", root / "bases"):
        assert convert_main([str(lonely), str(tmp_path / f"out_{b.name}"), "--quiet", "--basis", str(b)]) == 0
    capsys.readouterr()
    assert not (tmp_path / "out").exists()


# -- convert, export, split ---------------------------------------------------------------------

@pytest.mark.parametrize("method", CORE)
def test_export_self_contained_round_trip(store, base_dir, tmp_path, capsys, monkeypatch, method):
    root, _ = store
    src = root / f"{method}_a"
    exported = tmp_path / "exported"
    assert convert_main(["--export-native", str(src), str(exported)]) == 0
    assert "format_version 1" in capsys.readouterr().out
    cfg = _config(exported)
    assert cfg["format_version"] == 1 and "digest" not in cfg["shared_basis"]
    assert {k.rpartition(".")[2] for k in load_file(str(exported / "adapter_model.safetensors"))} == \
        set(CORE[method]) | set(SHARED[method])
    # Self-contained: no store, no cache needed.
    lone = tmp_path / "alone" / "x"
    shutil.copytree(exported, lone)
    for p, out in ((src, "from_v2"), (lone, "from_v1")):
        assert convert_main([str(p), str(tmp_path / out), "--quiet", "--verify", "--base", str(base_dir)]) == 0
    capsys.readouterr()
    f2, f1 = _fold(tmp_path / "from_v2"), _fold(tmp_path / "from_v1")
    assert f2.keys() == f1.keys() and all(torch.equal(f2[k], f1[k]) for k in f2)
    # The split of either: the same basis key (the digest) and cores.
    monkeypatch.setenv("NORA_BASIS_CACHE", str(tmp_path / "empty-cache"))
    s2, s1 = split_shared_basis(src), split_shared_basis(lone)
    assert s2.key == s1.key == _config(src)["shared_basis"]["digest"]
    assert s2.basis_path is not None and s1.basis_path is None
    assert s2.cores.keys() == s1.cores.keys() and all(torch.equal(s2.cores[m], s1.cores[m]) for m in s1.cores)
    assert all(torch.equal(s2.basis[k], s1.basis[k]) for k in s1.basis)
    # An existing output, or a non-native source: one line, exit 1.
    assert convert_main(["--export-native", str(src), str(exported)]) == 1
    assert "already exists" in _one_error_line(capsys, "nora-convert")


def test_export_refuses_other_formats(fixtures_dir, tmp_path, capsys):
    assert convert_main(["--export-native", str(fixtures_dir / "nlora"), str(tmp_path / "x")]) == 1
    assert "not a native adapter" in _one_error_line(capsys, "nora-convert")
    assert convert_main(["--export-native", str(fixtures_dir / "nlora"), str(fixtures_dir / "slora"),
                         str(tmp_path / "x")]) == 2
    capsys.readouterr()


def test_old_format_adapters_still_read_convert_and_verify(base_dir, tmp_path):
    """A v1 adapter as nora-train wrote it before (basis embedded, no digest): read, folded,
    verified, and split with the key its basis content gives."""
    from nora_serve.converters.native import NativeAdapter
    from nora_serve.converters.fingerprint import base_fingerprints, load_base_weights
    from nora_serve.methods import svd_outer

    mods = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    W = load_base_weights(base_dir, mods)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in mods:
        oA, oB = svd_outer(W[m], RANK)
        tensors[m] = {"outer_A": oA, "outer_B": oB, "inner_A": torch.randn(2, RANK, generator=g),
                      "inner_B": torch.randn(RANK, 2, generator=g)}
    cfg = {"method": "nora", "r": RANK, "inner_r": 2, "lora_alpha": 8, "base_model_name_or_path": str(base_dir),
           "base_fingerprints": base_fingerprints(base_dir, mods),
           "shared_basis": {"rule": "svd", "r": RANK, "calibration": None}}
    src = NativeAdapter(cfg, tensors).save(tmp_path / "store" / "v1")
    assert _config(src)["format_version"] == 1 and not (tmp_path / "store" / "bases").exists()
    d = read_adapter(src, base=base_dir)
    assert d.basis_path is None and set(d.entries) == set(mods)
    rep = convert_adapter(src, tmp_path / "out", base=base_dir, verify=True, progress=False)
    assert rep.verify_error < 1e-6 and rep.max_rank == 2
    split = split_shared_basis(src)
    assert split.key == basis_key({f"{m}.{k}": tensors[m][n] for m in mods for k, n in (("A", "outer_A"), ("B", "outer_B"))})
