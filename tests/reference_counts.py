"""Parameter counts of OpenGVLab `InternVLChatModel` checkpoints from their config.json, by closed-form formulas.

The formulas follow the reference modules (OpenGVLab `InternVisionModel`, `mlp1`, and each LLM's own
`*ForCausalLM`), layer by layer, without building anything, so they are an independent check of the meta-device
count of the converted model (`internvlx_hf.conversion.sizes`). Missing config keys take the reference classes'
defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReferenceCount:
    vision: int
    projector: int  # mlp1
    llm: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm


def internvit(v: dict[str, Any]) -> int:
    """InternVisionModel: embeddings (class token, patch conv, absolute positions) + encoder layers, no final norm."""
    d, ffn, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patch, image, channels = v.get("patch_size", 14), v.get("image_size", 224), v.get("num_channels", 3)
    positions = (image // patch) ** 2 + 1
    embeddings = d + (channels * patch * patch * d + d) + positions * d
    norm = 2 * d if v.get("norm_type", "rms_norm") == "layer_norm" else d  # LayerNorm has a bias, RMSNorm not
    attention = 3 * d * d + (3 * d if v.get("qkv_bias", False) else 0) + d * d + d  # qkv, proj (always biased)
    if v.get("qk_normalization", True):
        attention += 2 * d  # q_norm, k_norm: RMSNorm weights
    mlp = d * ffn + ffn + ffn * d + d
    layer = attention + mlp + 2 * norm + 2 * d  # norm1, norm2, layer scales ls1, ls2
    return embeddings + layers * layer


def mlp1(vision_hidden: int, downsample_ratio: float, llm_hidden: int) -> int:
    """LayerNorm(C) -> Linear(C, H) -> GELU -> Linear(H, H) on pixel-shuffled features, C = D / ratio^2."""
    channels = int(vision_hidden * round(1 / downsample_ratio) ** 2)
    return 2 * channels + channels * llm_hidden + llm_hidden + llm_hidden * llm_hidden + llm_hidden


def _head_dim(c: dict[str, Any]) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _kv_heads(c: dict[str, Any]) -> int:
    return c.get("num_key_value_heads") or c["num_attention_heads"]


def _decoder(c: dict[str, Any], layer: int) -> int:
    """Embedding + layers + final RMSNorm + LM head (absent when tied to the embedding)."""
    embedding = c["vocab_size"] * c["hidden_size"]
    head = 0 if c.get("tie_word_embeddings", False) else embedding
    return embedding + c["num_hidden_layers"] * layer + c["hidden_size"] + head


def qwen2(c: dict[str, Any]) -> int:
    h, ffn = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * _head_dim(c), _kv_heads(c) * _head_dim(c)
    attention = (h * q + q) + 2 * (h * kv + kv) + q * h  # q/k/v biased, o not
    return _decoder(c, attention + 3 * h * ffn + 2 * h)


def llama(c: dict[str, Any]) -> int:
    h, ffn = c["hidden_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * _head_dim(c), _kv_heads(c) * _head_dim(c)
    attention = h * q + 2 * h * kv + q * h
    if c.get("attention_bias", False):
        attention += q + 2 * kv + h
    mlp = 3 * h * ffn + ((2 * ffn + h) if c.get("mlp_bias", False) else 0)
    return _decoder(c, attention + mlp + 2 * h)


def internlm2(c: dict[str, Any]) -> int:
    """Packed wqkv (+ bias when `bias`), wo (+ bias), w1/w3/w2 without bias, attention_norm, ffn_norm."""
    h, ffn = c["hidden_size"], c["intermediate_size"]
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    qkv = (heads + 2 * kv_heads) * _head_dim(c)
    attention = h * qkv + heads * _head_dim(c) * h
    if c.get("bias", True):
        attention += qkv + h
    return _decoder(c, attention + 3 * h * ffn + 2 * h)


def phi3(c: dict[str, Any]) -> int:
    """Packed qkv_proj and gate_up_proj, no biases."""
    h, ffn = c["hidden_size"], c["intermediate_size"]
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    attention = h * (heads + 2 * kv_heads) * _head_dim(c) + heads * _head_dim(c) * h
    return _decoder(c, attention + 2 * h * ffn + ffn * h + 2 * h)


LLM_FORMULAS = {
    "Qwen2ForCausalLM": qwen2,
    "LlamaForCausalLM": llama,
    "InternLM2ForCausalLM": internlm2,
    "Phi3ForCausalLM": phi3,
}


def reference_count(config: dict[str, Any]) -> ReferenceCount:
    """The parameter count of the OpenGVLab model described by ``config`` (a config.json dict)."""
    llm_config, vision_config = config["llm_config"], config["vision_config"]
    architecture = (llm_config.get("architectures") or [None])[0]
    if architecture not in LLM_FORMULAS:
        raise KeyError(f"no reference formula for the LLM {architecture!r}")
    return ReferenceCount(
        vision=internvit(vision_config),
        projector=mlp1(vision_config["hidden_size"], config.get("downsample_ratio", 0.5), llm_config["hidden_size"]),
        llm=LLM_FORMULAS[architecture](llm_config),
    )
