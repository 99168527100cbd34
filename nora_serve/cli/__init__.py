"""Command-line entry points (``nora-convert``, ``nora-train``, ``nora-serve``) and what they
share: the version string, the ``--version`` flag, one-line warnings on stderr.

Exit status of ``nora-convert`` and ``nora-train``: 0 success, 1 runtime error (one line on
stderr), 2 usage error (argparse's message on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Iterator

DIST_NAME = "nora-serve"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
# ``--dtype`` takes the same choices on every tool; "auto" means the tool's own default.
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def version() -> str:
    """The installed distribution's version (importlib.metadata), or ``"dev"``."""
    from nora_serve import _version

    return _version()


def version_line() -> str:
    return f"{DIST_NAME} {version()}"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the version and exit")


def usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """What ``parser.error`` prints (usage, then ``prog: error: message``), returned as exit
    status 2 instead of raised, for checks made after parsing."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


def warn(prog: str, message: str) -> None:
    print(f"{prog}: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def warnings_to_stderr(prog: str) -> Iterator[None]:
    """Python warnings raised inside (by nora-serve's own code) print as one
    ``prog: warning: ...`` line on stderr instead of ``file:line: UserWarning: ...``."""
    old = warnings.showwarning

    from nora_serve.converters.errors import NoraWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, NoraWarning):
            return old(message, category, filename, lineno, file, line)
        warn(prog, " ".join(str(message).split()))

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old
