"""Every vLLM symbol the plugin wraps, replaces or relies on, in one place (read this on a
vLLM upgrade).

Wrapped or replaced:

| vLLM symbol                                                              | how      | process    |
|--------------------------------------------------------------------------|----------|------------|
| vllm.engine.arg_utils.EngineArgs.add_cli_args                            | wrapped  | front end  |
| vllm.engine.arg_utils.EngineArgs.from_cli_args                           | wrapped  | front end  |
| vllm.engine.arg_utils.EngineArgs.create_engine_config                    | wrapped  | front end  |
| type(vllm.platforms.current_platform).get_punica_wrapper                 | wrapped  | all        |
| type(vllm.platforms.current_platform).check_and_update_config (CPU)      | wrapped  | all        |
| vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU                     | subclass | worker     |
| vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU                     | subclass | worker     |
| vllm.lora.worker_manager.WorkerLoRAManager._load_adapter                 | wrapped  | worker     |
| vllm.lora.worker_manager.WorkerLoRAManager.add_dummy_lora                | wrapped  | worker     |
| vllm.lora.worker_manager.LRUCacheWorkerLoRAManager._apply_adapters       | wrapped  | worker     |
| vllm.lora.model_manager.LoRAModelManager._create_lora_modules            | wrapped  | worker     |
| vllm.lora.model_manager.LoRAModelManager.activate_adapter                | wrapped  | worker     |
| vllm.lora.utils._all_lora_classes (our layer classes put first)          | replaced | worker     |
| vllm.lora.layers: ColumnParallel / MergedColumnParallel / QKVParallel /  | subclass | worker     |
|   MergedQKVParallel / RowParallel LinearWithLoRA                         |          |            |
| vllm.v1.core.sched.scheduler.Scheduler.__init__, .schedule,              | wrapped  | engine core|
|   ._handle_blocked_waiting_request                                       |          |            |
| vllm.v1.worker.gpu_model_runner.GPUModelRunner._get_prompt_logprobs_dict | wrapped  | worker     |
| vllm.entrypoints.openai.models.serving.OpenAIServingModels.__init__,     | wrapped  | API server |
|   .load_lora_adapter, .resolve_lora, .show_available_models              |          |            |
| vllm.entrypoints.serve.engine.serving.BaseServing._check_model           | wrapped  | API server |
| vllm.lora.resolver.LoRAResolver                                          | subclass | API server |

Relied on (signatures and behaviour): PunicaWrapperBase's token_lora_indices / sampler_indices /
update_metadata, and the stacked weight layout [max_loras, 1, rank, d_in] / [.., d_out, rank];
the LoRA layers' create_lora_weights / set_lora / reset_lora / slice_lora_a / slice_lora_b /
_apply_lora_to_output / _init_lora_stream_context / output_slices / n_slices / tp_size;
LoRAModelManager's modules, packed_modules, lora_index_to_id, _active_adapters,
_registered_adapters, deactivate_adapter and its first-free-slot choice in activate_adapter;
LoRAModel(id, rank, loras) and LoRALayerWeights(name, rank, alpha, a, b, scaling); the scheduler's
running list, lora_config and vllm_config;
OpenAIServingModels' lora_requests, lora_resolvers, lora_resolver_lock, lora_id_counter,
engine_client.vllm_config / add_lora; vllm.config.get_current_vllm_config_or_none;
vllm.config.lora.LoRAConfig defaults; vllm.lora.request.LoRARequest (msgspec struct);
vllm.lora.utils.get_adapter_absolute_path; vllm.exceptions.LoRAAdapterNotFoundError;
vllm.entrypoints.serve.create_error_response and serve.engine.protocol.ErrorResponse;
vllm.entrypoints.launchers.api_server.entry.main (nora-serve); vllm.logger.init_logger;
BaseServing._is_model_supported and .models; and the env flag VLLM_ALLOW_RUNTIME_LORA_UPDATING,
which opens vLLM's load/unload routes (set only by --nora-allow-runtime-loading).

The same list as data: ``PATCHED`` below; ``register()`` checks it (and the vLLM version)
before installing anything.

Every wrapper is inert unless ``additional_config["nora"]`` enables the plugin, so vLLM behaves
exactly as before without ``--enable-nora``. Wrappers are installed at most once per process.
"""

from __future__ import annotations

import functools

# The table above as data: (module, attribute path) of every symbol wrapped, replaced or
# subclassed. register() installs nothing unless the vLLM version is supported and every one
# of these exists (check_vllm); tests/test_reliability.py checks them against the installed vLLM.
SUPPORTED_VLLM = (0, 32)  # major, minor
PATCHED: tuple[tuple[str, str], ...] = (
    ("vllm.engine.arg_utils", "EngineArgs.add_cli_args"),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args"),
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config"),
    ("vllm.platforms", "current_platform.get_punica_wrapper"),
    ("vllm.platforms", "current_platform.check_and_update_config"),
    ("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU"),
    ("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU"),
    ("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter"),
    ("vllm.lora.worker_manager", "WorkerLoRAManager.add_dummy_lora"),
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager._apply_adapters"),
    ("vllm.lora.model_manager", "LoRAModelManager._create_lora_modules"),
    ("vllm.lora.model_manager", "LoRAModelManager.activate_adapter"),
    ("vllm.lora.utils", "_all_lora_classes"),
    ("vllm.lora.layers", "ColumnParallelLinearWithLoRA"),
    ("vllm.lora.layers", "MergedColumnParallelLinearWithLoRA"),
    ("vllm.lora.layers", "QKVParallelLinearWithLoRA"),
    ("vllm.lora.layers", "MergedQKVParallelLinearWithLoRA"),
    ("vllm.lora.layers", "RowParallelLinearWithLoRA"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.__init__"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler._handle_blocked_waiting_request"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._get_prompt_logprobs_dict"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.__init__"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.resolve_lora"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.show_available_models"),
    ("vllm.entrypoints.serve.engine.serving", "BaseServing._check_model"),
    ("vllm.lora.resolver", "LoRAResolver"),
)
# Imported only where they are used (a CUDA platform): elsewhere their check is skipped.
GPU_ONLY_MODULES = frozenset({"vllm.lora.punica_wrapper.punica_gpu"})


def missing_symbols(*, gpu: bool | None = None) -> list[str]:
    """``module:attribute`` of every entry of :data:`PATCHED` that the installed vLLM lacks.
    ``gpu``: also import the GPU-only modules (default: where the platform is CUDA-like)."""
    import importlib

    if gpu is None:
        try:
            from vllm.platforms import current_platform

            gpu = bool(current_platform.is_cuda_alike())
        except Exception:
            gpu = False
    missing = []
    for module, path in PATCHED:
        if module in GPU_ONLY_MODULES and not gpu:
            continue
        try:
            obj = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except Exception as e:  # ImportError, AttributeError, or the module failing to import
            missing.append(f"{module}:{path} ({type(e).__name__})")
    return missing


def check_vllm() -> str | None:
    """Why the plugin cannot install into this vLLM, or ``None`` when it can."""
    try:
        import vllm
    except Exception as e:
        return f"vLLM cannot be imported ({type(e).__name__}: {e})"
    version = str(getattr(vllm, "__version__", ""))
    parts = version.split(".")
    try:
        got = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x"))
    except (IndexError, ValueError):
        got = None
    if got != SUPPORTED_VLLM:
        want = ".".join(map(str, SUPPORTED_VLLM))
        return f"vLLM {version or '(unknown version)'} is not supported (nora-serve needs vLLM {want}.x)"
    missing = missing_symbols()
    if missing:
        return (f"vLLM {version} lacks {len(missing)} symbol(s) the plugin patches: "
                + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    return None


_installed: set[str] = set()


def _once(name: str) -> bool:
    if name in _installed:
        return False
    _installed.add(name)
    return True


def install_general_hooks() -> None:
    """Called from ``register()`` in every vLLM process."""
    if _once("engine_args"):
        from vllm.engine.arg_utils import EngineArgs

        from . import engine_args as ea

        orig_add = EngineArgs.add_cli_args
        orig_from = EngineArgs.from_cli_args.__func__
        orig_create = EngineArgs.create_engine_config

        @functools.wraps(orig_add)
        def add_cli_args(parser):
            parser = orig_add(parser)
            ea.add_nora_cli_args(parser)
            return parser

        @functools.wraps(orig_from)
        def from_cli_args(cls, args):
            engine_args = orig_from(cls, args)
            ea.apply_nora_cli_args(engine_args, args)
            return engine_args

        @functools.wraps(orig_create)
        def create_engine_config(self, *a, **kw):
            ea.apply_lora_defaults(self)
            return orig_create(self, *a, **kw)

        EngineArgs.add_cli_args = staticmethod(add_cli_args)
        EngineArgs.from_cli_args = classmethod(from_cli_args)
        EngineArgs.create_engine_config = create_engine_config

    if _once("platform"):
        from vllm.platforms import current_platform

        platform_cls = type(current_platform)
        orig_get = platform_cls.get_punica_wrapper.__func__

        @functools.wraps(orig_get)
        def get_punica_wrapper(cls) -> str:
            stock = orig_get(cls)
            from vllm.config import get_current_vllm_config_or_none

            from .settings import settings_of

            if settings_of(get_current_vllm_config_or_none()) is None:
                return stock
            if stock.endswith(".PunicaWrapperCPU"):
                return "nora_serve.vllm_plugin.punica_cpu.NoraPunicaWrapperCPU"
            if stock.endswith(".PunicaWrapperGPU"):
                return "nora_serve.vllm_plugin.punica_gpu.NoraPunicaWrapperGPU"
            return stock

        platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)

    install_scheduler_hooks()
    install_compile_hook()


def install_compile_hook() -> None:
    """Keep torch.compile on when nora serves adapters on the CPU.

    vLLM's CPU platform turns compilation off whenever LoRA is configured (its LoRA ops branch on
    tensor values). The nora CPU wrapper's entry points are one opaque custom op under tracing
    (``opaque.py``), so the compiled graph never sees the per-step routing: the platform's
    config pass runs as if LoRA were off, and LoRA is put back after it. An explicit
    ``--enforce-eager`` / compilation mode 0 stays as the user set it; fully sharded LoRA
    layers (which call the wrapper's shrink/expand with their own buffers) keep vLLM's choice."""
    if not _once("compile"):
        return
    from vllm.platforms import current_platform

    from .settings import settings_of

    platform_cls = type(current_platform)
    if platform_cls.__name__ != "CpuPlatform":
        return
    orig = platform_cls.check_and_update_config.__func__

    @functools.wraps(orig)
    def check_and_update_config(cls, vllm_config) -> None:
        lora = vllm_config.lora_config
        st = settings_of(vllm_config)
        if lora is None or st is None or not st.compile or lora.fully_sharded_loras:
            return orig(cls, vllm_config)
        vllm_config.lora_config = None
        try:
            orig(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def install_scheduler_hooks() -> None:
    """Engine core: keep each step within the dense-slot and basis caps (``scheduling.py``)."""
    if not _once("scheduler"):
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    from .scheduling import StepLimits
    from .settings import settings_of

    orig_init = Scheduler.__init__
    orig_schedule = Scheduler.schedule
    orig_blocked = Scheduler._handle_blocked_waiting_request

    @functools.wraps(orig_init)
    def __init__(self, *a, **kw):
        orig_init(self, *a, **kw)
        st = settings_of(self.vllm_config)
        self._nora_limits = (StepLimits(st, self.lora_config.max_loras, self.lora_config,
                                        getattr(self.vllm_config.model_config, "model", None))
                             if st is not None and self.lora_config is not None else None)

    @functools.wraps(orig_schedule)
    def schedule(self, *a, **kw):
        limits = getattr(self, "_nora_limits", None)
        if limits is not None:
            limits.start_step(self.running)
        return orig_schedule(self, *a, **kw)

    @functools.wraps(orig_blocked)
    def _handle_blocked_waiting_request(self, request):
        ready = orig_blocked(self, request)
        limits = getattr(self, "_nora_limits", None)
        if ready and limits is not None and request.lora_request and request.lora_request.lora_int_id > 0:
            return limits.admit(request.lora_request)
        return ready

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler._handle_blocked_waiting_request = _handle_blocked_waiting_request


def install_worker_hooks() -> None:
    """Called when a nora punica wrapper is built, i.e. in a worker with nora enabled."""
    if _once("worker"):
        from vllm.config import get_current_vllm_config_or_none
        from vllm.lora.worker_manager import WorkerLoRAManager
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        from . import worker

        worker.remember_config(get_current_vllm_config_or_none())

        orig_load = WorkerLoRAManager._load_adapter

        @functools.wraps(orig_load)
        def _load_adapter(self, lora_request):
            return worker.load_adapter(self, orig_load, lora_request)

        WorkerLoRAManager._load_adapter = _load_adapter

        if worker._settings is not None and worker._settings.shared_basis:
            _install_shared_basis_hooks()

        from .punica_cpu import prompt_logprobs_rows

        orig_prompt = GPUModelRunner._get_prompt_logprobs_dict

        @functools.wraps(orig_prompt)
        def _get_prompt_logprobs_dict(self, hidden_states, *a, **kw):
            with prompt_logprobs_rows(hidden_states):
                return orig_prompt(self, hidden_states, *a, **kw)

        GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict


def _install_shared_basis_hooks() -> None:
    """Shared-basis storage: our layer classes first in line, slots placed on activation."""
    import vllm.lora.utils as lora_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    from . import storage, worker
    from .layers import LAYER_CLASSES, SharedBasisLayerMixin

    # from_layer() takes the first class whose can_replace_layer() accepts the layer.
    lora_utils._all_lora_classes = LAYER_CLASSES + tuple(lora_utils._all_lora_classes)

    orig_create = LoRAModelManager._create_lora_modules
    orig_activate = LoRAModelManager.activate_adapter
    orig_apply = LRUCacheWorkerLoRAManager._apply_adapters
    orig_dummy = WorkerLoRAManager.add_dummy_lora

    @functools.wraps(orig_create)
    def _create_lora_modules(self):
        orig_create(self)
        total: dict[str, int] = {}
        for name, module in self.modules.items():
            if isinstance(module, SharedBasisLayerMixin):
                module.nora_sub_modules = self.packed_modules.get(name) or [name]
                for k, v in module.nora_storage_bytes().items():
                    total[k] = total.get(k, 0) + v
        if total:
            from .log import logger

            logger.info("nora: adapter storage (MiB): %s", ", ".join(
                f"{k} {v / 2**20:.2f}" for k, v in total.items()))

    @functools.wraps(orig_activate)
    def activate_adapter(self, lora_id):
        return worker.activate(self, orig_activate, lora_id)

    @functools.wraps(orig_apply)
    def _apply_adapters(self, lora_requests):
        # The ids this step needs: activation evicts storage only from the others.
        manager = self._adapter_manager
        manager._nora_batch = {r.lora_int_id for r in lora_requests if r}
        try:
            # vLLM's add_adapter asks `id in self.list_adapters()`, a copy of every registered
            # adapter, once per adapter of the step: O(step x resident), 30% of the worker's
            # time with 1024 resident. An adapter already registered only needs what its
            # "already loaded" branch does (touch, activate); the others go the stock way.
            if len(manager._nora_batch) <= manager.lora_slots:
                rest = set()
                for r in lora_requests:
                    if r and not r.load_inplace and r.lora_int_id in manager._registered_adapters:
                        manager.get_adapter(r.lora_int_id)  # touch (LRU)
                        manager.activate_adapter(r.lora_int_id)
                    elif r:
                        rest.add(r)
                lora_requests = rest
            return orig_apply(self, lora_requests)
        finally:
            manager._nora_batch = None
            plan = storage.current_plan()
            if plan is not None and plan.version != plan.refreshed_version:
                # Slots were placed since the last metadata: have vLLM rebuild it this step,
                # even where its own mapping and slot layout did not change.
                manager._last_slot_layout = None

    @functools.wraps(orig_dummy)
    def add_dummy_lora(self, lora_request, rank):
        added = orig_dummy(self, lora_request, rank)
        model = self._adapter_manager.get_adapter(lora_request.lora_int_id)
        if model is not None:
            model.nora_dummy = True  # warm-up only: no storage, no effect
        return added

    LoRAModelManager._create_lora_modules = _create_lora_modules
    LoRAModelManager.activate_adapter = activate_adapter
    LRUCacheWorkerLoRAManager._apply_adapters = _apply_adapters
    WorkerLoRAManager.add_dummy_lora = add_dummy_lora


def install_api_server_hooks() -> None:
    """Called in the front-end process when the engine args enable nora."""
    if _once("api_server"):
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels

        from . import serving

        orig_init = OpenAIServingModels.__init__
        orig_load = OpenAIServingModels.load_lora_adapter
        orig_resolve = OpenAIServingModels.resolve_lora
        orig_show = OpenAIServingModels.show_available_models

        @functools.wraps(orig_init)
        def __init__(self, *a, **kw):
            orig_init(self, *a, **kw)
            serving.after_init(self)

        @functools.wraps(orig_load)
        async def load_lora_adapter(self, request, base_model_name=None):
            return await serving.load_lora_adapter(self, orig_load, request, base_model_name)

        @functools.wraps(orig_resolve)
        async def resolve_lora(self, lora_name):
            return await serving.resolve_lora(self, orig_resolve, lora_name)

        @functools.wraps(orig_show)
        async def show_available_models(self):
            return serving.show_sources(self, await orig_show(self))

        OpenAIServingModels.__init__ = __init__
        OpenAIServingModels.load_lora_adapter = load_lora_adapter
        OpenAIServingModels.resolve_lora = resolve_lora
        OpenAIServingModels.show_available_models = show_available_models

        from vllm.entrypoints.serve.engine.serving import BaseServing

        orig_check = BaseServing._check_model

        @functools.wraps(orig_check)
        async def _check_model(self, request):
            return await serving.check_model(self, orig_check, request)

        BaseServing._check_model = _check_model
