"""vLLM plugin (entry point ``vllm.general_plugins``): the only package that imports vLLM."""


def register() -> None:
    """Called by vLLM in every process; does nothing until ``--enable-nora`` is implemented."""
    return None
