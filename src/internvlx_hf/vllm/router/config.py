"""What the router needs of vLLM's engine settings, decided once at start (called by the config hook; torch-free).

The scheduler routes a request when it admits it, on the engine's worker, which holds the vision tower and the
router (through the engine's executor: vLLM's "uni" executor runs the worker in the scheduler's process, "mp" in a
process of its own, as vLLM's CPU platform does). It has run with one worker; more (tensor or pipeline parallel),
other executors and connectors that move KV blocks or encoder outputs are refused here with the fix. The same weights
serve without the router (as plain InternVL3.5) with `hf_overrides={"vir": {"enabled": false}}`.
"""

from __future__ import annotations

from ...modeling.configuration_internvlx import ViRConfig
from ..engine_settings import EngineSettings, UnsupportedCheckpoint

#: The router's `scheduler_cls`: router/scheduler.py's factory (vLLM settles `async_scheduling`, which of its two
#: classes, after the config hook), named so that vLLM imports it where the scheduler runs.
ROUTER_SCHEDULER = "internvlx_hf.vllm.router.scheduler.router_scheduler"
ROUTER_SCHEDULERS = tuple(f"internvlx_hf.vllm.router.scheduler.{name}"
                          for name in ("router_scheduler", "RouterScheduler", "RouterAsyncScheduler"))

#: vLLM's own scheduler classes (named as `scheduler_cls`, replaced by the router's subclasses)
VLLM_SCHEDULERS = ("vllm.v1.core.sched.scheduler.Scheduler", "vllm.v1.core.sched.async_scheduler.AsyncScheduler")

#: The override that serves a Flash folder's weights without the router, as plain InternVL3.5.
ROUTER_OFF = ("hf_overrides={\"vir\": {\"enabled\": false}} "
              "(vllm serve --hf-overrides '{\"vir\": {\"enabled\": false}}')")


def router_on(config) -> bool:
    """Whether the checkpoint is an InternVL3.5-Flash model with its router on (`config.vir.enabled`)."""
    vir = getattr(config, "vir", None)
    vir = ViRConfig.from_any(vir) if isinstance(vir, dict) else vir
    return vir is not None and bool(vir.enabled)


def _scheduler_name(chosen) -> str | None:
    if chosen is None or isinstance(chosen, str):
        return chosen
    return f"{chosen.__module__}.{chosen.__qualname__}"


def _shm_processor_cache(vllm_config) -> bool:
    """Whether vLLM's multimodal processor cache will be its shared-memory one (as vLLM 0.32's `_get_cache_type` picks
    it: asked for, not turned off by a size of 0, and one API process without data parallelism)."""
    multimodal = getattr(getattr(vllm_config, "model_config", None), "multimodal_config", None)
    if getattr(multimodal, "mm_processor_cache_type", None) != "shm" or not getattr(multimodal,
                                                                                      "mm_processor_cache_gb", 0) > 0:
        return False
    parallel = vllm_config.parallel_config
    return getattr(parallel, "_api_process_count", 1) == 1 and (
        getattr(parallel, "data_parallel_size", 1) == 1 or getattr(parallel, "data_parallel_external_lb", False))


def _problems(vllm_config) -> list[tuple[str, str]]:
    """(what, fix) for each engine setting the router cannot run with."""
    problems = []
    parallel = vllm_config.parallel_config
    backend = parallel.distributed_executor_backend
    if backend not in (None, "uni", "mp"):
        problems.append((f"distributed_executor_backend={backend!r} is an executor the router has not run with",
                         "no --distributed-executor-backend (vLLM's 'uni' for one worker, 'mp' for several on one "
                         "machine)"))
    if _shm_processor_cache(vllm_config):
        problems.append(("--mm-processor-cache-type shm hands the engine each image as an address in the API "
                         "process's shared memory, which only the worker reads, and the router reads the pixels before "
                         "vLLM admits the request", "--mm-processor-cache-type lru (vLLM's default)"))
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append(("a KV connector (--kv-transfer-config) would move KV blocks of prompts it has not seen routed",
                         "no --kv-transfer-config"))
    if getattr(vllm_config, "ec_transfer_config", None) is not None:
        problems.append(("an encoder-cache connector (--ec-transfer-config) would compute the images' rows elsewhere, "
                         "without the router's decisions", "no --ec-transfer-config"))
    chosen = vllm_config.scheduler_config.scheduler_cls
    name = _scheduler_name(chosen)
    if (name is not None and name not in VLLM_SCHEDULERS and name not in ROUTER_SCHEDULERS
            and not getattr(chosen, "router_scheduler_channel", False)):
        problems.append((f"scheduler_cls {name!r} would admit requests without routing them",
                         "no --scheduler-cls (a scheduler of your own keeps the router by subclassing "
                         "internvlx_hf.vllm.router.scheduler.RouterSchedulerMixin)"))
    return problems


def configure_router(vllm_config, config, settings: EngineSettings, where: str) -> None:
    """The router's engine settings for a Flash checkpoint with the router on (nothing otherwise): its scheduler, or a
    refusal naming each setting it cannot run with and the fix."""
    if not router_on(config):
        return
    problems = _problems(vllm_config)
    if problems:
        raise UnsupportedCheckpoint(
            f"InternVL3.5-Flash checkpoint {where}: its router (config.vir) runs before vLLM's scheduler admits a "
            f"request, on the engine's worker, which it cannot here because {'; and '.join(p for p, _ in problems)}. "
            f"Start vLLM with {' and '.join(f for _, f in problems)}, or serve the same weights without the router "
            f"(as plain InternVL3.5, 256 tokens per tile) with {ROUTER_OFF}.")
    if _scheduler_name(vllm_config.scheduler_config.scheduler_cls) in VLLM_SCHEDULERS + (None,):
        settings.set(vllm_config.scheduler_config, "scheduler_cls", ROUTER_SCHEDULER,
                     "InternVL3.5-Flash's router: each request's tiles routed before the scheduler admits it")
    settings.note(
        "InternVL3.5-Flash router on: before vLLM admits a request, the vision tower and the router run on all of its "
        "tiles on the worker (the quantile over them; one call per step for the waiting requests that fit the step's "
        "free slots and encoder budget), and the request enters with its prompt shortened as transformers' generate "
        "shortens it (64 tokens per compressed 448px tile): KV blocks, prefill and decoding on that prompt. Costs: "
        "a request waits for its routing (running requests decode meanwhile); its rows are kept on the worker (up to "
        "256 MiB) for the step that embeds them, where a request whose rows did not fit runs it again. "
        "Usage counts the prompt as sent (its prompt_tokens), cached tokens on the shortened prompt; prompt logprobs, "
        f"images given as embeddings and streaming-input sessions are refused per request. Off: {ROUTER_OFF}.")
