"""Base identity: ``--base`` checks and never relabels; relative names are resolved against the
source adapter; no ``null`` for DoRA; Hub ids are found in the local cache (offline) and
checked; every conversion states what its base check covered."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402

from nora_serve.cli.convert import main as convert_main  # noqa: E402
from nora_serve.converters import AdapterError, convert_adapter  # noqa: E402
from nora_serve.converters import base_identity as bi  # noqa: E402

MOD = "module model.layers.0.mlp.down_proj: tensor model.layers.0.mlp.down_proj.weight"  # first that differs
SHA = "0123456789abcdef0123456789abcdef01234567"


def written(out: Path) -> str | None:
    return json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]


def meta(out: Path) -> dict:
    return json.loads((out / "nora_convert.json").read_text())


def nlora_beside(fixtures_dir: Path, base: Path, root: Path, name: str | None = "../base") -> Path:
    """The nlora fixture copied to ``root/nlora``, its config naming ``name``, with the base
    copied to ``root/base`` (so that ``../base`` resolves to it)."""
    root.mkdir(parents=True, exist_ok=True)
    src = root / "nlora"
    shutil.copytree(fixtures_dir / "nlora", src)
    if not (root / "base").exists():
        shutil.copytree(base, root / "base")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = name
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    return src


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A tiny Llama with the fixture base's shapes and other weights."""
    from nora_serve.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("other") / "base", seed=123)


def hub_cache(root: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face cache at ``root`` holding ``model_dir`` as ``repo_id``'s main revision,
    laid out as huggingface_hub writes it. Returns the snapshot directory."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / SHA
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty local Hub cache used by this process (offline)."""
    import huggingface_hub.constants as c

    from nora_serve.serving import served_base

    root = tmp_path / "hf_cache"
    root.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    served_base._served_dirs.clear()
    yield root
    served_base._served_dirs.clear()


def test_base_never_relabels(fixtures_dir, base_dir, other_base, tmp_path, capsys):
    """--base pointing at another base of the same shapes: refused when the source's named base
    is here to compare (its weights differ); otherwise a warning, and the source's identity kept."""
    src = nlora_beside(fixtures_dir, base_dir, tmp_path / "a")
    out = tmp_path / "o1"
    assert convert_main([str(src), str(out), "--base", str(other_base), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made for another base model" in err[0] and MOD in err[0]
    assert not out.exists()

    # The source's base is not on this machine: nothing to compare; converted, identity kept.
    gone = str(tmp_path / "elsewhere" / "base")
    src2 = nlora_beside(fixtures_dir, base_dir, tmp_path / "b", name=gone)
    assert convert_main([str(src2), str(out), "--base", str(other_base), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert written(out) == gone != str(other_base.resolve())
    warn = [l for l in cap.err.splitlines() if l.startswith("nora-convert: warning: ")]
    assert len(warn) == 1 and "kept the source's identity" in warn[0] and gone in warn[0]
    scope = f"{out}: base check: shapes of 14 modules (no fingerprints to compare) against {other_base.resolve()}"
    assert scope in cap.out.splitlines()[1]
    m = meta(out)
    assert m["base_identity"] == {"written": gone, "set_by": "source", "source": gone}
    assert m["base_check"]["shapes"] == 14 and m["base_check"]["fingerprints"] == 0
    assert "not here" in m["base_check"]["note"]


def test_relative_base_resolved_and_loadable(fixtures_dir, base_dir, tmp_path, monkeypatch):
    """``../base`` is written as the absolute path it names from the source directory; the output,
    elsewhere, loads through AutoPeftModelForCausalLM (which reads only that name) and reproduces
    the adapter's own reference logits."""
    from peft import AutoPeftModelForCausalLM

    src = nlora_beside(fixtures_dir, base_dir, tmp_path / "a")
    out = tmp_path / "deeper" / "still" / "out"
    out.parent.mkdir(parents=True)
    rep = convert_adapter(src, out, progress=False)
    assert written(out) == str((tmp_path / "a" / "base").resolve())
    assert rep.base_model_name_or_path == written(out)
    assert rep.base_check == "base check: skipped, no --base given"
    assert meta(out)["base_identity"]["source"] == "../base"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoPeftModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ids, want = ref.reference_logits(fixtures_dir / "nlora")
    assert ref.max_abs_diff(ref.logits(model, ids), want) <= 1e-4


def test_dora_never_null(fixtures_dir, base_dir, tmp_path, capsys):
    dora = fixtures_dir / "dora_dyrank"
    # No base anywhere: a usage error before anything is written, naming both ways out.
    assert convert_main([str(dora), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and "--base-model-name-or-path" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(AdapterError, match="names no base model"):
        convert_adapter(dora, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()

    # --base: checked (the checkpoint's frozen weights give fingerprints) and recorded.
    assert convert_main([str(dora), str(tmp_path / "o"), "--base", str(base_dir), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert written(tmp_path / "o") == str(base_dir.resolve())
    assert out[1] == (f"{tmp_path / 'o'}: base check: shapes and fingerprints of 14 modules "
                      f"against {base_dir.resolve()}")
    m = meta(tmp_path / "o")
    assert m["base_identity"]["set_by"] == "--base" and m["base_identity"]["source"] is None
    assert m["base_check"]["fingerprints"] == 14
    card = (tmp_path / "o" / "README.md").read_text()
    assert "| base model set | from --base (the source names none) |" in card

    # A name on purpose, no base to check against: recorded as given (a Hub id stays an id).
    assert convert_main([str(dora), str(tmp_path / "o2"), "--base-model-name-or-path", "org/tiny",
                         "--quiet"]) == 0
    assert written(tmp_path / "o2") == "org/tiny"
    assert meta(tmp_path / "o2")["base_identity"]["set_by"] == "explicit"
    assert "base check: skipped, no --base given" in capsys.readouterr().out


def test_explicit_identity_overrides_source(fixtures_dir, base_dir, tmp_path, capsys):
    src = nlora_beside(fixtures_dir, base_dir, tmp_path / "a")
    out = tmp_path / "o"
    assert convert_main([str(src), str(out), "--base", str(base_dir), "--base-model-name-or-path",
                         "org/renamed", "--quiet"]) == 0
    assert written(out) == "org/renamed"
    m = meta(out)
    assert m["base_identity"] == {"written": "org/renamed", "set_by": "explicit", "source": "../base"}
    assert "set explicitly (--base-model-name-or-path); the source names `../base`" in (out / "README.md").read_text()
    # A name on purpose that is here with other weights than --base: refused.
    assert convert_main([str(src), str(tmp_path / "o2"), "--base", str(base_dir),
                         "--base-model-name-or-path", str(tmp_path / "a" / "base"), "--quiet"]) == 0
    from nora_serve.tiny import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=7)
    assert convert_main([str(src), str(tmp_path / "o3"), "--base", str(base_dir),
                         "--base-model-name-or-path", str(other), "--quiet"]) == 1
    assert "made for another base model" in capsys.readouterr().err


def test_hub_id_checked_from_local_cache(fixtures_dir, base_dir, other_base, tmp_path, offline_cache, capsys):
    """A Hub id, as --base or as the source's base, is found in the local cache (offline) and its
    weights compared; one that is not cached is said to be unchecked."""
    snap = hub_cache(offline_cache, "org/tiny", base_dir)
    hub_cache(offline_cache, "org/other", other_base)
    assert bi.local_model_dir("org/tiny") == snap.resolve()
    assert bi.local_model_dir("org/absent") is None

    # --base as a Hub id: shapes checked against the snapshot; the source's identity kept.
    src = nlora_beside(fixtures_dir, base_dir, tmp_path / "a", name="org/tiny")
    assert convert_main([str(src), str(tmp_path / "o"), "--base", "org/tiny", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"{tmp_path / 'o'}: base check: shapes of 14 modules (no fingerprints to compare) against {snap.resolve()}"
    assert written(tmp_path / "o") == "org/tiny"

    # The source names cached org/tiny, --base is a plain directory with other weights:
    # org/tiny's fingerprints are compared and differ.
    assert convert_main([str(src), str(tmp_path / "o2"), "--base", str(other_base), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "made for another base model" in err and "'org/tiny'" in err and MOD in err
    # ... and with the same weights in a directory: fingerprints compared, they agree.
    assert convert_main([str(src), str(tmp_path / "o3"), "--base", str(base_dir), "--quiet"]) == 0
    assert (f"base check: shapes and fingerprints of 14 modules against {base_dir.resolve()}"
            in capsys.readouterr().out)

    # The source names org/other (cached), --base org/tiny (cached): two Hub models, compared.
    src2 = nlora_beside(fixtures_dir, base_dir, tmp_path / "b", name="org/other")
    assert convert_main([str(src2), str(tmp_path / "o4"), "--base", "org/tiny", "--quiet"]) == 1
    assert "'org/other'" in capsys.readouterr().err

    # Not in the cache: no way to compare; said so, and the identity kept.
    src3 = nlora_beside(fixtures_dir, base_dir, tmp_path / "c", name="org/absent")
    assert convert_main([str(src3), str(tmp_path / "o5"), "--base", str(base_dir), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "the adapter's base 'org/absent' is not in the local cache" in cap.out
    assert "kept the source's identity" in cap.err
    assert written(tmp_path / "o5") == "org/absent"
    # --base naming a Hub id that is not cached: one line, exit 1.
    assert convert_main([str(src3), str(tmp_path / "o6"), "--base", "org/absent", "--quiet"]) == 1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_hub_id_through_env_in_a_fresh_process(fixtures_dir, base_dir, other_base, tmp_path):
    """The same through the CLI's own process, the cache named only by HF_HUB_CACHE, offline."""
    hub_cache(tmp_path / "hub", "org/tiny", base_dir)
    src = nlora_beside(fixtures_dir, base_dir, tmp_path / "a", name="org/tiny")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "nora_serve.cli.convert", str(src), str(tmp_path / "o"),
                        "--base", str(other_base), "--quiet"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 1 and "made for another base model" in r.stderr and "'org/tiny'" in r.stderr


def test_served_hub_id_resolved_and_checked(fixtures_dir, base_dir, other_base, tmp_path, offline_cache, caplog):
    """The server's base (``vllm_plugin.serving`` / ``state``): a Hub id is resolved from the
    local cache and adapters are checked against it; the scope is logged once, in one line."""
    from nora_serve.serving.cache.build import prepare_adapter
    from nora_serve.serving.served_base import served_base_dir

    snap = hub_cache(offline_cache, "org/served", other_base)
    log = logging.getLogger("test.nora")
    with caplog.at_level(logging.INFO, logger="test.nora"):
        d = served_base_dir("org/served", True, log)
        assert served_base_dir("org/served", True, log) == d == str(snap.resolve())
        assert served_base_dir("org/uncached", True, log) is None
        assert served_base_dir("org/served", False, log) is None
    # Not cached when first asked (vLLM may download it later): asked again, then found.
    hub_cache(offline_cache, "org/uncached", base_dir)
    assert served_base_dir("org/uncached", True) is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # once each
    assert lines[0].startswith("nora: base check: shapes, and fingerprints where") and "Hub id 'org/served'" in lines[0]
    assert lines[1] == "nora: base check: skipped, base 'org/uncached' not in the local cache"
    assert lines[2] == "nora: base check: off (--nora-skip-base-check)"

    # An adapter made for the fixture base (it names it) is refused by the served Hub model.
    src = nlora_beside(fixtures_dir, base_dir, tmp_path / "a")
    with pytest.raises(AdapterError, match="made for another base model"):
        prepare_adapter(src, base=d, max_rank=16, cache_dir=tmp_path / "cache")
    # The DoRA checkpoint (its own frozen weights) too; and it passes against its own base.
    with pytest.raises(AdapterError):
        prepare_adapter(fixtures_dir / "dora_dyrank", base=d, max_rank=16, cache_dir=tmp_path / "cache")
    snap2 = hub_cache(offline_cache, "org/fixture", base_dir)
    p = prepare_adapter(fixtures_dir / "dora_dyrank", base=served_base_dir("org/fixture", True),
                        max_rank=16, cache_dir=tmp_path / "cache")
    assert written(Path(p.path)) == str(snap2.resolve())


def test_resolve_identity_rules(tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "base").mkdir()
    assert bi.resolve_identity("../base", relative_to=tmp_path / "ad") == str((tmp_path / "base").resolve())
    assert bi.resolve_identity("meta-llama/Llama-2-7b-hf", relative_to=tmp_path / "ad") == "meta-llama/Llama-2-7b-hf"
    assert bi.resolve_identity("../gone", relative_to=tmp_path / "ad") == str((tmp_path / "gone").resolve())
    assert bi.resolve_identity(None, relative_to=tmp_path) is None
    assert bi.resolve_identity("  ", relative_to=tmp_path) is None
