"""``--enable-nora`` and friends: CLI flags -> ``additional_config["nora"]`` -> LoRA defaults.

``hooks.py`` calls these from its ``EngineArgs`` wrappers; nothing here patches vLLM."""

from __future__ import annotations

import argparse
import os
import sys

from nora_serve.serving.settings import (
    DEFAULT_CACHE_MAX_GB,
    DEFAULT_CORE_RANK,
    DEFAULT_MAX_BASES,
    DEFAULT_MAX_CPU_LORAS,
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_LORAS,
    KEY,
    NoraSettings,
)


def add_nora_cli_args(parser) -> None:
    if any("--enable-nora" in getattr(a, "option_strings", ()) for a in parser._actions):
        return
    group = parser.add_argument_group(
        "nora", "Serve NoRA / LoRA-XS / SLoRA / NLoRA / IntTune / dynamic-rank DoRA and PEFT adapters "
        "(--help=nora lists these flags). Adapters are converted to LoRA on load; native "
        "shared-basis adapters (NoRA, LoRA-XS, IntTune) keep one shared basis and only their cores."
    )
    # Flags whose help states their default themselves: argparse adds no "(default: None)".
    unset = argparse.SUPPRESS
    group.add_argument(
        "--enable-nora", action="store_true", default=False,
        help="Load adapters of every supported format wherever a LoRA path is accepted, and "
        f"switch LoRA on (defaults unless set: --max-loras {DEFAULT_MAX_LORAS}, "
        f"--max-lora-rank {DEFAULT_MAX_LORA_RANK}, --max-cpu-loras {DEFAULT_MAX_CPU_LORAS}).",
    )
    group.add_argument(
        "--nora-adapter-dir", default=unset,
        help="Adapter store: every adapter directory in it is servable by its name on first "
        "request (implies --enable-nora). Names are plain directory names; nothing outside the "
        "store (symlinks included) is ever read. Does not open /v1/load_lora_adapter.",
    )
    group.add_argument(
        "--nora-preload-store", action="store_true", default=False,
        help="At start, load every adapter of --nora-adapter-dir (by name, up to --max-cpu-loras; "
        "converted into the cache while the engine starts, then read by the workers in bulk) so "
        "that its first request finds it resident; /health answers once they are loaded. A "
        "faulty adapter is skipped (its requests get their 400). Idle ones are still evicted "
        "under --nora-cache-max-gb and resolved again on their next request.",
    )
    group.add_argument(
        "--nora-allow-runtime-loading", action="store_true", default=False,
        help="Open vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (as "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 does): any client can then make the server read "
        "any directory it can read. Use it only together with --api-key, on a trusted network.",
    )
    group.add_argument(
        "--nora-cache-dir", default=unset,
        help="Where converted adapters are cached (default ~/.cache/nora-serve/adapters).",
    )
    group.add_argument(
        "--nora-cache-fallback", action="store_true", default=False,
        help="If the cache directory cannot be written, convert into a fresh temporary directory "
        "instead (default: the server refuses to start, naming the directory and the cause).",
    )
    group.add_argument(
        "--nora-cache-max-gb", type=float, default=unset, metavar="GB",
        help=f"Bound of the cache (default {DEFAULT_CACHE_MAX_GB:g}; 0: none): least recently "
        "used entries that no loaded adapter uses are removed once it is exceeded.",
    )
    group.add_argument(
        "--nora-skip-base-check", action="store_true", default=False,
        help="Do not refuse adapters whose base-model fingerprints differ from the served model.",
    )
    group.add_argument(
        "--nora-dense-loras", type=int, default=unset, metavar="K",
        help="Slots with full (padded) LoRA storage, for adapters without a shared basis "
        "(default: all of --max-loras). Native NoRA / LoRA-XS / IntTune adapters need no such slot: they "
        "keep one copy of their shared basis and only an R x R core per module, so --max-loras "
        "can be in the thousands with a small K. The scheduler puts at most K adapters without "
        "a shared basis in one step.",
    )
    group.add_argument(
        "--nora-max-bases", type=int, default=unset, metavar="G",
        help=f"Distinct shared bases resident at once (default {DEFAULT_MAX_BASES}); each costs "
        "about one rank-R LoRA. The scheduler puts at most G bases in one step.",
    )
    group.add_argument(
        "--nora-core-rank", type=int, default=unset, metavar="R",
        help=f"Largest shared-basis rank stored as cores (default {DEFAULT_CORE_RANK}); cores "
        "cost R*R per module per slot. Larger ones, and every adapter with 0, are served as "
        "plain LoRA.",
    )


def apply_nora_cli_args(engine_args, args) -> NoraSettings | None:
    """Fold the nora flags into ``engine_args.additional_config`` (the only carrier to the
    engine and worker processes) and, if nora is on, its LoRA defaults; the settings or
    ``None``."""
    enabled = bool(getattr(args, "enable_nora", False) or getattr(args, "nora_adapter_dir", None))
    extra = dict(engine_args.additional_config or {}) if isinstance(
        engine_args.additional_config, dict) else engine_args.additional_config
    if enabled and isinstance(extra, dict):
        current = extra.get(KEY)
        merged = dict(current) if isinstance(current, dict) else {}
        merged["enabled"] = True
        if getattr(args, "nora_adapter_dir", None):
            merged["adapter_dir"] = os.path.abspath(args.nora_adapter_dir)
        if getattr(args, "nora_cache_dir", None):
            merged["cache_dir"] = os.path.abspath(args.nora_cache_dir)
        if getattr(args, "nora_skip_base_check", False):
            merged["check_base"] = False
        if getattr(args, "nora_preload_store", False):
            if not merged.get("adapter_dir"):
                _refuse(2, "--nora-preload-store loads the adapter store: pass --nora-adapter-dir DIR")
            ours = "nora_serve.vllm_plugin.worker.NoraWorkerExtension"
            theirs = getattr(engine_args, "worker_extension_cls", "")
            if theirs and theirs != ours:
                _refuse(2, f"--nora-preload-store loads adapters through its own --worker-extension-cls; "
                        f"it cannot be used with --worker-extension-cls {theirs}")
            # The workers' bulk load (worker.NoraWorkerExtension.nora_preload_store), mixed into
            # vLLM's worker class by vLLM's own extension point.
            engine_args.worker_extension_cls = ours
            merged["preload_store"] = True
        if getattr(args, "nora_allow_runtime_loading", False):
            merged["allow_runtime_loading"] = True
            servers = getattr(args, "api_server_count", None)
            if servers is not None and servers > 1:
                # Each API server would know only the adapters loaded through it.
                _refuse(2, "--nora-allow-runtime-loading serves an adapter from the API server that "
                        f"loaded it only; it cannot be used with --api-server-count {servers} (name "
                        "adapters with --nora-adapter-dir or --lora-modules instead)")
        max_gb = getattr(args, "nora_cache_max_gb", None)
        if max_gb is not None:
            if not max_gb >= 0:  # also NaN
                raise ValueError(f"--nora-cache-max-gb must be >= 0, got {max_gb}")
            merged["cache_max_gb"] = float(max_gb)
        for flag, key in (("nora_dense_loras", "dense_loras"), ("nora_max_bases", "max_bases"),
                          ("nora_core_rank", "core_rank")):
            value = getattr(args, flag, None)
            if value is not None:
                if value < 0 or (value == 0 and key == "dense_loras"):
                    raise ValueError(f"--{flag.replace('_', '-')} must be "
                                     f"{'>= 1' if key == 'dense_loras' else '>= 0'}, got {value}")
                merged[key] = int(value)
        extra[KEY] = merged
        engine_args.additional_config = extra
    settings = NoraSettings.from_additional_config(engine_args.additional_config)
    if settings is None:
        return None
    settings = _writable_cache(settings, engine_args, getattr(args, "nora_cache_fallback", False))
    # Sizes given on the command line are kept even when they equal vLLM's defaults.
    explicit = {
        f for f, flag in (("max_loras", "--max-loras"), ("max_lora_rank", "--max-lora-rank"),
                          ("max_cpu_loras", "--max-cpu-loras"))
        if any(a == flag or a.startswith(flag + "=") for a in sys.argv)
    }
    apply_lora_defaults(engine_args, explicit)
    # vLLM hands ``args`` to the processes it starts (API servers of --api-server-count N),
    # which read it with EngineArgs.from_cli_args before they load any plugin: what nora
    # decided goes back into ``args``, so that they build the same engine config.
    for field in ("additional_config", "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"):
        if hasattr(args, field):
            setattr(args, field, getattr(engine_args, field))
    if settings.allow_runtime_loading:
        # Asked for explicitly: vLLM attaches its load/unload routes on this flag (read in this
        # API-server process only). The adapter store does not need it (see serving.py).
        os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    return settings


def _refuse(code: int, message: str):
    """A server start refused: one line on stderr, the exit status (2: usage, 1: runtime)."""
    print(f"nora-serve: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _writable_cache(settings: NoraSettings, engine_args, fallback: bool) -> NoraSettings:
    """The server converts into its cache directory: refuse to start without a writable one,
    or, asked to (``--nora-cache-fallback``), use a fresh temporary one."""
    import tempfile

    from nora_serve.serving.cache.faults import CacheUnavailable, check_writable

    try:
        check_writable(settings.cache_path)
        return settings
    except CacheUnavailable as e:
        if not fallback:
            _refuse(1, f"{e} (pass --nora-cache-fallback to use a temporary directory instead)")
        tmp = tempfile.mkdtemp(prefix="nora-cache-")
        print(f"nora-serve: warning: {e}; converting into {tmp} instead", file=sys.stderr, flush=True)
    extra = engine_args.additional_config
    extra[KEY] = {**(extra[KEY] if isinstance(extra.get(KEY), dict) else {"enabled": True}), "cache_dir": tmp}
    return NoraSettings.from_additional_config(extra)


def apply_lora_defaults(engine_args, explicit: set[str] | frozenset = frozenset()) -> None:
    """With nora on (CLI or ``LLM(additional_config={"nora": {...}})``): LoRA on, sensible sizes.
    ``explicit``: sizes given on the command line (kept even where they equal vLLM's default).
    Once LoRA is on, a second call changes nothing."""
    extra = engine_args.additional_config
    if isinstance(extra, dict) and extra.get(KEY) is True:
        extra[KEY] = {"enabled": True}
    if NoraSettings.from_additional_config(extra) is None:
        return
    from vllm.config.lora import LoRAConfig

    # Whoever switched LoRA on themselves chose its sizes; otherwise fill in what is left at
    # vLLM's defaults (and not given explicitly on the command line).
    keep = set(explicit)
    if engine_args.enable_lora:
        keep |= {"max_loras", "max_lora_rank", "max_cpu_loras"}
    engine_args.enable_lora = True
    if "max_loras" not in keep and engine_args.max_loras == LoRAConfig.max_loras:
        engine_args.max_loras = DEFAULT_MAX_LORAS
    if "max_lora_rank" not in keep and engine_args.max_lora_rank == LoRAConfig.max_lora_rank:
        engine_args.max_lora_rank = DEFAULT_MAX_LORA_RANK
    if "max_cpu_loras" not in keep and not engine_args.max_cpu_loras:
        engine_args.max_cpu_loras = max(DEFAULT_MAX_CPU_LORAS, engine_args.max_loras)
