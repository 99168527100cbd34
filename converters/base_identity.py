"""Which base model an adapter belongs to, where its weights are here, and what was checked.

Three questions, kept apart:

* **where** a base reference lies on this machine (:func:`local_model_dir`): a directory
  (a relative name from an adapter's config is relative to the adapter's directory), or a Hub
  id's snapshot in the local Hugging Face cache; never the network;
* **what to write** as a converted adapter's ``base_model_name_or_path``
  (:func:`resolve_identity`): paths made absolute, Hub ids kept as ids;
* **what the check against a base covered** (:class:`BaseCheck`): shapes, weight
  fingerprints, or nothing, as one line for the log.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError

# A Hub repo id: "name" or "org/name" (letters, digits, "-", "_", "."), not a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(".")


def _as_path(name: str, relative_to: str | os.PathLike | None) -> Path:
    p = Path(name).expanduser()
    if not p.is_absolute() and relative_to is not None:
        p = Path(relative_to) / p
    return p


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of the Hub model ``repo_id`` (its ``main`` revision) in the Hugging
    Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), or None when it is not there. Never downloads."""
    if not looks_like_hub_id(repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, a malformed cache, no huggingface_hub: not here
        return None


def local_model_dir(name_or_path: str | os.PathLike, *,
                    relative_to: str | os.PathLike | None = None) -> Path | None:
    """The local directory holding a model's files: an existing directory (a relative name is
    taken relative to ``relative_to``, default the working directory), else a Hub id's snapshot
    in the local cache, else None."""
    name = str(name_or_path).strip()
    if not name:
        return None
    p = _as_path(name, relative_to)
    try:
        if p.is_dir():
            return p.resolve()
    except OSError:
        pass
    return hub_snapshot(name)


def resolve_identity(name: str | None, *, relative_to: str | os.PathLike | None) -> str | None:
    """What a converted adapter records as ``base_model_name_or_path`` for the reference
    ``name``: a path that exists here, absolute (relative ones against ``relative_to``, the
    directory the name came from); a Hub id, as is; any other path, made absolute likewise."""
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    p = _as_path(name, relative_to)
    if p.exists():
        return str(p.resolve())
    if looks_like_hub_id(name):
        return name
    return str(p.resolve())


def find_base(base: str | os.PathLike) -> Path:
    """``--base``: a model directory or a Hub id in the local cache; else a one-line error."""
    d = local_model_dir(base)
    if d is None:
        why = ("not a directory, and not in the local Hugging Face cache (HF_HUB_CACHE)"
               if looks_like_hub_id(str(base)) else "base model directory not found")
        raise AdapterError(why, file=base)
    return d


@dataclass(frozen=True)
class BaseCheck:
    """What the check of an adapter against a base covered."""

    base: str | None  # the base's local directory, or the reference that could not be used
    shapes: int = 0  # modules whose shape was checked against the base's weights
    fingerprints: int = 0  # modules whose base weight fingerprints were compared
    skipped: str | None = None  # why nothing was checked
    note: str | None = None  # a part that could not be checked (the adapter's named base)

    def line(self) -> str:
        if self.skipped:
            return f"base check: skipped, {self.skipped}"
        what = (f"shapes and fingerprints of {self.shapes} modules" if self.fingerprints
                else f"shapes of {self.shapes} modules (no fingerprints to compare)")
        return f"base check: {what} against {self.base}" + (f"; {self.note}" if self.note else "")

    def as_dict(self) -> dict:
        return {"scope": self.line(), "base": self.base, "shapes": self.shapes,
                "fingerprints": self.fingerprints, "skipped": self.skipped, "note": self.note}


def compare_named_base(name: str | None, relative_to: Path, base: Path, fps: dict[str, str],
                       where: Path) -> tuple[bool, str | None]:
    """Check the base an adapter names (``base_model_name_or_path``) against the base it is
    checked with (``base``, whose fingerprints of the targeted modules are ``fps``).

    A name found here (a directory, relative to the adapter; or a Hub id in the local cache)
    must hold the same weights for the targeted modules, else AdapterError naming the first
    module that differs. Returns ``(fingerprints compared, why the name could not be checked)``.
    """
    from .fingerprint import base_fingerprints

    if not isinstance(name, str) or not name.strip():
        return False, None
    name = name.strip()
    named = local_model_dir(name, relative_to=relative_to)
    if named is None:
        hub = looks_like_hub_id(name) and not _as_path(name, relative_to).exists()
        served = _hub_id_of(base)
        if hub and served is not None:  # both Hub models: the ids must agree
            if served.lower() != name.lower():
                raise AdapterError(f"made for another base model: base_model_name_or_path {name!r}, "
                                   f"the base is {served!r}", file=where)
            return False, None
        return False, (f"the adapter's base {name!r} is not in the local cache" if hub
                       else f"the adapter's base {name!r} is not here")
    try:
        if named.resolve() == Path(base).resolve():
            return False, None  # the same directory: the shapes check covers it
        theirs = base_fingerprints(named, list(fps))
    except Exception:  # not a readable base (another layout, modules missing): cannot compare
        return False, f"the adapter's base {name!r} has no readable weights for its modules"
    for module in sorted(fps):
        if theirs.get(module) != fps[module]:
            raise AdapterError(
                f"made for another base model: its base_model_name_or_path {name!r} names a "
                f"model whose weights differ from the base's", file=where, module=module,
                tensor=f"{module}.weight")
    return True, None


_HUB_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def _hub_id_of(base: Path) -> str | None:
    """``org/name`` when ``base`` is a Hub cache snapshot (``.../models--org--name/snapshots/...``)."""
    m = _HUB_SNAPSHOT.search(str(Path(base).resolve()) + "/")
    return f"{m.group(1)}/{m.group(2)}" if m else None
