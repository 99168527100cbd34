"""The one module that installs anything into vLLM. Every vLLM name the plugin wraps, replaces,
subclasses, overrides, writes or reads is in one table, ``vllm_surface.TABLE`` (with why; read it
on a vLLM upgrade); ``register()`` checks all of it against the installed vLLM before anything
here is installed, and tests/test_vllm_surface.py checks that the table equals what the code
touches.

The API-server wrappers stay because vLLM has no extension point for what they do:
``load_lora_adapter`` converts and checks an adapter before vLLM sees it (``--lora-modules`` and
``/v1/load_lora_adapter``: a bad adapter is a 400 naming the file, module and tensor; vLLM's
resolvers are asked only for unknown names, never for paths); ``show_available_models`` shows
an adapter's own directory as its ``root`` (vLLM shows the path it was handed, the cache
entry); ``_check_model`` asks vLLM's own ``resolve_lora`` (and so the store, a registered
``LoRAResolver``) for an unknown name also when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is off
(vLLM asks resolvers only when it is on, and that flag also opens the load/unload routes and
refuses ``--api-server-count`` > 1), and answers a store adapter at fault with the 400 naming
the fault (vLLM says only "could not be loaded"). ``OpenAIServingModels.__init__`` and
``.resolve_lora`` are no longer patched: the store is registered with
``LoRAResolverRegistry.register_resolver``. The launcher patches nothing: ``nora-serve`` runs
vLLM's ``ServeSubcommand`` (``nora_serve/cli/serve.py``); the ``from_cli_args`` wrapper
writes nora's decisions back into vLLM's ``args``, which the API server processes of
``--api-server-count N`` read before they load any plugin.

Per-process state lives in one object each: ``WorkerState`` (``nora_serve/serving/state.py``,
handed to the punica wrapper's constructor, the layer classes and the worker wrappers) and
``FrontEnd`` (``vllm_plugin/serving.py``, handed to the API-server wrappers and the store
resolver); the scheduler's per-step caps are kept by scheduler, not on it.

Everything is installed here, up front or from this module's own wrappers (nothing it calls
reaches back up): ``register()`` installs the engine-args, platform, compile and scheduler
wrappers in every process; the ``create_engine_config`` wrapper installs the API-server stage
where an OpenAI API server's engine config enables nora, and the ``get_punica_wrapper`` wrapper
the worker stage where a worker's does. Every wrapper is inert unless ``additional_config["nora"]`` enables the
plugin, so vLLM behaves exactly as before without ``--enable-nora``. Each stage is installed at
most once per process.
"""

from __future__ import annotations

import functools
import weakref

# The name the adapter store is registered under in vLLM's LoRAResolverRegistry.
STORE_RESOLVER = "nora adapter store"

_installed: set[str] = set()
# The state of this process: one per process kind, made by the stage that needs it.
_worker_state = None  # state.WorkerState (worker processes)
_front_end = None  # serving.FrontEnd (API-server processes)


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
            config = orig_create(self, *a, **kw)
            # An OpenAI API server's config (every API server process makes its own), not an
            # offline LLM's nor a headless engine's: the API-server stage.
            from vllm.usage.usage_lib import UsageContext

            from nora_serve.serving.settings import settings_of

            usage = kw.get("usage_context", a[0] if a else None)
            settings = settings_of(config)
            if settings is not None and usage == UsageContext.OPENAI_API_SERVER and not kw.get("headless"):
                install_front_end(settings, config)
            return config

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

            from nora_serve.serving.settings import settings_of

            config = get_current_vllm_config_or_none()
            if settings_of(config) is None:
                return stock
            if stock.endswith(".PunicaWrapperCPU"):
                install_worker(config)
                return f"{__name__}.NoraPunicaWrapperCPU"
            if stock.endswith(".PunicaWrapperGPU"):
                install_worker(config)
                return f"{__name__}.NoraPunicaWrapperGPU"
            return stock

        platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)

    install_scheduler_hooks()
    install_compile_hook()
    install_config_hash_hook()


def install_config_hash_hook() -> None:
    """vLLM keys its compile cache on ``VllmConfig.compute_hash``, which hashes all of
    ``additional_config``: the nora settings that never change the graph
    (``NoraSettings.NOT_IN_GRAPH``: the store and cache directories, ...) are left out, so that a
    server started on a new cache directory finds the graph it compiled before (a cold compile
    was 30 s of a 2-core machine's start, minutes on larger models)."""
    if not _once("config_hash"):
        return
    import copy

    from vllm.config import VllmConfig

    from nora_serve.serving.settings import KEY, NoraSettings

    orig = VllmConfig.compute_hash

    @functools.wraps(orig)
    def compute_hash(self, *a, **kw):
        extra = self.additional_config
        nora = extra.get(KEY) if isinstance(extra, dict) else None
        if not isinstance(nora, dict) or not set(nora) & set(NoraSettings.NOT_IN_GRAPH):
            return orig(self, *a, **kw)
        graph = {k: v for k, v in nora.items() if k not in NoraSettings.NOT_IN_GRAPH}
        view = copy.copy(self)  # the config itself is never changed (other threads read it)
        object.__setattr__(view, "additional_config", {**extra, KEY: graph})
        return orig(view, *a, **kw)

    VllmConfig.compute_hash = compute_hash


# Named after the classes they build: vLLM logs "Using <name>." for what it builds.
def NoraPunicaWrapperCPU(*args, **kwargs):  # noqa: N802
    """What vLLM's ``get_punica_wrapper`` builds with nora on (CPU): our wrapper, given this
    worker's state."""
    from . import punica_cpu

    return punica_cpu.NoraPunicaWrapperCPU(*args, state=_worker_state, **kwargs)


def NoraPunicaWrapperGPU(*args, **kwargs):  # noqa: N802
    """As :func:`NoraPunicaWrapperCPU`, on CUDA."""
    from . import punica_gpu

    return punica_gpu.NoraPunicaWrapperGPU(*args, state=_worker_state, **kwargs)


def install_compile_hook() -> None:
    """Keep torch.compile on when nora serves adapters on the CPU.

    vLLM's CPU platform turns compilation off whenever LoRA is configured (its LoRA ops branch on
    tensor values). Each entry point of the nora CPU wrapper is its own opaque custom op under
    tracing (``punica_cpu.py``, keys in ``opaque.py``), so the compiled graph never sees the per-step routing: the platform's
    config pass runs as if LoRA were off, and LoRA is put back after it. An explicit
    ``--enforce-eager`` / compilation mode 0 stays as the user set it; fully sharded LoRA
    layers (which call the wrapper's shrink/expand with their own buffers) keep vLLM's choice."""
    if not _once("compile"):
        return
    from vllm.platforms import current_platform

    from nora_serve.serving.settings import settings_of

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
    """Engine core: keep each step within the dense-slot and basis caps (``serving/scheduling.py``)."""
    if not _once("scheduler"):
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    from nora_serve.serving.scheduling import StepLimits
    from nora_serve.serving.settings import settings_of

    orig_init = Scheduler.__init__
    orig_schedule = Scheduler.schedule
    orig_blocked = Scheduler._handle_blocked_waiting_request
    limits_of: "weakref.WeakKeyDictionary[Scheduler, StepLimits]" = weakref.WeakKeyDictionary()

    @functools.wraps(orig_init)
    def __init__(self, *a, **kw):
        orig_init(self, *a, **kw)
        st = settings_of(self.vllm_config)
        if st is not None and self.lora_config is not None:
            limits_of[self] = StepLimits(st, self.lora_config.max_loras, self.lora_config,
                                         getattr(self.vllm_config.model_config, "model", None))

    @functools.wraps(orig_schedule)
    def schedule(self, *a, **kw):
        limits = limits_of.get(self)
        if limits is not None:
            limits.start_step(self.running)
        return orig_schedule(self, *a, **kw)

    @functools.wraps(orig_blocked)
    def _handle_blocked_waiting_request(self, request):
        ready = orig_blocked(self, request)
        limits = limits_of.get(self)
        if ready and limits is not None and request.lora_request and request.lora_request.lora_int_id > 0:
            if not limits.available(request.lora_request):
                # Its adapter cannot be read or prepared again: this request ends with an error
                # (as vLLM ends one whose grammar failed), the engine and the others go on.
                _end_with_error(self, request.request_id, f"LoRA adapter "
                                f"{request.lora_request.lora_name!r} cannot be read")
                return False
            return limits.admit(request.lora_request)
        return ready

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler._handle_blocked_waiting_request = _handle_blocked_waiting_request


def _end_with_error(scheduler, request_id: str, message: str) -> None:
    """End a waiting request with an error at the next ``update_from_output``, as vLLM ends one
    whose grammar failed to compile: vLLM 0.32 keeps those requests' ids in a set, 0.33 maps
    each to its ``RequestError``."""
    errors = scheduler.grammar_compile_error_reqs
    if isinstance(errors, dict):
        from vllm.outputs import RequestError

        errors[request_id] = RequestError(code="adapter_error", message=message)
    else:
        errors.add(request_id)


def install_worker(vllm_config) -> None:
    """Worker stage, from the ``get_punica_wrapper`` wrapper where the engine config enables
    nora: this worker's state, and the wrappers that use it."""
    global _worker_state
    if not _once("worker"):
        return
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import worker
    from nora_serve.serving.state import WorkerState

    state = _worker_state = WorkerState.from_vllm_config(vllm_config)
    worker.NoraWorkerExtension.nora_state = state  # its collective_rpc methods (--nora-preload-store)
    orig_load = WorkerLoRAManager._load_adapter

    @functools.wraps(orig_load)
    def _load_adapter(self, lora_request):
        return worker.load_adapter(state, self, orig_load, lora_request)

    WorkerLoRAManager._load_adapter = _load_adapter

    if state.settings is not None and state.settings.shared_basis:
        _install_shared_basis(state)

    orig_prompt = GPUModelRunner._get_prompt_logprobs_dict

    @functools.wraps(orig_prompt)
    def _get_prompt_logprobs_dict(self, hidden_states, *a, **kw):
        previous, state.prompt_hidden_states = state.prompt_hidden_states, hidden_states
        try:
            return orig_prompt(self, hidden_states, *a, **kw)
        finally:
            state.prompt_hidden_states = previous

    GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict


def _install_shared_basis(state) -> None:
    """Shared-basis storage: our layer classes first in line, slots placed on activation."""
    import vllm.lora.utils as lora_utils
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    from . import worker
    from .layers import DenseSlotsMixin, SharedBasisLayerMixin, dense_slots_logits, layer_classes

    # from_layer() takes the first class whose can_replace_layer() accepts the layer. On the
    # CPU (whose wrapper reads them) the embedding and logits stacks hold the dense slots only.
    from vllm.platforms import current_platform

    state.dense_heads = current_platform.is_cpu()
    lora_utils._all_lora_classes = (layer_classes(state, dense_heads=state.dense_heads)
                                    + tuple(lora_utils._all_lora_classes))
    if state.dense_heads:  # vLLM builds the logits layer itself, for --max-loras slots
        import vllm.lora.model_manager as model_manager

        orig_logits = model_manager.from_layer_logits_processor

        @functools.wraps(orig_logits)
        def from_layer_logits_processor(layer, lm_head, max_loras, lora_config, model_config=None):
            plan = state.plan_for(max_loras, lm_head.weight.device)
            built = orig_logits(layer, lm_head, plan.dense_slots, lora_config, model_config)
            return dense_slots_logits(built, state)

        model_manager.from_layer_logits_processor = from_layer_logits_processor

    orig_create = LoRAModelManager._create_lora_modules
    orig_activate = LoRAModelManager.activate_adapter
    orig_apply = LRUCacheWorkerLoRAManager._apply_adapters
    orig_dummy = WorkerLoRAManager.add_dummy_lora

    @functools.wraps(orig_create)
    def _create_lora_modules(self):
        orig_create(self)
        total: dict[str, int] = {}
        heads = 0
        for name, module in self.modules.items():
            if isinstance(module, SharedBasisLayerMixin):
                module.nora_sub_modules = self.packed_modules.get(name) or [name]
                for k, v in module.nora_storage_bytes().items():
                    total[k] = total.get(k, 0) + v
            elif isinstance(module, DenseSlotsMixin):
                heads += module.nora_storage_bytes()
        if heads:
            total["embedding and logits"] = heads
        if total:
            from .log import logger

            logger.info("nora: adapter storage (MiB): %s", ", ".join(
                f"{k} {v / 2**20:.2f}" for k, v in total.items()))

    @functools.wraps(orig_activate)
    def activate_adapter(self, lora_id):
        return worker.activate(state, self, orig_activate, lora_id)

    @functools.wraps(orig_apply)
    def _apply_adapters(self, lora_requests):
        # The ids this step needs: activation evicts storage only from the others.
        manager = self._adapter_manager
        state.step_adapters = {r.lora_int_id for r in lora_requests if r}
        try:
            # vLLM's add_adapter asks `id in self.list_adapters()`, a copy of every registered
            # adapter, once per adapter of the step: O(step x resident), 30% of the worker's
            # time with 1024 resident. An adapter already registered only needs what its
            # "already loaded" branch does (touch, activate); the others go the stock way.
            if len(state.step_adapters) <= manager.lora_slots:
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
            state.step_adapters = None
            worker.report_residency(state, manager)
            plan = state.plan
            if plan is not None and plan.version != plan.refreshed_version:
                # Slots were placed since the last metadata: have vLLM rebuild it this step,
                # even where its own mapping and slot layout did not change.
                manager._last_slot_layout = None

    @functools.wraps(orig_dummy)
    def add_dummy_lora(self, lora_request, rank):
        # vLLM asks list_adapters() (a new set of every resident adapter) once per warm-up dummy,
        # and makes --max-loras of them: quadratic, 18 s of a 10,240-slot server's start. The
        # registered table answers the same membership question in O(1) meanwhile.
        self.list_adapters = self._adapter_manager._registered_adapters.keys
        try:
            added = orig_dummy(self, lora_request, rank)
        finally:
            del self.list_adapters
        if added:
            worker.mark_dummy(state, lora_request.lora_int_id)  # warm-up only: no storage, no effect
        return added

    LoRAModelManager._create_lora_modules = _create_lora_modules
    LoRAModelManager.activate_adapter = activate_adapter
    LRUCacheWorkerLoRAManager._apply_adapters = _apply_adapters
    WorkerLoRAManager.add_dummy_lora = add_dummy_lora


def install_front_end(settings, vllm_config) -> None:
    """API-server stage, from the ``create_engine_config`` wrapper where an API server's config
    enables nora: this process's ``FrontEnd``, the adapter store registered as a vLLM LoRA
    resolver (before vLLM's OpenAIServingModels reads the registry), and the wrappers of the
    API server's adapter paths."""
    global _front_end
    from vllm.lora.resolver import LoRAResolverRegistry

    from . import serving

    if _front_end is None:
        _front_end = serving.FrontEnd()
    front = _front_end
    front.configure(settings)
    front.bind(vllm_config)
    if front.store is not None and LoRAResolverRegistry.resolvers.get(STORE_RESOLVER) is not front.store:
        LoRAResolverRegistry.register_resolver(STORE_RESOLVER, front.store)
    front.start_preload()  # --nora-preload-store: converting while the engine starts
    if not _once("front_end"):
        return
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.serving import BaseServing

    orig_load = OpenAIServingModels.load_lora_adapter
    orig_show = OpenAIServingModels.show_available_models
    orig_check = BaseServing._check_model
    orig_static = OpenAIServingModels.init_static_loras

    @functools.wraps(orig_load)
    async def load_lora_adapter(self, request, base_model_name=None):
        return await serving.load_lora_adapter(front, self, orig_load, request, base_model_name)

    @functools.wraps(orig_show)
    async def show_available_models(self):
        return serving.hide_paths(front, await orig_show(self))

    @functools.wraps(orig_check)
    async def _check_model(self, request):
        return await serving.check_model(front, self, orig_check, request)

    @functools.wraps(orig_static)
    async def init_static_loras(self):
        # After --lora-modules (they keep their names): the store preloaded, if asked for,
        # before the server answers its first request.
        await orig_static(self)
        await serving.preload_store(front, self)

    OpenAIServingModels.load_lora_adapter = load_lora_adapter
    OpenAIServingModels.show_available_models = show_available_models
    OpenAIServingModels.init_static_loras = init_static_loras
    BaseServing._check_model = _check_model
    _install_inflight(front)
    _install_lora_metrics(front)


def _install_inflight(front) -> None:
    """Count each adapter's requests in the engine (an idle store adapter may be evicted)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    orig_generate = AsyncLLM.generate

    @functools.wraps(orig_generate)
    async def generate(self, *a, **kw):
        lora = kw.get("lora_request")
        name = lora.lora_name if lora is not None and front.enabled else None
        front.hold(name)
        try:
            async for out in orig_generate(self, *a, **kw):
                yield out
        finally:
            front.release(name)

    AsyncLLM.generate = generate


def _install_lora_metrics(front) -> None:
    """vLLM's ``vllm:lora_requests_info`` carries the names of the running and waiting adapters
    as one label value, a new series for every combination ever seen. With nora on, it is not
    set; counts with a fixed set of series are (``serving/metrics.py`` ``lora_requests``)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from nora_serve.serving import metrics

    orig_init = PrometheusStatLogger.__init__
    orig_record = PrometheusStatLogger.record

    @functools.wraps(orig_init)
    def __init__(self, *a, **kw):
        orig_init(self, *a, **kw)
        if front.enabled:
            self.gauge_lora_info = None  # vLLM records it only when set

    @functools.wraps(orig_record)
    def record(self, scheduler_stats, *a, **kw):
        if front.enabled and scheduler_stats is not None:
            metrics.lora_requests(scheduler_stats.running_lora_adapters,
                                  scheduler_stats.waiting_lora_adapters)
        return orig_record(self, scheduler_stats, *a, **kw)

    PrometheusStatLogger.__init__ = __init__
    PrometheusStatLogger.record = record
