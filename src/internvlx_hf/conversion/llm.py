"""The language model: InternVL2's `llm_config` -> a transformers text config, key tables and qkv packing.

InternVL2.5 and InternVL3 use the same classes: InternLM2.5 is InternLM2's code (`InternLM2ForCausalLM`), Qwen2.5 is
Qwen2's (`Qwen2ForCausalLM`).

InternLM2 (InternVL2-2B/8B/26B) becomes a Llama-architecture model: same blocks, but the attention projections
are packed in one `wqkv` whose rows are grouped per KV head (see `internlm2_qkv_rows`), and its rotary scaling
is expressed as transformers `rope_parameters`. Qwen2 (1B), Phi-3 (4B) and Llama (40B/76B) are already in
transformers layout and pass through with new prefixes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import CONFIG_MAPPING, LlamaConfig, PreTrainedConfig

from ..modeling.configuration_internvlx import with_longrope_factor
from .errors import ConversionError
from .key_mapping import HF_CAUSAL_LM_KEY_MAPPING, INTERNLM2_KEY_MAPPING, QWEN3_MOE_KEY_MAPPING


@dataclass(frozen=True)
class LLMSpec:
    """How to convert one source LLM architecture."""

    architecture: str  # the source class, e.g. "InternLM2ForCausalLM"
    key_mapping: list[tuple[str, str]]  # relative to `language_model.`
    packed_qkv: bool  # whether the table has `{qkv}` targets (InternLM2's wqkv)


SUPPORTED_LLMS = {
    "InternLM2ForCausalLM": LLMSpec("InternLM2ForCausalLM", INTERNLM2_KEY_MAPPING, packed_qkv=True),
    "Qwen2ForCausalLM": LLMSpec("Qwen2ForCausalLM", HF_CAUSAL_LM_KEY_MAPPING, packed_qkv=False),
    "LlamaForCausalLM": LLMSpec("LlamaForCausalLM", HF_CAUSAL_LM_KEY_MAPPING, packed_qkv=False),
    "Phi3ForCausalLM": LLMSpec("Phi3ForCausalLM", HF_CAUSAL_LM_KEY_MAPPING, packed_qkv=False),
    # InternVL3.5 and its Flash models (1B-38B)
    "Qwen3ForCausalLM": LLMSpec("Qwen3ForCausalLM", HF_CAUSAL_LM_KEY_MAPPING, packed_qkv=False),
    "Qwen3MoeForCausalLM": LLMSpec("Qwen3MoeForCausalLM", QWEN3_MOE_KEY_MAPPING, packed_qkv=False),
}
_MODEL_TYPES = {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                "Phi3ForCausalLM": "phi3", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}

# Config keys of the old (transformers 4.x) files that a v5 config takes as kwargs although they are not fields.
_LEGACY_ROPE_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor")
# Fields that describe the saved object or the runtime, not the architecture: never carried over.
_RUNTIME_KEYS = {"architectures", "dtype", "torch_dtype", "transformers_version", "attn_implementation",
                 "_attn_implementation", "auto_map", "_name_or_path", "return_dict", "output_hidden_states",
                 "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder"}


def llm_architecture(llm_config: dict[str, Any]) -> LLMSpec:
    architectures = llm_config.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch is None:  # older configs name the model type only
        by_type = {model_type: name for name, model_type in _MODEL_TYPES.items()}
        arch = by_type.get(llm_config.get("model_type"))
    if arch == "InternLM3ForCausalLM":
        # InternVL3-9B. OpenGVLab's InternVLChatModel code (the reference this converter is tested against)
        # builds only Llama, InternLM2, Phi-3 and Qwen2 LLMs, so there is no reference run to match.
        raise ConversionError(
            "llm_config names InternLM3ForCausalLM (InternVL3-9B), which `internvlx convert` does not support: "
            "OpenGVLab's InternVLChatModel code has no InternLM3 to check a conversion against. The other InternVL3 "
            "sizes (Qwen2.5 LLMs) convert."
        )
    if arch not in SUPPORTED_LLMS:
        raise ConversionError(
            f"llm_config names the LLM {architectures or llm_config.get('model_type')!r}, which `internvlx convert` "
            f"does not know; supported: {sorted(SUPPORTED_LLMS)} (InternVL2-1B..76B, InternVL2.5-1B..78B, "
            "InternVL3-1B..78B except 9B, InternVL3.5 and its Flash models)."
        )
    return SUPPORTED_LLMS[arch]


def convert_text_config(llm_config: dict[str, Any]) -> PreTrainedConfig:
    """A transformers text config that reproduces the source LLM (Llama layout for InternLM2)."""
    spec = llm_architecture(llm_config)
    if spec.architecture == "InternLM2ForCausalLM":
        return _internlm2_to_llama_config(llm_config)
    model_type = _MODEL_TYPES[spec.architecture]
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise ConversionError(f"llm_config names {spec.architecture}, which this transformers "
                              f"({transformers.__version__}) does not have (no model type {model_type!r}); upgrade "
                              "transformers to convert it.")
    config_class = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(config_class)} | set(_LEGACY_ROPE_KEYS)
    kwargs = {key: value for key, value in llm_config.items() if key in known and key not in _RUNTIME_KEYS}
    if model_type == "qwen2":
        # InternVL2.5/3 write Qwen2.5's `rope_scaling` (dynamic, factor 2) into llm_config, but the Qwen2 of the
        # transformers version OpenGVLab's code pins (4.37.2) has no rope scaling: the reference ignores it.
        kwargs.pop("rope_scaling", None)
    scaling = kwargs.get("rope_scaling")
    if model_type == "phi3" and scaling and scaling.get("type", scaling.get("rope_type")) in ("su", "longrope"):
        # Phi-3-128k's old name "su" is transformers' "longrope", which wants the pretraining length inside the
        # rope parameters; transformers' own renaming of "su" happens too late to add it.
        scaling = {k: v for k, v in scaling.items() if k != "type"}
        scaling["rope_type"] = "longrope"
        pretraining_length = llm_config.get("original_max_position_embeddings",
                                            llm_config.get("max_position_embeddings"))
        scaling.setdefault("original_max_position_embeddings", pretraining_length)
        kwargs["rope_scaling"] = scaling
        kwargs = with_longrope_factor(kwargs)  # the ratio transformers would take, and warn about, on every load
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError, KeyError) as error:
        raise ConversionError(f"llm_config ({spec.architecture}) does not make a valid {config_class.__name__}: "
                              f"{error}") from None


def text_config_notes(llm_config: dict[str, Any]) -> list[str]:
    """What the conversion summary should say about ``llm_config`` keys the reference does not act on."""
    spec = llm_architecture(llm_config)
    scaling = llm_config.get("rope_scaling")
    if spec.architecture == "Qwen2ForCausalLM" and scaling:
        return [f"llm_config.rope_scaling {scaling} not carried over: the reference Qwen2 (transformers 4.37.2, the "
                "version OpenGVLab's InternVL code pins) has no rope scaling, so it ignores it; plain rope at every "
                "length, as the reference"]
    return []


def _internlm2_rope_parameters(llm_config: dict[str, Any]) -> dict[str, Any]:
    theta = float(llm_config.get("rope_theta", 10000))
    scaling = llm_config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling["factor"])
    # InternLM2 "dynamic" = dynamic NTK: base * ((f * L / max_pos) - (f - 1)) ** (d / (d - 2)) once the length L
    # exceeds max_position_embeddings, recomputed as L grows: transformers' "dynamic" is the same formula and the
    # same update rule. InternLM2 "linear" divides the positions by f: transformers' "linear".
    if kind == "dynamic":
        return {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    raise ConversionError(
        f"llm_config.rope_scaling type {kind!r} is not an InternLM2 rope scaling; expected 'dynamic' or 'linear'."
    )


def _internlm2_to_llama_config(c: dict[str, Any]) -> LlamaConfig:
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConversionError(f"llm_config: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act=c.get("hidden_act", "silu"),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        initializer_range=c.get("initializer_range", 0.02),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        use_cache=c.get("use_cache", True),
        pad_token_id=c.get("pad_token_id", 0),
        bos_token_id=c.get("bos_token_id", 1),
        eos_token_id=c.get("eos_token_id", 2),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        # InternLM2's `bias` adds biases to wqkv and wo: Llama's attention_bias does the same for q/k/v/o.
        attention_bias=bool(c.get("bias", True)),
        mlp_bias=False,
        rope_parameters=_internlm2_rope_parameters(c),
    )


def internlm2_qkv_rows(part: str, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[range, ...]:
    """Rows of InternLM2's packed ``wqkv`` that hold ``part`` ("q", "k" or "v").

    ``wqkv`` rows come in ``num_kv_heads`` groups; group ``h`` holds the ``g = num_heads / num_kv_heads`` query
    heads ``h*g .. h*g+g-1``, then key head ``h``, then value head ``h`` (each ``head_dim`` rows). Collecting
    the query rows group by group keeps the query heads in order, so the split is exact (a pure row selection).
    """
    group = num_heads // num_kv_heads
    width = (group + 2) * head_dim
    if part == "q":
        return tuple(range(h * width, h * width + group * head_dim) for h in range(num_kv_heads))
    offset = group if part == "k" else group + 1
    return tuple(range(h * width + offset * head_dim, h * width + (offset + 1) * head_dim) for h in range(num_kv_heads))
