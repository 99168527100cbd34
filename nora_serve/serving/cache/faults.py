"""Faults of the cache itself: a read-only or full disk raises :class:`CacheUnavailable` (a fault of
the server), never an adapter error."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .temporaries import tmp_tag


class CacheUnavailable(RuntimeError):
    """The cache directory cannot be written (read-only, full, gone): a fault of the server, not
    of the adapter. ``reason``: the cause alone (``No space left on device``), without paths."""

    def __init__(self, cache_dir, reason: str):
        super().__init__(f"the adapter cache {cache_dir} cannot be written: {reason}")
        self.reason = reason


# errno values that say the disk, not the adapter, is at fault.
_DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
# The same faults as Rust's safetensors words them (it raises its own error type, not OSError).
_DISK_WORDS = ("StorageFull", "ReadOnlyFilesystem", "No space left", "Read-only file system",
               "os error 28", "os error 30", "Disk quota")


def disk_fault(e: BaseException, cache_dir: Path) -> bool:
    if isinstance(e, OSError):
        if e.errno in _DISK_ERRNOS:
            return True
        name = getattr(e, "filename", None)
        return isinstance(name, str) and inside(name, cache_dir)
    return any(w in str(e) for w in _DISK_WORDS)


def inside(path: str, root: str | Path) -> bool:
    """``path`` is ``root`` or below it (as strings: no resolving)."""
    root_s = str(Path(root).expanduser())
    return path == root_s or path.startswith(root_s.rstrip(os.sep) + os.sep)


def unavailable(e: BaseException, cache_dir: Path) -> CacheUnavailable:
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        text = str(e)
        code = next((c for c, words in ((errno.ENOSPC, ("StorageFull", "os error 28", "code: 28")),
                                        (errno.EROFS, ("ReadOnlyFilesystem", "os error 30", "code: 30")))
                     if any(w in text for w in words)), None)
        reason = os.strerror(code) if code else text.splitlines()[0][:200]
    return CacheUnavailable(cache_dir, reason)


def check_writable(cache_dir: str | Path) -> None:
    """Raise :class:`CacheUnavailable` (one line) unless a file can be created in ``cache_dir``."""
    cache_dir = Path(cache_dir).expanduser()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".probe.tmp-{tmp_tag()}-", dir=cache_dir)
        try:
            os.write(fd, b"nora")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise unavailable(e, cache_dir) from None
