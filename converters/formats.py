"""The adapter format registry: one :class:`AdapterFormat` per on-disk format a reader takes.

A format says how it is recognised (``detect``), how it is read (``read``), whether its files
name their base model (``names_base``) and what it checks against a base beyond the common
shape and fingerprint checks (``check_base``). :mod:`.readers` registers the built-in ones in
detection order; everything else (``read_adapter``, ``nora-convert``, the serving cache) asks
the registry instead of comparing format names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapter_deltas import AdapterDeltas


@dataclass(frozen=True)
class AdapterFormat:
    name: str
    summary: str  # one line: what it is (``nora-convert --help``)
    # (directory, its adapter_config.json or None when it has none) -> whether it is this format
    detect: Callable[[Path, dict | None], bool]
    read: Callable[[Path, Path | None, dict], AdapterDeltas]  # (directory, base, options)
    # Its files name the base model they were made for; False: the base must be given
    # (``--base`` or ``--base-model-name-or-path``), ``what`` saying what names none.
    names_base: bool = True
    what: str = ""  # the source as messages name it ("a dynamic-rank DoRA checkpoint")
    # Its own check against a base directory, before the common shape and fingerprint checks.
    check_base: Callable[[AdapterDeltas, Path], None] | None = None


_FORMATS: dict[str, AdapterFormat] = {}


def register_format(fmt: AdapterFormat) -> AdapterFormat:
    """Add ``fmt``; detection tries formats in registration order."""
    if fmt.name in _FORMATS and _FORMATS[fmt.name] is not fmt:
        raise ValueError(f"adapter format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> AdapterFormat:
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r} (known: {', '.join(_FORMATS)})") from None


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def formats() -> tuple[AdapterFormat, ...]:
    return tuple(_FORMATS.values())


def names_base(name: str | None) -> bool:
    """Whether adapters of format ``name`` name their own base (an unknown format: assumed so)."""
    fmt = _FORMATS.get(name) if isinstance(name, str) else None
    return fmt is None or fmt.names_base
