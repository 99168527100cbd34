"""The serving core: everything the plugin does that needs no vLLM.

The convert-on-load cache (``cache/``), the settings every process shares (``settings``),
adapter ids (``adapter_ids``), the served base (``served_base``), slot plan and storage
bookkeeping (``storage``, ``state``), the scheduler's per-step caps (``scheduling``) and the
metrics (``metrics``). ``vllm_plugin/`` translates vLLM's calls into these; nothing here imports
vLLM or ``vllm_plugin`` (``tests/test_plugin_structure.py`` checks it).
"""
