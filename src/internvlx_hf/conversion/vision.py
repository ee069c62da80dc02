"""InternViT (OpenGVLab `InternVisionModel`) -> transformers `InternVLVisionConfig`, and its packed qkv."""

from __future__ import annotations

from typing import Any

from .errors import ConversionError

# `InternVisionConfig` defaults (OpenGVLab), used where a checkpoint's vision_config leaves a field out.
_INTERNVIT_DEFAULTS = {
    "num_channels": 3,
    "patch_size": 14,
    "image_size": 224,
    "qkv_bias": False,
    "hidden_size": 3200,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "qk_normalization": True,
    "num_hidden_layers": 48,
    "use_flash_attn": True,
    "hidden_act": "gelu",
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 0.1,
}
_SUPPORTED_NORMS = ("layer_norm", "rms_norm")
# transformers' InternVLVisionAttention builds q_norm / k_norm with the RMSNorm default eps.
_QK_NORM_EPS = 1e-6


def convert_vision_config(vision_config: dict[str, Any], force_image_size: int | None) -> tuple[dict, list[str]]:
    """The `InternVLVisionConfig` kwargs of an InternViT config, and notes on what was not carried over."""
    src = {**_INTERNVIT_DEFAULTS, **vision_config}
    notes: list[str] = []
    model_type = vision_config.get("model_type", "intern_vit_6b")
    if model_type != "intern_vit_6b":
        raise ConversionError(
            f"vision_config.model_type is {model_type!r}; only InternViT ('intern_vit_6b', the InternVisionModel of "
            "InternVL 1.5/2) is supported."
        )
    norm_type = src["norm_type"]
    if norm_type not in _SUPPORTED_NORMS:
        raise ConversionError(
            f"vision_config.norm_type={norm_type!r} is not supported; InternVLVisionModel offers {_SUPPORTED_NORMS}."
        )
    if src["qk_normalization"] and abs(float(src["layer_norm_eps"]) - _QK_NORM_EPS) > 1e-12:
        raise ConversionError(
            f"vision_config.qk_normalization with layer_norm_eps={src['layer_norm_eps']}: transformers' "
            f"InternVLVisionModel normalises q/k with eps {_QK_NORM_EPS} only, so the outputs would differ."
        )
    image_size = src["image_size"]
    if force_image_size is not None and int(force_image_size) != int(image_size):
        raise ConversionError(
            f"config.force_image_size={force_image_size} differs from vision_config.image_size={image_size}; "
            "interpolate the position embeddings to the forced size first (the checkpoint does not store them "
            "at that size)."
        )
    if float(src.get("drop_path_rate") or 0.0) > 0:
        notes.append(
            f"vision drop_path_rate={src['drop_path_rate']} not carried (stochastic depth, training only; "
            "InternVLVisionModel has none)"
        )
    converted = {
        "hidden_size": src["hidden_size"],
        "num_hidden_layers": src["num_hidden_layers"],
        "num_attention_heads": src["num_attention_heads"],
        "intermediate_size": src["intermediate_size"],
        "attention_bias": bool(src["qkv_bias"]),
        "use_qk_norm": bool(src["qk_normalization"]),
        "hidden_act": src["hidden_act"],
        "norm_type": norm_type,
        "layer_norm_eps": float(src["layer_norm_eps"]),
        "attention_dropout": float(src.get("attention_dropout") or 0.0),
        "projection_dropout": float(src.get("dropout") or 0.0),
        "initializer_range": float(src["initializer_range"]),
        # InternViT initialises its layer scales ls1/ls2 to `initializer_factor`.
        "layer_scale_init_value": float(src["initializer_factor"]),
        "image_size": int(image_size),
        "patch_size": int(src["patch_size"]),
        "num_channels": int(src["num_channels"]),
        "use_mean_pooling": True,  # no final LayerNorm, as InternViT
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
    }
    return converted, notes


def internvit_qkv_rows(part: str, hidden_size: int) -> tuple[range, ...]:
    """Rows of InternViT's packed ``attn.qkv`` that hold ``part`` (q, k, v in that order, each hidden wide)."""
    index = "qkv".index(part)
    return (range(index * hidden_size, (index + 1) * hidden_size),)
