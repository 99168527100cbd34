"""The plugin's logger, under vLLM's logger tree so that it shows in vLLM's logs."""

from vllm.logger import init_logger

logger = init_logger("vllm.nora")
