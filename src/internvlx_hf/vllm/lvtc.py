"""LVTC on vLLM: layers below ``k`` on the short layout, layers from ``k`` on the long one, each with a KV cache.

vLLM's V1 engine keeps one token count per request, shared by every KV cache group (`KVCacheCoordinator.
allocate_new_blocks` sizes every group by the same `num_tokens`; one `seq_lens` / `slot_mapping` feeds every layer). So the request is scheduled in the **long** layout: every tile
takes its high-resolution count of slots (1024 per 448px tile), and layers ``>= k`` run on it as on any model, with
vLLM's paged attention and KV cache. Layers ``< k`` must see the short layout (256 tokens per tile); they run on the
same slots, where each tile's first ``short`` slots hold its LR tokens and the others are *unused*:

- **Unused slots are masked out of attention** with vLLM's own attention kernels: layers ``< k`` get an Attention
  whose head size is one supported size larger (64 -> 80, 128 -> 160 on CPU); queries carry a 1 and keys a
  ``-1e4 / scale`` (unused slots) or 0 (every other token) in the extra dimensions, values zeros. An unused slot's
  logit is then ``-1e4`` below what it would be, and its softmax weight underflows to exactly 0; every other logit
  is unchanged. The cost: layers ``< k`` keep K/V for the long layout (4x a tile's LR tokens) at the larger head size.
- **Positions** come per token from vLLM's per-request position rows (its M-RoPE machinery: computed once per request
  from the whole prompt, `get_mrope_input_positions`, and continued by vLLM for decoded tokens): row 0 is the long
  layout's position (layers ``>= k``, exactly transformers' LVTC positions); row 1 the short layout's position plus
  the request's number of unused slots ``E`` (layers ``< k``: RoPE depends on position differences only, and with the
  shift a decoded token's short position is its long one, which is what vLLM continues both rows with); row 2 marks
  tile slots (``-1 - j`` for slot ``j`` of a tile) and is the position elsewhere.
- **Layer k** upsamples each tile's LR states (slots ``< short``) to the long grid and adds the HR projector's
  output, in place over the tile's slots. This needs the whole tile in one forward pass: LVTC checkpoints run with
  vLLM's `disable_chunked_mm_input` (an image is never split between scheduler steps) and without prefix caching
  (a cache hit could end inside an image); `config_hook.LVTCConfigHook` sets both, and lets a step hold the largest
  image. A tile found split anyway stops the request
  with an error, never wrong tokens.
- **The projectors' outputs** travel through vLLM's encoder cache as one wide row per slot
  (``[LR input | HR | extra LR projectors]``, `tile_rows`); `embed_input_ids` puts the LR input into the embeddings
  and keeps the rest for `forward`, which vLLM calls next with the same tokens.

Prompt logprobs at image slots are per long-layout slot (vLLM scores every scheduled token); transformers averages
each tile back to its short layout instead. Decoded tokens and their logprobs are the same as transformers'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.modeling_internvlx import _rms
from .layout import LVTCLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig

#: How far below every other logit an unused slot's logit is put (exp underflows to 0 in float32 and bfloat16).
MASKED_LOGIT = -1.0e4


def lvtc_positions(layout: LVTCLayout | None, length: int, mm_features: list) -> tuple[torch.Tensor, int]:
    """Rows (long position, shifted short position, slot code) of a prompt of `length` long-layout tokens."""
    index = torch.arange(length, dtype=torch.int64)
    if layout is None:
        return index.expand(3, -1).clone(), 0
    code = index.clone()
    unused = torch.zeros(length, dtype=torch.int64)
    for feature in mm_features:
        place = feature.mm_position
        embeds = torch.arange(place.offset, place.offset + place.length)
        if place.is_embed is not None:
            embeds = embeds[place.is_embed.to(torch.bool)]
        slot = torch.arange(embeds.numel()) % layout.long_per_tile
        code[embeds] = -1 - slot
        unused[embeds[slot >= layout.short_per_tile]] = 1
    before = torch.cumsum(unused, 0) - unused
    total = int(unused.sum())
    return torch.stack([index, index - before + total, code]), 0


def _padded_head_size(backend, head_size: int) -> int:
    sizes = []
    getter = getattr(backend, "get_supported_head_sizes", None)
    if getter is not None:
        try:
            sizes = list(getter())
        except Exception:  # a backend without a fixed list
            sizes = []
    larger = sorted(size for size in sizes if size > head_size)
    return larger[0] if larger else head_size + 8


class KeyBiasAttention(nn.Module):
    """vLLM's Attention at a larger head size, whose extra dimensions add a per-key bias to the logits."""

    def __init__(self, old, runner: "LVTCRunner", vllm_config: "VllmConfig"):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        if getattr(old, "sliding_window", None) is not None:
            raise RuntimeError(f"InternVL-X LVTC: {old.layer_name} has a sliding window (refused at config time)")
        self.runner = [runner]  # a list: not a submodule
        self.num_heads, self.num_kv_heads, self.head_size = old.num_heads, old.num_kv_heads, old.head_size
        self.scale = old.impl.scale
        self.padded = _padded_head_size(old.attn_backend, self.head_size)
        # The layer keeps its name (vLLM binds its KV cache by it); the unpadded one it replaces is dropped.
        vllm_config.compilation_config.static_forward_context.pop(old.layer_name)
        self.attn = Attention(self.num_heads, self.padded, self.scale, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=old.layer_name)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        tokens, extra = query.shape[0], self.padded - self.head_size
        query = F.pad(query.view(tokens, self.num_heads, self.head_size), (0, extra))
        query[..., self.head_size] = 1.0
        key = F.pad(key.view(tokens, self.num_kv_heads, self.head_size), (0, extra))
        key[..., self.head_size] = self.runner[0].key_bias[:, None].to(key.dtype) / self.scale
        value = F.pad(value.view(tokens, self.num_kv_heads, self.head_size), (0, extra))
        out = self.attn(query.reshape(tokens, -1), key.reshape(tokens, -1), value.reshape(tokens, -1))
        return out.view(tokens, self.num_heads, self.padded)[..., : self.head_size].reshape(tokens, -1)


class LVTCRunner:
    """Runs the LLM's layers one by one with LVTC's layouts (see the module docstring)."""

    def __init__(self, model, vllm_config: "VllmConfig"):
        self.model = [model]  # a list: the runner is not a submodule of the model it serves
        config = model.config
        self.lvtc = config.lvtc_config
        self.layout: LVTCLayout | None = model.layout
        self.hidden = config.get_text_config().hidden_size
        self.injections = {layer: i for i, layer in enumerate(self.lvtc.injection_layers)}
        self.side: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key_bias: torch.Tensor | None = None
        lm = model.language_model.model
        if self.layout is not None:
            for index in range(self.layout.expand_layer):
                self_attn = lm.layers[index].self_attn
                self_attn.attn = KeyBiasAttention(self_attn.attn, self, vllm_config)

    # ------------------------------------------------------------------------------------------- projector rows

    def tile_rows(self, vit: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """`(tiles, slots, width)`: per slot the LLM input (LR token, zeros in unused slots), then the HR projector's
        output (with expansion), then each extra LR projector's (zeros in unused slots)."""
        model = self.model[0]
        extras = [projector(vit) for projector in model.lvtc_lr_projectors]
        if self.layout is None:
            return torch.cat([lr, *extras], dim=-1)
        tiles, short, dim = lr.shape
        pad = lambda x: torch.cat([x, x.new_zeros(tiles, self.layout.long_per_tile - short, dim)], dim=1)  # noqa
        hr = model.lvtc_hr_projector(vit)
        return torch.cat([pad(lr), hr, *(pad(extra) for extra in extras)], dim=-1)

    def embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal) -> torch.Tensor:
        model = self.model[0]
        embeds = model.language_model.embed_input_ids(input_ids)
        self.side = None
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return embeds
        rows = torch.cat(list(multimodal_embeddings)).to(embeds.dtype)
        mask = is_multimodal.to(embeds.device)
        embeds[mask] = rows[:, : self.hidden]
        side = embeds.new_zeros(embeds.shape[0], rows.shape[1] - self.hidden)
        side[mask] = rows[:, self.hidden:]
        self.side = (side, mask)
        return embeds

    # ------------------------------------------------------------------------------------------------- forward

    def forward(self, input_ids, positions: torch.Tensor, inputs_embeds) -> torch.Tensor:
        lm = self.model[0].language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        tokens, dim = hidden.shape
        side, mask = self.side if self.side is not None and self.side[0].shape[0] == tokens else (None, None)
        self.side = None
        layout = self.layout
        if layout is None:
            short_positions = long_positions = positions
            slot = torch.where(mask, 0, -1) if mask is not None else torch.full_like(positions, -1)
            lr_slots = slot >= 0
            depth_expand = len(lm.layers)
        else:
            long_positions, short_positions, code = positions[0], positions[1], positions[2]
            slot = torch.where(code < 0, -1 - code, -1)
            lr_slots = (slot >= 0) & (slot < layout.short_per_tile)
            self.key_bias = torch.where((slot >= layout.short_per_tile), MASKED_LOGIT, 0.0).to(hidden.dtype)
            depth_expand = layout.expand_layer
        if side is None and bool((slot >= 0).any()):
            raise RuntimeError("InternVL-X LVTC: image slots reached the LLM without their projector rows")
        residual = None
        for index, layer in enumerate(lm.layers):
            if index == depth_expand and layout is not None:
                hidden = hidden + residual if residual is not None else hidden
                residual = None
                hidden = self._expand(hidden, slot, side)
            if index in self.injections and side is not None:
                extra_cols = self._extra_columns(self.injections[index])
                hidden = hidden + torch.where(lr_slots[:, None], side[:, extra_cols], 0.0)
            layer_positions = short_positions if index < depth_expand else long_positions
            hidden, residual = layer(layer_positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden

    def _extra_columns(self, number: int) -> slice:
        start = (number + (1 if self.layout is not None else 0)) * self.hidden
        return slice(start, start + self.hidden)

    def _expand(self, hidden: torch.Tensor, slot: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """Layer k: each tile's LR states upsampled 2D to the long grid, plus the HR projector's output."""
        layout = self.layout
        starts = torch.nonzero(slot == 0).flatten()
        if starts.numel() == 0:
            return hidden
        per_tile = layout.long_per_tile
        index = starts[:, None] + torch.arange(per_tile, device=slot.device)
        if int(index.max()) >= slot.shape[0] or not bool((slot[index] == torch.arange(per_tile)).all()) \
                or int((slot >= 0).sum()) != index.numel():
            raise RuntimeError(
                "InternVL-X LVTC: a tile was split between scheduler steps; LVTC needs whole images per step "
                "(vLLM's disable_chunked_mm_input, no prefix caching), which the plugin sets: do not override them."
            )
        dim = hidden.shape[-1]
        short, long = layout.short_side, layout.long_side
        lr = hidden[index[:, : layout.short_per_tile]].reshape(-1, short, short, dim).permute(0, 3, 1, 2)
        options = {"align_corners": False} if layout.upsample_mode == "bilinear" else {}
        up = F.interpolate(lr, size=(long, long), mode=layout.upsample_mode, **options)
        up = up.permute(0, 2, 3, 1).reshape(-1, dim)
        hr = side[index.flatten(), : self.hidden].to(up.dtype)
        if layout.hr_scale == "rms":
            hr = hr * (_rms(up) * torch.rsqrt(hr.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(hr.dtype)
        hidden = hidden.clone()
        hidden[index.flatten()] = up + hr
        return hidden
