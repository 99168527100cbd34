"""The cache's temporaries: their names (host and pid, so that a dead writer's are recognised),
removing a directory so that readers see it whole or gone, and :func:`clean_stale_temporaries`,
which removes what killed conversions left."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from .keys import BASES_SUBDIR

_TMP = re.compile(r"^\.(?P<key>[0-9a-f]{32}|[^.]+)\.(?:tmp|trash)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-")
STALE_AFTER_S = 6 * 3600  # a temporary of a live process older than this is removed too


def tmp_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:16] or "host"
    return f"{host}-{os.getpid()}"


def discard(path: Path) -> None:
    """Remove a directory so that readers see it either whole or gone: renamed away first."""
    trash = path.with_name(f".{path.name}.trash-{tmp_tag()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_temporaries(cache_dir: str | Path) -> list[str]:
    """Remove the temporaries of conversions that can no longer finish (their process is gone,
    e.g. after a kill -9, or they are hours old). Returns the names removed."""
    removed = []
    host = tmp_tag().rsplit("-", 1)[0]
    now = time.time()
    for folder in (Path(cache_dir), Path(cache_dir) / BASES_SUBDIR):
        try:
            names = [p for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".trash-" in p.name)]
        except OSError:
            continue
        for p in names:
            m = _TMP.match(p.name)
            try:
                age = now - p.lstat().st_mtime
            except OSError:
                continue
            # Called at start: a temporary named after this very process is a previous one's
            # whose pid was reused.
            dead = m is not None and m.group("host") == host and (
                int(m.group("pid")) == os.getpid() or not _pid_alive(int(m.group("pid"))))
            if dead or age > STALE_AFTER_S or (m is None and age > 3600):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()
                removed.append(p.name)
    return removed
