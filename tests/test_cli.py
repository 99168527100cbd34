"""CLI hygiene shared by nora-convert, nora-train and nora-serve: --version, exit codes,
stderr for warnings and errors, shared flag names, no progress-bar lines in logs; and the
output directories (permissions, replacing an existing output without a gap)."""

from __future__ import annotations

import importlib.metadata
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nora_serve.cli import DTYPE_CHOICES, version
from nora_serve.cli.convert import build_parser as convert_parser
from nora_serve.cli.convert import main as convert_main
from nora_serve.converters import atomic

DORA = "dora_dyrank/checkpoint"


def _expected_version() -> str:
    return f"nora-serve {importlib.metadata.version('nora-serve')}"


@pytest.mark.parametrize("module", ["convert", "train"])
def test_version_flag(module, capsys):
    mod = __import__(f"nora_serve.cli.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        mod.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == _expected_version()


def test_serve_version_does_not_import_vllm():
    code = ("import sys\n"
            "from nora_serve.cli.serve import main\n"
            "try:\n    main(['--version'])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'vllm' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines() == [_expected_version(), "exit 0 False"], r.stderr


def test_version_falls_back_to_dev(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == "dev"


def test_convert_exit_codes(fixtures_dir, tmp_path, capsys):
    assert convert_main([str(fixtures_dir / "nlora"), str(tmp_path / "ok"), "--quiet"]) == 0
    capsys.readouterr()
    # Runtime: the output exists.
    assert convert_main([str(fixtures_dir / "nlora"), str(tmp_path / "ok"), "--quiet"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("nora-convert: error: ")
    # Usage: argparse's own errors and the checks made after parsing.
    with pytest.raises(SystemExit) as e:
        convert_main([str(fixtures_dir / "nlora"), str(tmp_path / "x"), "--dtype", "int8"])
    assert e.value.code == 2
    capsys.readouterr()
    for argv in ([str(fixtures_dir / "nlora")],
                 [str(fixtures_dir / "nlora"), str(tmp_path / "x"), "--max-rank", "0"],
                 [str(fixtures_dir / "nlora"), str(tmp_path / "x"), "--tolerance", "1.5"]):
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: nora-convert") and "nora-convert: error: " in err
    assert not (tmp_path / "x").exists()


def test_convert_warnings_go_to_stderr(fixtures_dir, tmp_path, capsys):
    """The DoRA lora_alpha assumption is a warning: stderr, one line; stdout keeps results."""
    # --base: a DoRA checkpoint names no base of its own (nothing to write as its identity).
    assert convert_main([str(fixtures_dir / DORA), str(tmp_path / "o"), "--quiet", "--base", str(fixtures_dir / "base")]) == 0
    cap = capsys.readouterr()
    warn = [l for l in cap.err.splitlines() if l.startswith("nora-convert: warning: ")]
    assert len(warn) == 1 and "lora_alpha" in warn[0]
    assert "lora_alpha" not in cap.out and "note" not in cap.out
    assert cap.out.startswith(f"{tmp_path / 'o'}: 14 modules")


def test_shared_flags_across_convert_and_train():
    """--lora-alpha (--alpha), --base, --quiet (--no-progress), --dtype: the same names and
    the same dtype choices on both tools."""
    from nora_serve.cli.train import build_parser as train_parser

    def options(p):
        return {s: a for a in p._actions for s in a.option_strings}

    c, t = options(convert_parser()), options(train_parser())
    for flag in ("--lora-alpha", "--alpha", "--base", "--quiet", "--no-progress", "--dtype", "--version",
                 "--overwrite"):
        assert flag in c and flag in t, flag
    assert c["--lora-alpha"] is c["--alpha"] and t["--lora-alpha"] is t["--alpha"]
    assert c["--quiet"] is c["--no-progress"] and t["--quiet"] is t["--no-progress"]
    assert t["--base"] is t["--model"]
    assert tuple(c["--dtype"].choices) == tuple(t["--dtype"].choices) == DTYPE_CHOICES
    a = convert_parser().parse_args(["S", "O", "--alpha", "4", "--no-progress"])
    assert a.lora_alpha == 4.0 and a.quiet and a.dtype == "auto"


def test_convert_progress_bar_stays_out_of_logs(fixtures_dir, tmp_path):
    """Without --quiet and with stderr a pipe (a log): the table on stdout, no bar, no \\r."""
    r = subprocess.run([sys.executable, "-m", "nora_serve.cli.convert", str(fixtures_dir / "nlora"),
                        str(tmp_path / "o")], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stderr and b"\r" not in r.stdout
    assert r.stderr == b""
    assert b"src rank" in r.stdout


# ---- output directories (converters/atomic.py) ---------------------------------------------


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_convert_output_permissions(fixtures_dir, tmp_path, umask022):
    assert convert_main([str(fixtures_dir / "nlora"), str(tmp_path / "o"), "--quiet"]) == 0
    modes = _modes(tmp_path / "o")
    assert modes.pop(".") == 0o755
    assert modes and set(modes.values()) == {0o644}, modes


def test_atomic_dir_modes_follow_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic.atomic_dir(tmp_path / "o") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
            (tmp / "g").write_text("y")
            os.chmod(tmp / "g", 0o600)  # as a tempfile-based writer leaves it
    finally:
        os.umask(old)
    assert _modes(tmp_path / "o") == {".": 0o750, "sub": 0o750, "sub/f": 0o640, "g": 0o640}


def _watch_out(monkeypatch, out: Path) -> list[tuple[str, bool]]:
    """Record, after each rename / exchange / removal atomic_dir makes, whether ``out`` holds
    something."""
    seen: list[tuple[str, bool]] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            r = fn(*a, **k)
            seen.append((name, (out / "f").is_file()))
            return r
        return wrapped

    monkeypatch.setattr(atomic, "exchange", spy("exchange", atomic.exchange))
    monkeypatch.setattr(atomic, "_remove", spy("remove", atomic._remove))
    monkeypatch.setattr(atomic.os, "replace", spy("replace", os.replace))
    return seen


def _write(out: Path, text: str, **kw) -> None:
    with atomic.atomic_dir(out, **kw) as tmp:
        (tmp / "f").write_text(text)


def test_replace_never_leaves_nothing(tmp_path, monkeypatch):
    """Overwriting swaps old and new in one step: at every step there is a complete output,
    the new one once the swap is done; nothing is left beside it."""
    out = tmp_path / "o"
    _write(out, "old")
    if not atomic.exchange(tmp_path, tmp_path):  # probes the platform; a self-swap changes nothing
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    seen = _watch_out(monkeypatch, out)
    _write(out, "new", overwrite=True)
    assert seen and all(present for _, present in seen), seen
    assert seen[0][0] == "exchange" and "replace" not in {n for n, _ in seen}
    assert (out / "f").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_replace_fallback_without_exchange(tmp_path, monkeypatch):
    """Where the swap is not available: old aside, new in, old deleted; the old content goes
    only after the new one is in place, and nothing is left beside it."""
    out = tmp_path / "o"
    _write(out, "old")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    seen = _watch_out(monkeypatch, out)
    _write(out, "new", overwrite=True)
    assert [n for n, _ in seen] == ["exchange", "replace", "replace", "remove"]
    assert seen[-1] == ("remove", True) and seen[-2] == ("replace", True)
    assert (out / "f").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_replace_fallback_failure_keeps_old(tmp_path, monkeypatch):
    out = tmp_path / "o"
    _write(out, "old")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 2:  # the new one into place
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        _write(out, "new", overwrite=True)
    assert (out / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


# ---- packaging ------------------------------------------------------------------------------


def test_packaging_metadata():
    """Classifiers and license in pyproject, the full Apache-2.0 text beside it, py.typed
    shipped as package data, and no placeholder URLs."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    repo = Path(__file__).resolve().parents[1]
    py = tomllib.loads((repo / "pyproject.toml").read_text())
    proj = py["project"]
    assert proj["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in proj["classifiers"]
    assert "Typing :: Typed" in proj["classifiers"]
    for url in proj.get("urls", {}).values():
        assert "example" not in url and "your-org" not in url and "TODO" not in url
    text = (repo / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text  # the full text
    assert (repo / "nora_serve" / "py.typed").is_file()
    assert "py.typed" in py["tool"]["setuptools"]["package-data"]["nora_serve"]
