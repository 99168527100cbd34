"""vLLM plugin (entry point ``vllm.general_plugins``): the only package that imports vLLM.

``register()`` runs in every vLLM process. It installs wrappers (listed in ``hooks.py``) that
do nothing unless ``additional_config["nora"]`` turns the plugin on, which ``--enable-nora``
does on the command line and ``LLM(..., additional_config={"nora": {"enabled": True}})`` does
offline. Before installing anything it checks the vLLM version (``vllm_surface.SUPPORTED_VLLM``) and every
vLLM name the plugin wraps, overrides, writes or reads (``vllm_surface.TABLE``: that each
exists, and that vLLM still calls the overrides where the plugin expects); on any mismatch, or
any error, it logs one line and leaves vLLM exactly as it is: installing nora-serve never
breaks plain vLLM.
"""

from __future__ import annotations

import logging

from nora_serve.serving.settings import KEY, NoraSettings

__all__ = ["register", "KEY", "NoraSettings", "llm_kwargs"]

# Under vLLM's logger tree (without importing vLLM here), so that it shows in vLLM's logs.
logger = logging.getLogger("vllm.nora")

# Why the plugin stayed inert in this process (None: installed, or not asked yet).
inert_reason: str | None = None


def register() -> None:
    global inert_reason
    try:
        from . import hooks, vllm_surface

        problem = vllm_surface.refusal()
        if problem is None:
            hooks.install_general_hooks()
            return
    except Exception as e:  # noqa: BLE001 - whatever it is, vLLM must keep working
        problem = f"{type(e).__name__}: {e}"
    if inert_reason is None:
        logger.error("nora: plugin not installed, vLLM runs without it (--enable-nora unavailable): %s",
                     problem)
    inert_reason = problem


def llm_kwargs(*, adapter_dir: str | None = None, cache_dir: str | None = None,
               check_base: bool = True, dense_loras: int | None = None,
               max_bases: int | None = None, core_rank: int | None = None) -> dict:
    """Keyword arguments that enable nora for an offline ``vllm.LLM(...)`` (the sizes as the
    ``--nora-dense-loras`` / ``--nora-max-bases`` / ``--nora-core-rank`` flags)."""
    nora = {"enabled": True, "check_base": check_base}
    for key, value in (("dense_loras", dense_loras), ("max_bases", max_bases), ("core_rank", core_rank)):
        if value is not None:
            nora[key] = value
    if adapter_dir:
        nora["adapter_dir"] = adapter_dir
    if cache_dir:
        nora["cache_dir"] = cache_dir
    return {"additional_config": {KEY: nora}}
