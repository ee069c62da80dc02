"""Parameter-name mappings from the reference checkpoints to internvlx-hf.

Each mapping is an ordered list of ``(regex, replacement)`` pairs applied with ``re.fullmatch`` to a source key
(the first that matches wins). A key that no pattern matches is an error for the caller to report.

Keys are relative to a component prefix (``SOURCE_PREFIXES`` / ``TARGET_PREFIXES``). A replacement containing
``{qkv}`` names a *packed* source tensor: it becomes three target tensors (``q``, ``k``, ``v``) whose rows the
converter selects with the architecture's packing rule (InternViT: equal thirds; InternLM2: grouped per KV head,
see `conversion/llm.py`).
"""

from __future__ import annotations

import re

PACKED_QKV = "{qkv}"

# Where each component lives in an OpenGVLab InternVLChatModel checkpoint and in internvlx-hf.
SOURCE_PREFIXES = {
    "vision": "vision_model.",
    "mlp": "mlp1.",
    "pvtc": "projector.",
    "llm": "language_model.",
    "vir": ("pooling_before_gating.", "gating.", "mlp2."),  # InternVL3.5-Flash's router
}
# The LLM tables give full target names (the LLM maps to both `model.language_model.*` and `lm_head.*`).
TARGET_PREFIXES = {
    "vision": "model.vision_tower.",
    "projector": "model.multi_modal_projector.",
    "lvtc_lr": "model.lvtc_lr_projectors.{index}.",
    "lvtc_hr": "model.lvtc_hr_projector.",
    "vir": "model.vir.",
}

# InternViT (`InternVisionModel`, InternViT-300M and -6B) -> transformers `InternVLVisionModel`.
INTERNVIT_KEY_MAPPING: list[tuple[str, str]] = [
    (r"embeddings\.class_embedding", r"embeddings.cls_token"),
    (r"embeddings\.position_embedding", r"embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layer.\1.attention.{qkv}_proj.\2"),
    (r"encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.projection_layer.\2"),
    # InternViT-6B only (qk_normalization): RMSNorm over the full q / k width, as transformers' q_norm / k_norm.
    (r"encoder\.layers\.(\d+)\.attn\.(q|k)_norm\.weight", r"encoder.layer.\1.attention.\2_norm.weight"),
    (r"encoder\.layers\.(\d+)\.ls1", r"encoder.layer.\1.lambda_1"),  # layer scales
    (r"encoder\.layers\.(\d+)\.ls2", r"encoder.layer.\1.lambda_2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.layernorm_after.\2"),
]

# InternVL2 `mlp1` = nn.Sequential(LayerNorm, Linear, GELU, Linear) -> the "mlp" projector.
MLP_PROJECTOR_KEY_MAPPING: list[tuple[str, str]] = [
    (r"0\.(weight|bias)", r"layer_norm.\1"),
    (r"1\.(weight|bias)", r"linear_1.\1"),
    (r"3\.(weight|bias)", r"linear_2.\1"),
]

# InternLM2 (`InternLM2ForCausalLM`) -> a Llama-architecture LLM. Keys relative to `language_model.`.
INTERNLM2_KEY_MAPPING: list[tuple[str, str]] = [
    (r"model\.tok_embeddings\.weight", r"model.language_model.embed_tokens.weight"),
    (r"model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)",
     r"model.language_model.layers.\1.self_attn.{qkv}_proj.\2"),
    (r"model\.layers\.(\d+)\.attention\.wo\.(weight|bias)", r"model.language_model.layers.\1.self_attn.o_proj.\2"),
    (r"model\.layers\.(\d+)\.feed_forward\.w1\.weight", r"model.language_model.layers.\1.mlp.gate_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w3\.weight", r"model.language_model.layers.\1.mlp.up_proj.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w2\.weight", r"model.language_model.layers.\1.mlp.down_proj.weight"),
    (r"model\.layers\.(\d+)\.attention_norm\.weight", r"model.language_model.layers.\1.input_layernorm.weight"),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", r"model.language_model.layers.\1.post_attention_layernorm.weight"),
    (r"model\.norm\.weight", r"model.language_model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
]

# transformers-layout causal LMs (Qwen2, Llama, Phi-3): only the prefixes change; the names below `model.` are
# checked against the target model, so a layout difference still fails loudly.
HF_CAUSAL_LM_KEY_MAPPING: list[tuple[str, str]] = [
    (r"model\.(.+)", r"model.language_model.\1"),
    (r"lm_head\.weight", r"lm_head.weight"),
]

# Qwen3-MoE (InternVL3.5-30B-A3B / 241B-A28B, and their Flash models): the checkpoints hold one tensor per expert and
# projection, transformers 5 a layer's experts in two fused tensors, ``gate_up_proj`` ``(experts, 2 * I, hidden)``
# (each expert's gate rows, then its up rows) and ``down_proj`` ``(experts, hidden, I)``, as its own loading conversion
# builds them. ``{slot}E:H`` marks a source tensor as expert E's part H of such a fused target (`plan.FusedSlot`).
FUSED_SLOT = "{slot}"
QWEN3_MOE_KEY_MAPPING: list[tuple[str, str]] = [
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight",
     r"model.language_model.layers.\1.mlp.experts.gate_up_proj{slot}\2:0"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight",
     r"model.language_model.layers.\1.mlp.experts.gate_up_proj{slot}\2:1"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight",
     r"model.language_model.layers.\1.mlp.experts.down_proj{slot}\2:0"),
    *HF_CAUSAL_LM_KEY_MAPPING,
]

# transformers-native InternVL (`InternVLForConditionalGeneration`) -> internvlx-hf: the same module tree, so full
# target names. Both the transformers 5 layout and the older one (saved before the `model.` prefix, which
# transformers still loads) are read; `{projector}` marks the projector's keys (kept or replaced, see `plan.py`).
NATIVE_PROJECTOR = "{projector}"
NATIVE_KEY_MAPPING: list[tuple[str, str]] = [
    (r"(?:model\.)?vision_tower\.(.+)", r"model.vision_tower.\1"),
    (r"(?:model\.)?multi_modal_projector\.((?:layer_norm|linear_1|linear_2)\.(?:weight|bias))", r"{projector}\1"),
    (r"model\.language_model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"(?:language_model\.)?lm_head\.weight", r"lm_head.weight"),
]

# InternVL3.5-Flash's router (`CrossAttentionPooling` as `pooling_before_gating`, `Gating` as `gating`, the 64-token
# projector `mlp2`) -> `ViRRouter` (`model.vir.`). Full source keys, targets relative to the router.
VIR_KEY_MAPPING: list[tuple[str, str]] = [
    (r"pooling_before_gating\.query_token", r"pooling.query_token"),
    (r"pooling_before_gating\.attn([12])\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     r"pooling.attn\1.\2"),
    (r"pooling_before_gating\.norm([12])\.(weight|bias)", r"pooling.norm\1.\2"),
    *[(rf"gating\.block{n + 1}\.{index}\.(weight|bias)", rf"gating.blocks.{n}.{name}.\1")
      for n in range(4) for index, name in ((0, "fc1"), (3, "fc2"), (5, "norm"))],
    (r"gating\.gate\.0\.(weight|bias)", r"gating.norm.\1"),
    (r"gating\.gate\.1\.(weight|bias)", r"gating.proj.\1"),
    (r"mlp2\.0\.(weight|bias)", r"projector.layer_norm.\1"),
    (r"mlp2\.1\.(weight|bias)", r"projector.linear_1.\1"),
    (r"mlp2\.4\.(weight|bias)", r"projector.linear_2.\1"),
    (r"mlp2\.7\.(weight|bias)", r"projector.linear_3.\1"),
]

# Source tensors that carry no information and are dropped on purpose (reported in the summary).
DROPPED_SOURCE_KEYS: list[tuple[str, str]] = [
    (r"(?:model\.)?language_model\..*rotary_emb\.inv_freq", "rotary inv_freq buffer (recomputed from the config)"),
    (r"pooling_before_gating\.(?:attn|norm)[34]\..+", "never used by InternVL3.5-Flash's router: its pooling runs "
     "attn2 / norm2 for steps 3 and 4 (docs/flash.md)"),
]

# InternVL-X reference `VisionProjector` (PVTC) -> `PVTCProjector`. Keys are relative to the projector
# (`projector.` in the reference checkpoint, `model.multi_modal_projector.` here). The reference builds each
# branch from one `InternEncoderLayer` (`attn_local` / `attn_global`): our layer index 0.
PVTC_REFERENCE_KEY_MAPPING: list[tuple[str, str]] = [
    (r"mlp1\.0\.weight", r"local_query.norm.weight"),  # RMSNorm over the pixel-shuffled 2x2 window
    (r"mlp1\.1\.weight", r"local_query.proj.weight"),  # Linear (no bias); SiLU follows
    (r"mlp2\.0\.weight", r"global_query.norm.weight"),  # CLS token -> global query
    (r"mlp2\.1\.weight", r"global_query.proj.weight"),
    (r"mlp3\.0\.weight", r"key_value.norm.weight"),  # every ViT token -> keys/values
    (r"mlp3\.1\.weight", r"key_value.proj.weight"),
    (r"cls_scale", r"cls_scale"),
    (r"attn_(local|global)\.attn\.norm1\.weight", r"\1_layers.0.attn.query_norm.weight"),
    (r"attn_(local|global)\.attn\.norm2\.weight", r"\1_layers.0.attn.kv_norm.weight"),
    (r"attn_(local|global)\.attn\.q\.weight", r"\1_layers.0.attn.q_proj.weight"),
    (r"attn_(local|global)\.attn\.k\.weight", r"\1_layers.0.attn.k_proj.weight"),
    (r"attn_(local|global)\.attn\.v\.weight", r"\1_layers.0.attn.v_proj.weight"),
    (r"attn_(local|global)\.attn\.proj\.weight", r"\1_layers.0.attn.o_proj.weight"),
    (r"attn_(local|global)\.mlp\.norm\.weight", r"\1_layers.0.mlp.norm.weight"),
    (r"attn_(local|global)\.mlp\.w1\.weight", r"\1_layers.0.mlp.gate_proj.weight"),  # SwiGLU gate
    (r"attn_(local|global)\.mlp\.w3\.weight", r"\1_layers.0.mlp.up_proj.weight"),
    (r"attn_(local|global)\.mlp\.w2\.weight", r"\1_layers.0.mlp.down_proj.weight"),
]


def map_key(key: str, mapping: list[tuple[str, str]]) -> str | None:
    """The target name of ``key`` under ``mapping``, or None when no pattern matches."""
    for pattern, replacement in mapping:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(replacement)
    return None


def map_state_dict(state_dict: dict, mapping: list[tuple[str, str]], source_prefix: str = "") -> dict:
    """Rename every key of ``state_dict`` that starts with ``source_prefix``; unknown keys raise a KeyError."""
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(source_prefix):
            continue
        target = map_key(key[len(source_prefix):], mapping)
        if target is None:
            raise KeyError(f"no mapping for reference key {key!r}")
        out[target] = tensor
    return out
