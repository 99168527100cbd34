"""The serving core's logger. Named under vLLM's logger tree so that, inside vLLM, it shows in
vLLM's logs with vLLM's format and level (the plugin's ``vllm_plugin/log.py`` is the same
logger); no vLLM import here."""

import logging

logger = logging.getLogger("vllm.nora")
