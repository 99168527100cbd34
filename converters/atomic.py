"""Directory output that is all or nothing: written beside the target, renamed into place.

The output gets the permissions ``save_pretrained`` gives (directories ``0777 & ~umask``,
files ``0666 & ~umask``: 0755 / 0644 under the usual umask 022), not ``mkdtemp``'s 0700. An
existing output is replaced without a moment where nothing is there: on Linux the two
directories are swapped in one ``renameat2(RENAME_EXCHANGE)``; where that is not available,
the new one is first renamed in beside the old one's moved-aside copy (two renames, a window
of microseconds). The old content is deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterator

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
_libc = None


def _renameat2():
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return getattr(_libc, "renameat2", None) if _libc else None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both must exist). Returns False where the
    platform, libc or file system cannot (then nothing changed); raises OSError on other
    failures."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _umask(probe_dir: Path) -> int:
    """The process umask, read without changing it (setting it to read it, ``os.umask``,
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = _mkdir_unique(probe_dir, ".umask-probe-")  # elsewhere: what mkdir makes of 0777
    try:
        return 0o777 & ~stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    """Like ``tempfile.mkdtemp`` but created with mode 0777 & ~umask, as ``mkdir`` would."""
    for _ in range(100):
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(p, 0o777)
        except FileExistsError:
            continue
        return p
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def _sync_and_fix_modes(tmp: Path) -> None:
    """fsync every file; give directories and files the modes ``mkdir`` / ``open`` would give
    under the current umask (some writers, e.g. ``tempfile``-based ones, use 0600/0700)."""
    mask = _umask(tmp)
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            if stat.S_IMODE(os.stat(p).st_mode) & 0o111 == 0:
                os.chmod(p, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out``.

    On any exception (or Ctrl-C) the temporary directory is removed and ``out`` is untouched,
    so a failed or interrupted run never leaves a partial output. With ``overwrite`` an
    existing ``out`` is swapped for the new one (see the module docstring); at no moment is
    there nothing at ``out``.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # ".tmp-" in the name: the plugin's cache removes such leftovers of a killed process.
    tmp = _mkdir_unique(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
        _sync_and_fix_modes(tmp)
        if os.path.lexists(out):
            if exchange(tmp, out):  # out: the new content; tmp: the old one
                _remove(tmp)
            else:
                old = out.with_name(f".{out.name}.tmp-old-{secrets.token_hex(4)}")
                os.replace(out, old)
                try:
                    os.replace(tmp, out)
                except BaseException:
                    os.replace(old, out)  # put the old one back
                    raise
                _remove(old)
        else:
            os.replace(tmp, out)
        with contextlib.suppress(OSError):  # make the rename durable
            fd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        if tmp.exists():
            _remove(tmp)
        raise
