"""What an InternVL-X checkpoint needs from vLLM's engine settings (vLLM's per-architecture config hook).

Kept free of torch and of the model code: vLLM imports it in every process, for every model, when it loads plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .layout import lvtc_layout_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig


#: The LLM classes vLLM has for each `text_config.model_type` this package writes (InternLM2 is converted to Llama).
LLM_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


class UnsupportedCheckpoint(SystemExit):
    """A checkpoint or setting the plugin cannot serve: vLLM stops while it reads its configuration, with one line that
    names the reason and points to `internvlx serve` (a SystemExit, so no traceback of vLLM's config code)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LVTCConfigHook:
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`): what an LVTC checkpoint needs from the engine."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config: "VllmConfig") -> None:
        model_config = vllm_config.model_config
        config = model_config.hf_config
        if getattr(config, "model_type", None) != "internvlx":
            return
        llm = config.get_text_config().model_type
        if llm not in LLM_ARCHITECTURES:
            raise UnsupportedCheckpoint(
                f"InternVL-X checkpoint {model_config.model}: vLLM cannot run it because the plugin has no vLLM class "
                f"for its LLM (text_config.model_type {llm!r}; supported: {', '.join(sorted(LLM_ARCHITECTURES))}); "
                f"serve it with `internvlx serve {model_config.model}` instead."
            )
        if config.lvtc_config is None:
            return
        # LVTC runs the LLM layer by layer (lvtc.py); with expansion (layout) also on two layouts.
        layout = lvtc_layout_of(config)
        text = config.get_text_config()
        problems = []
        if layout is not None and getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
            problems.append("its LLM uses sliding-window attention")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            problems.append("pipeline parallelism is on")
        if vllm_config.speculative_config is not None:
            problems.append("speculative decoding is on")
        if problems:
            raise UnsupportedCheckpoint(
                f"InternVL-X LVTC checkpoint {model_config.model}: vLLM cannot run it because "
                f"{' and '.join(problems)}; serve it with `internvlx serve {model_config.model}` instead."
            )
        if layout is None:
            return
        # Per-token layout rows through vLLM's per-request position machinery (lvtc.py's docstring).
        config.mrope_section = [1, 1, 1]
        scheduler = vllm_config.scheduler_config
        scheduler.disable_chunked_mm_input = True
        vllm_config.cache_config.enable_prefix_caching = False
        # Whole images per step: a step must hold the largest image (or video), which the prompt length bounds.
        need = model_config.max_model_len
        if scheduler.max_num_batched_tokens < need:
            scheduler.max_num_batched_tokens = need
            scheduler.max_num_encoder_input_tokens = max(scheduler.max_num_encoder_input_tokens, need)
            scheduler.encoder_cache_size = max(scheduler.encoder_cache_size, need)
