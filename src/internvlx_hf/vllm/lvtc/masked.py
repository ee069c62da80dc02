"""LVTC on vLLM, the masked path: layers below ``k`` see the short layout on the long layout's slots (the fallback of
`saving/`, which holds and computes the short layout only and is the default, chosen by
`path.choose_lvtc_path`), and the path of checkpoints whose extra LR projectors come without expansion
(`MaskedLayers`, on the layer loop both paths share: `layers.py`).

vLLM's V1 engine keeps one token count per request, shared by every KV cache group (`KVCacheCoordinator.
allocate_new_blocks` sizes every group by the same `num_tokens`; one `seq_lens` / `slot_mapping` feeds every layer).
So the request is scheduled in the **long** layout: every tile takes its high-resolution count of slots (1024 per
448px tile), and layers ``>= k`` run on it as on any model, with vLLM's paged attention and KV cache. Layers ``< k``
must see the short layout (256 tokens per tile); they run on the same slots, where each tile's first ``short`` slots
hold its LR tokens and the others are *unused*:

- **Unused slots are masked out of attention** with vLLM's own attention kernels: layers ``< k`` get an Attention
  whose head size is one supported size larger (64 -> 80, 128 -> 160 on CPU); queries carry ``c`` and keys ``-c``
  (unused slots) or 0 (every other token) in the first extra dimension, values zeros, with ``c * c * scale = 1e4``.
  An unused slot's logit is then ``1e4`` below what it would be, and its softmax weight underflows to exactly 0;
  every other logit is unchanged. ``c`` (about 300) is exact in float16 and bfloat16, so the mask is exact in those
  KV caches too (an fp8 cache is refused at start-up, `path.py`). The cost: layers ``< k`` keep K/V for the
  long layout (4x a tile's LR tokens) at the larger head size.
- **Positions** come per token from vLLM's per-request position rows (`positions.py`): the long layout's RoPE index
  for layers ``>= k``, the short layout's (with the unused-slot flag) for layers ``< k``, each tile slot's index for
  layer ``k``. `KeyBiasRotary` (the rotary embedding of layers ``< k``) reads the flag and writes the extra query and
  key dimensions, so the mask needs no state outside the step's own inputs.
- **Layer k** upsamples each tile's LR states (slots ``< short``) to the long grid and adds the HR projector's
  output, in place over the tile's slots: a gather from fixed tables (`layers.UpsampleTable`), no data-dependent
  shapes. The whole tile must be in the step: on this path LVTC checkpoints run with vLLM's
  `disable_chunked_mm_input` (an image is never split between scheduler steps) and without prefix caching (a cache
  hit could end inside an image), and a step holds the largest image; `config_hook.LVTCConfigHook` sets all three.
- **The projectors' outputs** travel through vLLM's encoder cache as one wide row per slot
  (``[LR input | HR | extra LR projectors]``, `tile_rows`) and then in vLLM's embedding buffer, widened to that row
  (`projection_dim`, set by the config hook): `embed_input_ids` writes the row of each token (zeros past the LLM input
  for text), `forward` splits it.

Prompt logprobs at image slots are per long-layout slot (vLLM scores every scheduled token); transformers averages
each tile back to its short layout instead. Decoded tokens and their logprobs are the same as transformers'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile

from .layers import LVTCLayers
from .positions import MASKED, read_rows

if TYPE_CHECKING:
    from vllm.config import VllmConfig

#: How far below every other logit an unused slot's logit is put (exp underflows to 0 in float32, bfloat16, float16).
MASKED_LOGIT = -1.0e4


def padded_head_size(sizes: list[int], head_size: int) -> int:
    """The smallest supported head size above `head_size` (a backend without a fixed list: 8 more)."""
    larger = sorted(size for size in sizes if size > head_size)
    return larger[0] if larger else head_size + 8


#: The head sizes vLLM 0.32's GPU attention backends list (`get_supported_head_sizes`, read in their source):
#: FlashAttention and Triton list none (they take any multiple of 8), so the masked path pads by 8; FlashInfer lists
#: these, so 128 goes to 256 (tests/test_vllm_plugin.py checks the lists where the backends import).
GPU_BACKEND_HEAD_SIZES = {"FlashAttention or Triton": [], "FlashInfer": [64, 128, 256, 512]}


def masked_kv_ratio(num_layers: int, expand_layer: int, head_size: int, padded: int) -> float:
    """The KV cache the masked path holds per image token against an uncompressed checkpoint of the same LLM (the long
    layout in every layer at the LLM's head size): the layers below k hold it at the padded head size."""
    return (expand_layer * padded + (num_layers - expand_layer) * head_size) / (num_layers * head_size)


def masked_cost(num_layers: int, expand_layer: int, head_size: int, backends: dict[str, list[int]]) -> str:
    """The masked path's KV cost in words, per backend (`backends`: name -> its listed head sizes), e.g. "head size
    in layers 0-13 of 28 padded 128 -> 160 on vLLM's CPU attention (KV per image token 1.12x an uncompressed
    checkpoint's, the same LLM at the long layout)"."""
    if expand_layer < 1:
        return "no layer below k: the KV of an uncompressed checkpoint"
    layers = f"layers 0-{expand_layer - 1}" if expand_layer > 1 else "layer 0"
    parts = []
    for name, sizes in backends.items():
        padded = padded_head_size(sizes, head_size)
        ratio = masked_kv_ratio(num_layers, expand_layer, head_size, padded)
        what = (f"KV per image token {ratio:.2f}x an uncompressed checkpoint's, the same LLM at the long layout"
                if not parts else f"{ratio:.2f}x")
        parts.append(f"{head_size} -> {padded} on {name} ({what})")
    return f"head size in {layers} of {num_layers} padded " + ", ".join(parts)


def _supported_head_sizes(backend) -> list[int]:
    getter = getattr(backend, "get_supported_head_sizes", None)
    try:
        return list(getter()) if getter is not None else []
    except Exception:  # a backend without a fixed list
        return []


class KeyBiasRotary(nn.Module):
    """The rotary embedding of a layer below ``k``: RoPE at the short-layout index, then the extra dimensions that
    mask the unused slots' keys (the `MASKED` flag in the index)."""

    def __init__(self, rotary: nn.Module, num_heads: int, num_kv_heads: int, head_size: int, padded: int,
                 scale: float):
        super().__init__()
        self.rotary = rotary
        self.num_heads, self.num_kv_heads, self.head_size, self.extra = num_heads, num_kv_heads, head_size, \
            padded - head_size
        self.bias = (-MASKED_LOGIT / scale) ** 0.5

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        masked = positions >= MASKED
        query, key = self.rotary(positions - MASKED * masked.to(positions.dtype), query, key)
        tokens = query.shape[0]
        query = query.view(tokens, self.num_heads, self.head_size)
        key = key.view(tokens, self.num_kv_heads, self.head_size)
        q_extra = query.new_zeros(tokens, self.num_heads, self.extra)
        q_extra[..., 0] = self.bias
        k_extra = key.new_zeros(tokens, self.num_kv_heads, self.extra)
        k_extra[..., 0] = torch.where(masked, -self.bias, 0.0).to(key.dtype)[:, None]
        return (torch.cat([query, q_extra], -1).reshape(tokens, -1),
                torch.cat([key, k_extra], -1).reshape(tokens, -1))


class KeyBiasAttention(nn.Module):
    """vLLM's Attention at the padded head size (queries and keys come padded from `KeyBiasRotary`; values are
    padded with zeros here and the output cut back)."""

    def __init__(self, old, vllm_config: "VllmConfig"):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        self.num_heads, self.num_kv_heads, self.head_size = old.num_heads, old.num_kv_heads, old.head_size
        self.scale = old.impl.scale
        self.padded = padded_head_size(_supported_head_sizes(old.attn_backend), self.head_size)
        # The layer keeps its name (vLLM binds its KV cache by it); the unpadded one it replaces is dropped.
        vllm_config.compilation_config.static_forward_context.pop(old.layer_name)
        # (a sliding window, which config_hook lets through only where no prompt reaches it, is kept)
        self.attn = Attention(self.num_heads, self.padded, self.scale, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=old.layer_name,
                              per_layer_sliding_window=getattr(old, "sliding_window", None))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        tokens, extra = query.shape[0], self.padded - self.head_size
        value = F.pad(value.view(tokens, self.num_kv_heads, self.head_size), (0, extra))
        out = self.attn(query, key, value.reshape(tokens, -1))
        return out.view(tokens, self.num_heads, self.padded)[..., : self.head_size].reshape(tokens, -1)


@support_torch_compile(dynamic_arg_dims={"positions": -1, "inputs_embeds": 0})
class MaskedLayers(LVTCLayers):
    """The LLM's layers on the long layout with the short layout masked in layers ``< k`` (the module docstring), and
    for a checkpoint whose extra LR projectors come without expansion (``k`` = the depth). vLLM compiles its `forward`
    (whole graph: no host reads, no data-dependent Python) unless eager mode is asked for."""

    def __init__(self, *, model, vllm_config: "VllmConfig", switch: int | None, prefix: str = ""):
        super().__init__(model, vllm_config, switch)
        self.max_model_len = vllm_config.model_config.max_model_len
        if self.layout is not None:
            lm = model.language_model.model
            for index in range(self.layout.expand_layer):
                self_attn = lm.layers[index].self_attn
                attn = KeyBiasAttention(self_attn.attn, vllm_config)
                self_attn.rotary_emb = KeyBiasRotary(self_attn.rotary_emb, attn.num_heads, attn.num_kv_heads,
                                                     attn.head_size, attn.padded, attn.scale)
                self_attn.attn = attn

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden, side = inputs_embeds[:, : self.hidden], inputs_embeds[:, self.hidden:]
        if positions.dim() == 2:
            long_positions, short_positions, slot = read_rows(positions, self.layout, self.max_model_len,
                                                              self.switch)
        else:
            long_positions = short_positions = positions
            slot = None
        return self.run_layers(hidden, side, short_positions, long_positions, slot)
