"""The served model's base, for the check of every adapter the server loads: a local directory
or a Hub id resolved from the local cache (never the network), and one log line per model that
says what the check covers."""

from __future__ import annotations

from pathlib import Path

from nora_serve.converters.base_identity import local_model_dir

_served_dirs: dict[str, Path] = {}  # found ones only: a model may reach the cache later (vLLM downloads it)


def _served_base(model: str) -> tuple[str | None, str]:
    d = _served_dirs.get(model) or local_model_dir(model)
    if d is not None:
        _served_dirs[model] = d
        how = "" if Path(model).expanduser().is_dir() else f" (Hub id {model!r}, from the local cache)"
        return str(d), (f"base check: shapes, and fingerprints where an adapter records them or "
                        f"names a base found here, against {d}{how}")
    return None, f"base check: skipped, base {model!r} not in the local cache"


_logged: set[str] = set()


def served_base_dir(model: str | None, check: bool, log=None) -> str | None:
    """The served model's local directory for the check of every adapter (a Hub id resolved
    from the local cache), or None; says once per model on ``log`` what the check covers.
    (Adapters that record fingerprints have them compared; the others have their shapes and
    named base checked.)"""
    if not model:
        return None
    if not check:
        d, line = None, "base check: off (--nora-skip-base-check)"
    else:
        d, line = _served_base(str(model))
    if log is not None and line not in _logged:
        _logged.add(line)
        log.info("nora: %s", line)
    return d
