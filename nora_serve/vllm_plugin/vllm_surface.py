"""Every vLLM name the plugin wraps, replaces, subclasses, overrides, writes, reads or imports,
as one table (read this on a vLLM upgrade), and the check ``register()`` runs on it before it
installs anything.

Kinds: ``wrap`` (hooks.py replaces a vLLM function with one that calls it), ``replace`` (a vLLM
value swapped), ``subclass`` (a vLLM class the plugin derives from), ``override`` (a vLLM method
that a plugin subclass defines again: vLLM must still call it, ``used_by``), ``write`` (an
attribute the plugin sets on a vLLM object), ``read`` (a vLLM attribute or function the plugin
reads or calls, private ones included: a rename would fail only once serving), ``import`` (a
vLLM name imported for its own sake). ``instance``: an attribute vLLM sets in a method
(``self.name = ...``), checked in its class's source, not on the class. ``used_by``: the vLLM
function whose source must still name the row's last part (an override is called there, a
written attribute read there). ``moved``: where a vLLM version from then on keeps it;
``since``: the first version that has it. ``static``: what the source check finds instead, for
a name made at run time (``current_platform``'s methods) or kept outside vLLM (argparse's).

tests/test_vllm_surface.py compares the table with the plugin's code (every assignment on a
vLLM object, override, private read and vLLM import has a row; every row is used) and with
vLLM 0.33's source.

    python -m nora_serve.vllm_plugin.vllm_surface [SRC]   # check the installed vLLM, or the
                                                          # source tree SRC (it holds vllm/)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .vllm_source import SourceTree, version_of

# The vLLM (major, minor) versions the table is checked against; others leave the plugin inert.
SUPPORTED_VLLM = ((0, 32), (0, 33))
# Imported only where they are used (a CUDA platform): elsewhere their check is skipped.
GPU_ONLY_MODULES = frozenset({"vllm.lora.punica_wrapper.punica_gpu"})
KINDS = ("wrap", "replace", "subclass", "override", "write", "read", "import")


@dataclass(frozen=True)
class Name:
    module: str
    path: str  # attribute path from the module: "Cls", "Cls.method", "value"
    kind: str
    why: str
    instance: bool = False
    used_by: str = ""  # "Cls.method" (in ``module``) or "module:Cls.method"
    moved: tuple = ()  # ((major, minor), module, path): from that version on
    static: str = ""  # "module:path" the source check reads where ``path`` is made at run time
    since: tuple = ()  # (major, minor) of the first vLLM that has it (the plugin asks no older one)

    def at(self, version: tuple[int, int] | None) -> tuple[str, str]:
        """``(module, path)`` in vLLM ``version`` (``None``: the oldest supported)."""
        where = (self.module, self.path)
        for since, module, path in sorted(self.moved):
            if version is not None and version >= since:
                where = (module, path)
        return where

    def user(self, version: tuple[int, int] | None) -> tuple[str, str] | None:
        if not self.used_by:
            return None
        if ":" in self.used_by:
            module, path = self.used_by.split(":")
            return module, path
        return self.at(version)[0], self.used_by

    @property
    def attr(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def _rows(module: str, kind: str, *entries) -> list[Name]:
    return [Name(module, e[0], kind, *e[1:]) if isinstance(e, tuple) else e for e in entries]


_ARGS = "vllm.engine.arg_utils"
_PLAT = "vllm.platforms"
_BASE = "vllm.lora.layers.base_linear"
_MM = "vllm.lora.model_manager"
_LOGITS = "vllm.lora.layers.logits_processor"
_EMBED = "vllm.lora.layers.vocab_parallel_embedding"
_WM = "vllm.lora.worker_manager"
_PB = "vllm.lora.punica_wrapper.punica_base"
_PCPU = "vllm.lora.punica_wrapper.punica_cpu"
_PGPU = "vllm.lora.punica_wrapper.punica_gpu"
_SCHED = "vllm.v1.core.sched.scheduler"
_MODELS = "vllm.entrypoints.openai.models.serving"
_SERVING = "vllm.entrypoints.serve.engine.serving"
_LOGGERS = "vllm.v1.metrics.loggers"
_STARTUP = ((0, 33), "vllm.entrypoints.common.startup")

TABLE: tuple[Name, ...] = tuple(
    _rows("vllm", "read", ("__version__", "the supported range (SUPPORTED_VLLM)"))
    # -- every process ----------------------------------------------------------------------
    + _rows(_ARGS, "wrap",
            ("EngineArgs.add_cli_args", "adds the --nora-* flags to vLLM's parser"),
            ("EngineArgs.from_cli_args", "folds the flags into additional_config and back into args"),
            ("EngineArgs.create_engine_config", "LoRA defaults first; installs the API-server stage"))
    + _rows(_ARGS, "write",
            *[(f"EngineArgs.{f}", why) for f, why in (
                ("additional_config", "carries the nora settings to every process"),
                ("enable_lora", "nora on switches LoRA on"),
                ("max_loras", "nora's default slot count"), ("max_lora_rank", "nora's default rank"),
                ("max_cpu_loras", "nora's default CPU cache"),
                ("worker_extension_cls", "--nora-preload-store: vLLM mixes worker.NoraWorkerExtension "
                 "(the workers' bulk load, a collective_rpc method) into its worker class"))])
    + _rows("vllm.config.lora", "read",
            ("LoRAConfig", "vLLM's defaults, to tell the sizes a user left alone"),
            ("LoRAConfig.max_loras", "its default"), ("LoRAConfig.max_lora_rank", "its default"),
            ("LoRAConfig.lora_dtype", "dtype of the stored cores"),
            ("LoRAConfig.fully_sharded_loras", "fully sharded layers keep vLLM's compile choice"))
    + _rows("vllm.usage.usage_lib", "import",
            ("UsageContext", "only an OpenAI API server's config installs the API-server stage"))
    + _rows("vllm.usage.usage_lib", "read", ("UsageContext.OPENAI_API_SERVER", "as above"))
    + _rows(_PLAT, "read",
            ("current_platform", "its class is wrapped (get_punica_wrapper, check_and_update_config)"),
            ("current_platform.is_cuda_alike", "whether the GPU-only modules are checked",
             False, "", (), "vllm.platforms.interface:Platform.is_cuda_alike"))
    + _rows(_PLAT, "wrap",
            ("current_platform.get_punica_wrapper", "names the nora wrapper; installs the worker stage",
             False, "", (), "vllm.platforms.interface:Platform.get_punica_wrapper"),
            ("current_platform.check_and_update_config", "CPU: keeps torch.compile on with LoRA",
             False, "", (), "vllm.platforms.cpu:CpuPlatform.check_and_update_config"))
    + _rows("vllm.config", "read",
            ("get_current_vllm_config_or_none", "the config get_punica_wrapper is asked under"),
            ("VllmConfig.model_config", "the served model"),
            ("VllmConfig.additional_config", "the nora settings (settings_of)"))
    + _rows("vllm.config", "write",
            ("VllmConfig.lora_config", "None during CpuPlatform's config pass, put back after"))
    + _rows("vllm.config", "wrap",
            ("VllmConfig.compute_hash", "the compile-cache key leaves out the nora settings that "
             "never change the graph (NoraSettings.NOT_IN_GRAPH)"))
    + _rows("vllm.logger", "read",
            ("init_logger", "the plugin's logger, vllm.nora"),
            ("configure_logging_from_args", "nora-serve sets logging up as vllm serve does"))
    # -- engine core --------------------------------------------------------------------------
    + _rows(_SCHED, "wrap",
            ("Scheduler.__init__", "makes the per-step caps of this scheduler"),
            ("Scheduler.schedule", "starts a step's caps"),
            ("Scheduler._handle_blocked_waiting_request", "admits a request within the caps"))
    + _rows(_SCHED, "read",
            ("Scheduler.running", "the requests a step starts with", True),
            ("Scheduler.lora_config", "max_loras of the caps", True),
            ("Scheduler.vllm_config", "the nora settings", True))
    + _rows(_SCHED, "write",
            ("Scheduler.grammar_compile_error_reqs", "a request whose adapter cannot be read ends "
             "with an error (added to vLLM's own set; 0.33: a dict of RequestError)", True,
             "Scheduler.update_from_output"))
    + _rows("vllm.outputs", "import",
            ("RequestError", "0.33: the error such a request ends with", False, "", (), "", (0, 33)))
    + _rows("vllm.v1.metrics.stats", "read",
            ("SchedulerStats.running_lora_adapters", "nora's per-adapter counts"),
            ("SchedulerStats.waiting_lora_adapters", "as above"))
    # -- worker -------------------------------------------------------------------------------
    + _rows(_PCPU, "subclass", ("PunicaWrapperCPU", "NoraPunicaWrapperCPU: mixed batches, ranks, shared basis"))
    + _rows("vllm._custom_ops", "import",
            ("_supports_onednn", "CPU: whether this build has oneDNN's GEMM on reordered weights, "
             "for the adapters' shrinks (punica_cpu.onednn_prepack)"),
            ("create_onednn_mm", "reorders a slot's or a basis's A; the kernels then call its op "
             "torch.ops._C.onednn_mm(out, x, None, handler_tensor), as vLLM's CPU linear layers do"))
    + _rows(_PGPU, "subclass", ("PunicaWrapperGPU", "NoraPunicaWrapperGPU: rank-aware kernels, shared basis"))
    + _rows(_PB, "override",
            ("PunicaWrapperBase.update_metadata", "each step's routes, built once",
             False, "vllm.lora.model_manager:LoRAModelManager._set_adapter_mapping"))
    + _rows(_PCPU, "override",
            ("PunicaWrapperCPU.__init__", "the wrapper gets the worker's state (built by "
             "get_punica_wrapper with vLLM's arguments)"),
            ("PunicaWrapperCPU.add_lora_linear", "per-slot rows, true ranks", False,
             "vllm.lora.layers.base_linear:BaseLinearLayerWithLoRA._apply_lora_to_output"),
            ("PunicaWrapperCPU.add_shrink", "fully sharded layers: correct no-adapter rows"),
            ("PunicaWrapperCPU.add_expand", "as above"),
            ("PunicaWrapperCPU.add_lora_embedding", "skipped unless a slot has embedding weights",
             False, "vllm.lora.layers.vocab_parallel_embedding:VocabParallelEmbeddingWithLoRA.forward"),
            ("PunicaWrapperCPU.add_lora_logits", "prompt-logprob rows mapped to their slots",
             False, "vllm.lora.layers.logits_processor:LogitsProcessorWithLoRA._get_logits"))
    + _rows(_PGPU, "override",
            ("PunicaWrapperGPU.__init__", "the wrapper gets the worker's state; persistent buffers"),
            ("PunicaWrapperGPU.add_shrink", "rank-aware segment GEMMs"),
            ("PunicaWrapperGPU.add_expand", "as above"),
            ("PunicaWrapperGPU.add_lora_linear", "as above"))
    + _rows(_PB, "read",
            ("PunicaWrapperBase._update_base_metadata", "the index tables only (no prefill tables)"),
            ("PunicaWrapperBase._token_lora_indices", "the per-token slot table", True),
            ("PunicaWrapperBase.token_lora_indices", "as above"),
            ("PunicaWrapperBase.sampler_indices", "the per-request slot table (logits)"),
            ("PunicaWrapperBase.indices_len", "rows of this step's mapping", True))
    + _rows(_PB, "write",
            ("PunicaWrapperBase.is_prefill", "False: the prefill tables are not built", True))
    + _rows(_PGPU, "read", ("PunicaWrapperGPU.max_loras", "slots of the rank table", True))
    + _rows("vllm.lora.punica_wrapper", "read",
            ("get_punica_wrapper", "builds what get_punica_wrapper() names, with the wrapper's arguments"))
    + _rows(_WM, "wrap",
            ("WorkerLoRAManager._load_adapter", "converts on load; shared-basis adapters as cores"),
            ("WorkerLoRAManager.add_dummy_lora", "warm-up adapters hold no storage"),
            ("LRUCacheWorkerLoRAManager._apply_adapters", "a step's resident adapters without "
             "vLLM's O(resident) lookup; stale slot metadata rebuilt"))
    + _rows(_WM, "write",
            ("WorkerLoRAManager.list_adapters", "shadowed per instance by the registered table's keys "
             "during add_dummy_lora (vLLM builds a set of every adapter per dummy)", False,
             "WorkerLoRAManager.add_dummy_lora"))
    + _rows(_WM, "read",
            ("WorkerLoRAManager._adapter_manager", "the LoRAModelManager", True),
            ("WorkerLoRAManager.lora_config", "max rank, dtype", True))
    + _rows(_MM, "wrap",
            ("LoRAModelManager._create_lora_modules", "module names per shared-basis layer"),
            ("LoRAModelManager.activate_adapter", "places the slot's storage before vLLM's set_lora"))
    + _rows(_MM, "read",
            ("LoRAModelManager._registered_adapters", "resident adapters", True),
            ("LoRAModelManager._active_adapters", "adapters in a slot", True),
            ("LoRAModelManager.lora_index_to_id", "slot -> adapter id; the first free one is vLLM's "
             "choice in activate_adapter", True, "LoRAModelManager.activate_adapter"),
            ("LoRAModelManager.modules", "the LoRA layers", True),
            ("LoRAModelManager.packed_modules", "module names of a packed layer", True),
            ("LoRAModelManager.deactivate_adapter", "frees a slot the plan needs"),
            ("LoRAModelManager.lora_slots", "slots of a step"),
            ("LRUCacheLoRAModelManager.get_adapter", "touches a resident adapter (LRU)"),
            ("LoRAModelManager.capacity", "--max-cpu-loras: where --nora-preload-store stops"),
            ("LRUCacheLoRAModelManager.add_adapter", "--nora-preload-store adds each adapter as "
             "vLLM's add_adapter does (no per-adapter engine call)"),
            ("LoRAModelManager.remove_adapter", "--nora-preload-store: an adapter that failed half "
             "way in is removed, never left in a slot without its cores"))
    + _rows(_MM, "write",
            ("LoRAModelManager._last_slot_layout", "None: vLLM rebuilds the step metadata after a "
             "slot was placed", True, "LRUCacheLoRAModelManager.set_adapter_mapping"))
    + _rows("vllm.lora.utils", "replace",
            ("_all_lora_classes", "our layer classes first (from_layer takes the first that fits)",
             False, "from_layer"))
    + _rows("vllm.lora.utils", "read",
            ("get_adapter_absolute_path", "an adapter path as vLLM resolves it"))
    + _rows("vllm.lora.layers", "subclass",
            *[(c, "shared-basis storage (layers.py)") for c in (
                "ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
                "QKVParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA", "RowParallelLinearWithLoRA")])
    + _rows("vllm.lora.layers", "subclass",
            ("LogitsProcessorWithLoRA", "lm_head LoRA stacks of the K dense slots only (layers.py)"),
            ("VocabParallelEmbeddingWithLoRA", "embedding LoRA stacks of the K dense slots only"))
    + _rows(_MM, "wrap",
            ("from_layer_logits_processor", "the logits layer built for the K dense slots, as "
             "layers.DenseSlotsLogits (vLLM builds it without _all_lora_classes)", False,
             "LoRAModelManager._create_lora_modules"))
    + _rows(_LOGITS, "override",
            ("LogitsProcessorWithLoRA.set_lora", "at the slot's dense index",
             False, "vllm.lora.model_manager:LoRAModelManager.activate_adapter"),
            ("LogitsProcessorWithLoRA.reset_lora", "the slot's dense index; its own set_lora calls it",
             False, "LogitsProcessorWithLoRA.set_lora"))
    + _rows(_EMBED, "override",
            ("VocabParallelEmbeddingWithLoRA.create_lora_weights", "K dense slots, not --max-loras",
             False, "vllm.lora.utils:from_layer"),
            ("VocabParallelEmbeddingWithLoRA.set_lora", "at the slot's dense index",
             False, "vllm.lora.model_manager:LoRAModelManager.activate_adapter"),
            ("VocabParallelEmbeddingWithLoRA.reset_lora", "the slot's dense index; its own set_lora "
             "calls it", False, "VocabParallelEmbeddingWithLoRA.set_lora"),
            ("VocabParallelEmbeddingWithLoRA.forward", "A rows looked up at the dense index (the "
             "stock forward adds slot * vocab)"))
    + _rows(_EMBED, "read",
            *[(f"VocabParallelEmbeddingWithLoRA.{a}", why, True) for a, why in (
                ("lora_a_stacked", "[K, vocab, rank]"), ("lora_b_stacked", "[K, 1, d, rank]"),
                ("base_layer", "the embedding itself, and its device"))])
    + _rows(_BASE, "import", ("BaseLinearLayerWithLoRA", "its reset_lora, called past the mixin"))
    + _rows(_BASE, "override",
            ("BaseLinearLayerWithLoRA._apply_lora_to_output", "the shared-basis forward (without it "
             "shared-basis adapters add nothing)", False, "BaseLinearLayerWithLoRA._apply_sync"),
            ("BaseLinearLayerWithLoRA._init_lora_stream_context", "no dual stream: it would call the "
             "stock op on the dense stack", False, "BaseLinearLayerWithLoRA.__init__"),
            ("BaseLinearLayerWithLoRA.create_lora_weights", "dense stack of K slots plus bases and "
             "cores", False, "vllm.lora.utils:from_layer"),
            ("BaseLinearLayerWithLoRA.set_lora", "a slot's dense LoRA or cores",
             False, "vllm.lora.model_manager:LoRAModelManager.activate_adapter"),
            ("BaseLinearLayerWithLoRA.reset_lora", "clears a slot's cores or dense index",
             False, "vllm.lora.model_manager:LoRAModelManager.activate_adapter"))
    + _rows(_BASE, "write",
            ("BaseLinearLayerWithLoRA._enable_aux_cuda_stream", "False (see _init_lora_stream_context)",
             True, "BaseLinearLayerWithLoRA.apply"))
    + _rows(_BASE, "read",
            *[(f"BaseLinearLayerWithLoRA.{a}", why, True) for a, why in (
                ("lora_a_stacked", "[max_loras, 1, rank, d_in] per slice"),
                ("lora_b_stacked", "[max_loras, 1, d_out, rank] per slice"),
                ("output_slices", "widths of the slices"), ("n_slices", "slices of a packed layer"),
                ("tp_size", "TP slicing of a basis"), ("tp_rank", "the bias is on rank 0 only"),
                ("base_layer", "its bias"), ("device", "where the storage lives"))],
            ("BaseLayerWithLoRA.slice_lora_a", "a basis cut as a LoRA A"),
            ("BaseLayerWithLoRA.slice_lora_b", "a basis or output scale cut as a LoRA B"))
    + _rows("vllm.lora.layers.base", "read",
            ("BaseLayerWithLoRA.punica_wrapper", "the layer's wrapper (set_mapping)", True))
    + _rows("vllm.lora.lora_model", "import", ("LoRAModel", "a shared-basis adapter: LoRAModel(id, rank, loras)"))
    + _rows("vllm.lora.lora_weights", "import",
            ("LoRALayerWeights", "its cores: LoRALayerWeights(name, rank, alpha, a, b, scaling)"))
    + _rows("vllm.lora.request", "import",
            ("LoRARequest", "a store adapter's request (a msgspec struct, copied with a new path)"))
    + _rows("vllm.exceptions", "import", ("LoRAAdapterNotFoundError", "a missing adapter, as vLLM says it"))
    + _rows("vllm.v1.worker.gpu_model_runner", "wrap",
            ("GPUModelRunner._get_prompt_logprobs_dict", "prompt hidden states, to map logits rows"))
    # -- API server -----------------------------------------------------------------------------
    + _rows(_MODELS, "wrap",
            ("OpenAIServingModels.load_lora_adapter", "converts and checks before vLLM sees it"),
            ("OpenAIServingModels.show_available_models", "no server path in /v1/models"),
            ("OpenAIServingModels.init_static_loras", "then --nora-preload-store loads the store, "
             "before the server answers"))
    + _rows(_MODELS, "read",
            ("OpenAIServingModels.resolve_lora", "asks the resolvers (the store among them)"),
            ("OpenAIServingModels.lora_requests", "adapters the server knows", True))
    + _rows(_MODELS, "write",
            ("OpenAIServingModels.lora_id_counter", "replaced by serving.IdCounter: ids from content",
             True, "OpenAIServingModels.load_lora_adapter"))
    + _rows(_SERVING, "wrap",
            ("BaseServing._check_model", "resolves unknown names through the store also with runtime "
             "loading off; a faulty store adapter is a 400 naming the fault"))
    + _rows(_SERVING, "read",
            ("BaseServing._is_model_supported", "the base model's own names"),
            ("BaseServing.models", "its OpenAIServingModels", True))
    + _rows("vllm.entrypoints.serve.engine.protocol", "import",
            ("ErrorResponse", "tells vLLM's error answers apart"))
    + _rows("vllm.entrypoints.serve.engine.protocol", "write",
            ("ModelCard.root", "an adapter's name, not a server path"))
    + _rows("vllm.entrypoints.serve", "read", ("create_error_response", "nora's 4xx answers"))
    + _rows("vllm.lora.resolver", "subclass", ("LoRAResolver", "the adapter store"))
    + _rows("vllm.lora.resolver", "override",
            ("LoRAResolver.resolve_lora", "a store name -> its cache entry", False,
             "vllm.entrypoints.openai.models.serving:OpenAIServingModels.resolve_lora"))
    + _rows("vllm.lora.resolver", "read",
            ("LoRAResolverRegistry.register_resolver", "registers the store (read when "
             "OpenAIServingModels is made)"),
            ("LoRAResolverRegistry.resolvers", "registered once per store", True))
    + _rows("vllm.v1.engine.async_llm", "wrap",
            ("AsyncLLM.generate", "requests in flight per adapter (an idle store adapter may be evicted)"))
    + _rows(_LOGGERS, "wrap",
            ("PrometheusStatLogger.__init__", "vllm:lora_requests_info off with nora"),
            ("PrometheusStatLogger.record", "nora's per-adapter counts"))
    + _rows(_LOGGERS, "write",
            ("PrometheusStatLogger.gauge_lora_info", "None: vLLM records it only when set",
             True, "PrometheusStatLogger.record"))
    + _rows("vllm.envs", "read",
            ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "set by --nora-allow-runtime-loading only: opens "
             "vLLM's load/unload routes"))
    # -- nora-serve (cli/serve.py) --------------------------------------------------------------
    + _rows("vllm.entrypoints.cli.serve", "import", ("ServeSubcommand", "nora-serve runs vllm serve"))
    + _rows("vllm.entrypoints.cli.serve", "read",
            ("ServeSubcommand.subparser_init", "its parser"), ("ServeSubcommand.validate", "its checks"),
            ("ServeSubcommand.cmd", "its server"))
    + _rows("vllm.entrypoints.serve.utils.api_utils", "read",
            ("cli_env_setup", "what vllm's main does first", False, "", (_STARTUP + ("cli_env_setup",),)),
            ("VLLM_SUBCMD_PARSER_EPILOG", "the serve parser's epilog", False, "",
             (_STARTUP + ("VLLM_SUBCMD_PARSER_EPILOG",),)))
    + _rows("vllm.utils.argparse_utils", "import", ("FlexibleArgumentParser", "vllm serve's parser"))
    + _rows("vllm.utils.argparse_utils", "read",
            ("FlexibleArgumentParser._actions", "argparse's: whether the nora flags are there already "
             "(add_cli_args may be called twice on one parser)", True, "", (),
             "vllm.utils.argparse_utils:FlexibleArgumentParser"))
)


# -- the check -------------------------------------------------------------------------------
def _walk(module: str, path: str):
    import importlib

    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@lru_cache(maxsize=None)
def _source(obj) -> str:
    import inspect

    return inspect.getsource(obj)


def _declares(obj, attr: str) -> bool:
    """``obj`` has ``attr``, or is a class that declares it as a field (a dataclass, pydantic
    or msgspec field without a class-level default)."""
    return hasattr(obj, attr) or any(attr in getattr(c, "__annotations__", {})
                                     for c in getattr(obj, "__mro__", ()))


def _sets(cls, attr: str) -> bool:
    """Whether a class (or a base of it with Python source) sets ``self.attr`` in its code."""
    pattern = re.compile(rf"\bself\.{re.escape(attr)}\s*(:|=(?!=))")
    for c in getattr(cls, "__mro__", ()):
        try:
            if c is not object and pattern.search(_source(c)):
                return True
        except (OSError, TypeError):  # no source (a builtin)
            pass
    return False


def _check_installed(row: Name, version, gpu: bool) -> str | None:
    if row.since and version is not None and version < row.since:
        return None
    module, path = row.at(version)
    if module in GPU_ONLY_MODULES and not gpu:
        return None
    where = f"{module}:{path} ({row.kind})"
    try:
        owner, _, attr = path.rpartition(".")
        if row.instance:
            cls = _walk(module, owner)
            if not hasattr(cls, attr) and not _sets(cls, attr):
                return f"{where}: {owner} no longer sets {attr}"
        elif owner and not _declares(_walk(module, owner), attr):
            _walk(module, path)  # raises AttributeError
        user = row.user(version)
        if user is not None:
            fn = _walk(*user)
            if not re.search(rf"\b{re.escape(row.attr)}\b", _source(fn)):
                return f"{where}: {user[0]}:{user[1]} no longer names {row.attr}"
    except Exception as e:  # ImportError, AttributeError, OSError (no source), a failing import
        return f"{where}: {type(e).__name__}: {e}"
    return None


def _check_source(row: Name, tree, version) -> str | None:
    if row.since and version is not None and version < row.since:
        return None
    module, path = row.at(version)
    where = f"{module}:{path} ({row.kind})"
    if row.static:
        module, path = row.static.split(":")
    hit = tree.resolve(module, path, instance=row.instance)
    if isinstance(hit, str):
        return f"{where}: {hit}"
    user = row.user(version)
    if user is not None:
        named = tree.names(*user, row.attr)
        if named is not True:
            return f"{where}: {user[0]}:{user[1]} " + (named or f"no longer names {row.attr}")
    return None


def check(source=None, version: tuple[int, int] | None = None, *, gpu: bool | None = None) -> list[str]:
    """One line per row of :data:`TABLE` that vLLM no longer has where the plugin expects it
    (an empty list: all there). ``source``: a :class:`~.vllm_source.SourceTree` (or the
    directory holding ``vllm/``) read as vLLM ``version`` (default: the version it declares);
    without it, the installed vLLM, imported (the GPU-only modules only where ``gpu``, by
    default where the platform is CUDA-like)."""
    if source is not None:
        tree = source if isinstance(source, SourceTree) else SourceTree(source)
        version = version or tree.version()
        return [p for row in TABLE if (p := _check_source(row, tree, version))]
    import vllm

    version = version or version_of(vllm.__version__)
    if gpu is None:
        try:
            from vllm.platforms import current_platform

            gpu = bool(current_platform.is_cuda_alike())
        except Exception:  # noqa: BLE001 - no platform: the GPU-only modules are not used
            gpu = False
    return [p for row in TABLE if (p := _check_installed(row, version, gpu))]


def refusal() -> str | None:
    """Why the plugin cannot install into the installed vLLM (one line), ``None`` when it can:
    a version outside :data:`SUPPORTED_VLLM`, or a problem of :func:`check`."""
    try:
        import vllm
    except Exception as e:  # noqa: BLE001
        return f"vLLM cannot be imported ({type(e).__name__}: {e})"
    text = str(getattr(vllm, "__version__", "")) or "(unknown version)"
    if version_of(text) not in SUPPORTED_VLLM:
        want = " or ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        return f"vLLM {text} is not supported (nora-serve needs vLLM {want})"
    problems = check()
    if problems:
        return (f"vLLM {text} lacks or changed {len(problems)} name(s) the plugin relies on "
                f"(vllm_surface.TABLE): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
    return None


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    problems = check(argv[0]) if argv else check()
    for p in problems:
        print(p)
    print(f"{len(TABLE)} names, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
