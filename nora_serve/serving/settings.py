"""The plugin's settings, carried to every vLLM process inside ``additional_config["nora"]``.

No vLLM import here: this is plain data, shared by the API server, engine core and workers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KEY = "nora"

# LoRA defaults switched on by --enable-nora, each only where the user left vLLM's default.
DEFAULT_MAX_LORAS = 8
DEFAULT_MAX_LORA_RANK = 64
DEFAULT_MAX_CPU_LORAS = 32
# Shared-basis storage: distinct bases resident at once, and the largest basis rank kept as
# cores (larger ones are served as plain LoRA).
DEFAULT_MAX_BASES = 4
DEFAULT_CORE_RANK = 32
# The convert-on-load cache is kept under this size (GB, 10^9 bytes): least recently used
# entries that no loaded adapter uses are removed first.
DEFAULT_CACHE_MAX_GB = 20.0


def default_cache_dir() -> str:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "nora-serve", "adapters")


@dataclass(frozen=True)
class NoraSettings:
    enabled: bool = True
    adapter_dir: str | None = None  # the adapter store: every sub-directory servable by name
    cache_dir: str | None = None  # converted adapters, keyed by content
    check_base: bool = True  # refuse adapters whose base fingerprints do not match the model
    dense_loras: int | None = None  # slots with full LoRA storage (None: all of --max-loras)
    max_bases: int = DEFAULT_MAX_BASES  # shared bases resident at once
    core_rank: int = DEFAULT_CORE_RANK  # largest shared-basis rank stored as cores; 0: off
    cache_max_gb: float = DEFAULT_CACHE_MAX_GB  # bound of the cache dir; 0: no bound
    # /v1/load_lora_adapter (arbitrary server paths): off unless asked for, here or with
    # vLLM's own VLLM_ALLOW_RUNTIME_LORA_UPDATING. The adapter store works without it.
    allow_runtime_loading: bool = False
    # CPU: keep vLLM's torch.compile on with LoRA (the LoRA work is an opaque op in the graph).
    compile: bool = True
    # Load the store's adapters (up to --max-cpu-loras, by name) into the engine at start, so
    # that their first request finds them resident (serving.py StorePreload).
    preload_store: bool = False

    # Where adapters and the cache live and how requests are admitted: none changes the model's
    # computation graph, so none is in vLLM's compile-cache key (hooks.install_config_hash_hook):
    # a server started on another cache or store directory must not compile again.
    NOT_IN_GRAPH = ("adapter_dir", "cache_dir", "check_base", "cache_max_gb", "allow_runtime_loading",
                    "preload_store")

    @property
    def shared_basis(self) -> bool:
        return self.core_rank > 0 and self.max_bases > 0

    def keeps_as_cores(self, basis_rank: int) -> bool:
        """Whether a shared-basis adapter of this rank is stored as cores (else as LoRA)."""
        return self.shared_basis and basis_rank <= self.core_rank

    def dense_slots(self, max_loras: int) -> int:
        return max_loras if self.dense_loras is None else max(1, min(self.dense_loras, max_loras))

    def shared_basis_for(self, lora_config) -> bool:
        """Whether shared-basis storage exists in the workers of this LoRA config: vLLM's fully
        sharded LoRA layers keep their own storage, so there every adapter is dense. The
        scheduler and the workers decide an adapter's kind with this same rule."""
        return self.shared_basis and not getattr(lora_config, "fully_sharded_loras", False)

    @property
    def cache_max_bytes(self) -> int | None:
        return int(self.cache_max_gb * 1e9) if self.cache_max_gb and self.cache_max_gb > 0 else None

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir or default_cache_dir())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "NoraSettings | None":
        """The settings if nora is enabled in this ``additional_config``, else ``None``."""
        if not isinstance(additional_config, dict):
            return None
        raw = additional_config.get(KEY)
        if raw is True:
            raw = {}
        if not isinstance(raw, dict) or not raw.get("enabled", True):
            return None
        known = {k: raw[k] for k in ("enabled", "adapter_dir", "cache_dir", "check_base",
                                     "dense_loras", "max_bases", "core_rank", "cache_max_gb", "compile",
                                     "allow_runtime_loading", "preload_store") if k in raw}
        return cls(**known)


def settings_of(vllm_config: Any) -> NoraSettings | None:
    """Settings from a ``VllmConfig`` (or anything with ``additional_config``)."""
    if vllm_config is None:
        return None
    return NoraSettings.from_additional_config(getattr(vllm_config, "additional_config", None))
