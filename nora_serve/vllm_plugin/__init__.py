"""vLLM plugin (entry point ``vllm.general_plugins``): the only package that imports vLLM.

``register()`` runs in every vLLM process. It installs wrappers (listed in ``hooks.py``) that
do nothing unless ``additional_config["nora"]`` turns the plugin on, which ``--enable-nora``
does on the command line and ``LLM(..., additional_config={"nora": {"enabled": True}})`` does
offline.
"""

from __future__ import annotations

import logging

from .settings import KEY, NoraSettings

__all__ = ["register", "KEY", "NoraSettings", "llm_kwargs"]

logger = logging.getLogger("nora_serve.vllm_plugin")


def register() -> None:
    try:
        from .hooks import install_general_hooks
    except ImportError:  # vLLM missing or too different: leave it alone
        logger.exception("nora: vLLM plugin not installed")
        return
    install_general_hooks()


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
