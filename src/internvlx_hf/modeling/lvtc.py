"""LVTC (Sec. 3.2, Algorithm 1) in transformers: the first ``k`` LLM layers run on the short (LR) layout, layer ``k``
expands each tile's tokens to the long (HR) grid and the layers after it run long. Read top to bottom: `LVTCLayout` and its
builder (the index maps between the two layouts), the attention-kind helpers, then the forward itself:
`prepare_lvtc_step` (each layout's positions, masks and cache for this step), `run_lvtc` (the layers, with
`expand_tiles` at ``k`` and the extra LR projectors' injections, `pool_tiles` after the last) and `scale_to_rms` (the
opt-in HR scaling). The state that remembers the expansion across decoding steps, and the two caches (dynamic,
static) that carry it, are in `lvtc_cache.py`.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, StaticCache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)

from .compat import cache_kwarg, hidden_state_selection
from .lvtc_cache import LVTCState, as_lvtc_cache, lvtc_cache_for
from .outputs import InternVLXModelOutputWithPast


@dataclass
class LVTCLayout:
    """Index maps between the short layout (input ids) and the long layout (layers ``>= k``) of one batch."""

    text_short: torch.Tensor  # flat (b * short_len + j) indices of non-visual tokens
    text_long: torch.Tensor  # their flat indices in the long layout
    visual_short: torch.Tensor  # flat indices of visual tokens, in feature order
    visual_long: torch.Tensor  # flat long indices of the upsampled visual tokens, tile by tile
    long_len: int
    long_mask: torch.Tensor  # (batch, long_len) 1 = real token
    long_position_ids: torch.Tensor  # (batch, long_len)
    position_offset: torch.Tensor  # (batch,) long minus short position after the last token
    text_tail: int  # trailing text tokens every row has after its last visual token / position reset
    short_start: torch.Tensor  # (batch, short_len) first long slot of every short token

    def varlen_kwargs(self, varlen: dict) -> dict:
        """flash-attention varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``) of the short layout, translated
        to the long one: a sequence boundary before short token ``j`` of row ``b`` moves to that token's first long
        slot, the end of the batch to the end of the long batch (the rows are flattened, as flash-attention's varlen
        kernels take them)."""
        batch, short_len = self.short_start.shape
        rows = torch.arange(batch, device=self.short_start.device)[:, None] * self.long_len
        table = torch.cat([(rows + self.short_start).reshape(-1),
                           torch.tensor([batch * self.long_len], device=self.short_start.device)])
        translated = {}
        for side in ("q", "k"):
            cu = varlen[f"cu_seq_lens_{side}"]
            if cu.ndim != 1 or int(cu[0]) != 0 or int(cu[-1]) != batch * short_len or bool((cu.diff() < 0).any()):
                raise ValueError(
                    f"cu_seq_lens_{side} {cu.tolist()} does not describe the flattened batch of {batch} x {short_len} "
                    f"tokens: it must rise from 0 to {batch * short_len}. Pass the boundaries that transformers' "
                    "DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes for these input_ids."
                )
            long_cu = table.to(cu.device)[cu.long()].to(cu.dtype)
            translated[f"cu_seq_lens_{side}"] = long_cu
            translated[f"max_length_{side}"] = int(long_cu.diff().max())
        return translated


def image_token_runs(image_mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every run of consecutive image tokens, row by row (the order features fill them)."""
    padded = F.pad(image_mask.long(), (1, 1))
    change = padded[:, 1:] - padded[:, :-1]
    starts = (change == 1).nonzero().tolist()
    ends = (change == -1).nonzero().tolist()
    return [(row, start, end - start) for (row, start), (_, end) in zip(starts, ends)]


def check_whole_tiles(image_mask: torch.Tensor, tokens_per_tile: int) -> None:
    """Every run of image tokens must hold whole tiles: a run of 6 and a run of 2 (4 per tile) has 8 tokens in all
    but splits a tile between two images."""
    for row, start, length in image_token_runs(image_mask):
        if length % tokens_per_tile:
            raise ValueError(
                f"Row {row} has a run of {length} image tokens at position {start}, which is not a whole number of "
                f"tiles ({tokens_per_tile} image tokens per tile): each image needs image_seq_length x its tile "
                "count. Build the prompt with the InternVLX processor (its image_seq_length must be the model's)."
            )


# The layout is data-dependent through and through (where the image tokens are decides every index map and the long
# length): under torch.compile it runs eagerly as one unit, one graph break instead of one per `nonzero` / `.item()`.
# (No `reason=`: older torch releases lack that argument, and this file must import on every torch from 2.4 on.)
@torch.compiler.disable
def build_lvtc_layout(
    image_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    short_tokens_per_tile: int,
    long_tokens_per_tile: int,
) -> LVTCLayout:
    """Plan the long layout. Each tile's run of LR tokens becomes a run of HR tokens; text stays one slot.

    Rows grow by different amounts (different tile counts); the shorter rows are re-padded on the *left*, so
    that the last real token of every row stays the last slot (what left-padded generation needs) and
    right-padded training rows keep working (the 2D mask and positions describe any padding). Positions follow
    the short layout's own positions (so packed sequences with position resets stay packed): a text token moves
    by the number of extra visual slots before it in its sequence; a tile's HR tokens take consecutive positions
    from where its LR run started.
    """
    batch, short_len = image_mask.shape
    device = image_mask.device
    check_whole_tiles(image_mask, short_tokens_per_tile)
    expand = long_tokens_per_tile // short_tokens_per_tile
    slots = torch.where(image_mask, expand, 1)
    row_long_len = slots.sum(-1)
    long_len = int(row_long_len.max())
    left_pad = long_len - row_long_len  # extra left padding per row
    start = torch.cumsum(slots, -1) - slots + left_pad[:, None]  # first long slot of every short token

    # Extra slots created before each token *within its packed sequence* (a position reset starts a sequence).
    extra = torch.where(image_mask, expand - 1, 0)
    extra_before = torch.cumsum(extra, -1) - extra
    seq_start = position_ids == 0
    seq_start[:, 0] = True
    seq_id = torch.cumsum(seq_start.long(), -1)
    # extra_before at the start of each sequence, broadcast to its tokens (seq ids are increasing per row).
    base = torch.zeros(batch, short_len + 1, dtype=extra_before.dtype, device=device)
    base.scatter_(1, torch.where(seq_start, seq_id, 0), torch.where(seq_start, extra_before, 0))
    extra_before = extra_before - torch.gather(base, 1, seq_id)

    rows = torch.arange(batch, device=device)[:, None].expand(batch, short_len)
    text = ~image_mask
    flat_short = rows * short_len + torch.arange(short_len, device=device)
    text_short = flat_short[text]
    text_long = (rows * long_len + start)[text]

    # Visual tokens: tile t's LR run starts at short token j0; its HR run fills start[j0] .. start[j0] + HR - 1.
    tile_first = image_mask.clone()
    tile_first[image_mask] = (torch.arange(int(image_mask.sum()), device=device) % short_tokens_per_tile) == 0
    tile_rows, tile_cols = tile_first.nonzero(as_tuple=True)
    hr_range = torch.arange(long_tokens_per_tile, device=device)
    visual_long = (tile_rows * long_len + start[tile_rows, tile_cols])[:, None] + hr_range
    visual_short = flat_short[image_mask]

    long_mask = torch.zeros(batch, long_len, dtype=torch.long, device=device)
    short_mask = attention_mask.long() if attention_mask is not None else torch.ones_like(slots)
    long_mask.view(-1)[text_long] = short_mask[text]
    tile_mask = short_mask[tile_rows, tile_cols][:, None].expand_as(visual_long)
    long_mask.view(-1)[visual_long.reshape(-1)] = tile_mask.reshape(-1)

    long_positions = torch.zeros(batch, long_len, dtype=position_ids.dtype, device=device)
    long_positions.view(-1)[text_long] = (position_ids + extra_before)[text]
    tile_pos = (position_ids + extra_before)[tile_rows, tile_cols]
    long_positions.view(-1)[visual_long.reshape(-1)] = (tile_pos[:, None] + hr_range).reshape(-1).to(
        position_ids.dtype)

    # The extra left padding gets positions 0, 1, ... that do not run on into the row's first token, so when no
    # 2D mask is used (packed rows without an attention mask) transformers' packed-sequence detection, which
    # splits wherever positions do not step by one, keeps the padding in a sequence of its own.
    slot = torch.arange(long_len, device=device)[None]
    pad_positions = slot + (position_ids[:, :1] == left_pad[:, None]).to(slot.dtype)
    long_positions = torch.where(slot < left_pad[:, None], pad_positions.to(long_positions.dtype), long_positions)

    # Later tokens continue the row's last sequence: shift by all extra slots of that sequence.
    position_offset = (extra_before + extra)[:, -1]
    index = torch.arange(short_len, device=device)
    boundary = torch.maximum(torch.where(image_mask, index, -1).amax(-1), torch.where(seq_start, index, 0).amax(-1))
    text_tail = int((short_len - 1 - boundary).min())
    return LVTCLayout(text_short, text_long, visual_short, visual_long.reshape(-1), long_len, long_mask,
                      long_positions, position_offset, text_tail, start)


# flash-attention's precomputed varlen boundaries (transformers' `FlashAttentionKwargs`).
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Mask builders per attention kind, as the LLMs' own forwards choose them.
_MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def lvtc_layer_types(text_config, depth: int) -> list[str]:
    """The attention kind of every LLM layer. Configs without ``layer_types`` but with a ``sliding_window``
    (Mistral, Phi-3) slide the window in every layer, which is also what transformers' caches infer from them."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is None:
        sliding = getattr(text_config, "sliding_window", None) is not None
        layer_types = ["sliding_attention" if sliding else "full_attention"] * depth
    unsupported = sorted(set(layer_types[:depth]) - set(_MASK_FUNCTIONS))
    if unsupported:
        raise NotImplementedError(
            f"LVTC supports LLM layers of kinds {sorted(_MASK_FUNCTIONS)}; this LLM also has {unsupported}. "
            "Use the model without lvtc (lvtc=None)."
        )
    return list(layer_types[:depth])


def _attention_weight_modules(language_model, depth: int) -> list[tuple[nn.Module, int]]:
    """``(module, output index)`` pairs that emit each layer's attention weights, as the LLM declares them for
    transformers' output capturing (``_can_record_outputs["attentions"]``), in layer order."""
    spec = (getattr(language_model, "_can_record_outputs", None) or {}).get("attentions")
    specs = spec if isinstance(spec, list) else [spec]
    found = []
    for layer in language_model.layers[:depth]:
        for module in layer.modules():
            for item in specs:
                target = getattr(item, "target_class", item)
                if isinstance(target, type) and isinstance(module, target):
                    found.append((module, getattr(item, "index", 1)))
    if not found:  # no declaration: the decoder layers' `self_attn` returns (output, weights), as in Llama
        found = [(layer.self_attn, 1) for layer in language_model.layers[:depth]]
    return found


# ------------------------------------------------------------------------------------------ the forward (Algorithm 1)


class LVTCStep(NamedTuple):
    """What one forward of an LVTC model runs on (`prepare_lvtc_step`): the cache, and each layout's positions, 2D
    mask and flash-attention varlen boundaries (short for layers ``< k``, long from ``k`` on). ``layout``, the index
    maps of the expansion at ``k`` and of the pooling after the last layer, is the prefill's; a decoding step has none.
    (A NamedTuple: `torch.compile` traces it without a graph break.)"""

    prefill: bool
    cache: Cache | None
    use_cache: bool
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    long_position_ids: torch.Tensor
    long_mask: torch.Tensor | None
    layout: LVTCLayout | None
    varlen: dict
    long_varlen: dict


def _pop_varlen(kwargs: dict) -> dict:
    """The flash-attention varlen boundaries of packed rows (transformers' DataCollatorWithFlattening passes them),
    taken out of ``kwargs``: they describe the short layout, and layers ``>= k`` get their long-layout translation."""
    varlen = {key: kwargs.pop(key) for key in _VARLEN_KWARGS if key in kwargs}
    varlen = {key: value for key, value in varlen.items() if value is not None}
    if varlen and ("cu_seq_lens_q" not in varlen or "cu_seq_lens_k" not in varlen):
        raise ValueError(
            f"Got {sorted(varlen)} without both cu_seq_lens_q and cu_seq_lens_k: LVTC translates the sequence "
            "boundaries to its long layout and needs both (transformers' "
            "DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes all four)."
        )
    return varlen


def prepare_lvtc_step(config, inputs_embeds: torch.Tensor, image_mask: torch.Tensor, attention_mask, position_ids,
                      cache: Cache | None, past_length, use_cache: bool, kwargs: dict,
                      has_images: bool) -> LVTCStep:
    """Each layout's positions, masks and varlen boundaries for this forward, and its cache. A prefill builds the
    layout (`build_lvtc_layout`) and records its `LVTCState` on the cache; a decoding step reads that state back.
    (The layout is built here, one call below the model's forward: `torch.compile` breaks the graph at it once per
    enclosing frame.)"""
    text_config = config.get_text_config()
    k = config.lvtc.expand_layer
    varlen = _pop_varlen(kwargs)
    cache = lvtc_cache_for(cache, text_config, use_cache)
    static = isinstance(cache, StaticCache)
    batch, short_len, _ = inputs_embeds.shape
    if position_ids is None:
        # (a static cache's length is a tensor: added, not passed to arange, so a compiled step stays one graph)
        position_ids = (torch.arange(short_len, device=inputs_embeds.device) + past_length)[None].expand(batch, -1)
    elif position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    # A static cache's length is a tensor, which a compiled step cannot branch on: its LVTC state tells instead (set
    # by the prefill, cleared by reset()).
    prefill = getattr(cache, "lvtc_state", None) is None if static else past_length == 0
    if not prefill:
        if has_images and bool(image_mask.any()):
            raise ValueError("LVTC takes images in the prefill step only (the first forward of a cache).")
        if varlen:
            raise ValueError(
                "cu_seq_lens_q / cu_seq_lens_k describe packed sequences of a prefill; an LVTC decoding step (a cache "
                "that holds tokens) takes none: pass attention_mask / position_ids instead."
            )
        long_mask, long_position_ids = _decoding_long_layout(cache, attention_mask, position_ids, past_length,
                                                             short_len)
        return LVTCStep(False, cache, use_cache, position_ids, attention_mask, long_position_ids, long_mask, None,
                        {}, {})
    if cache is not None:
        as_lvtc_cache(cache)
    if static and not torch.compiler.is_compiling() and bool(past_length > 0):
        raise ValueError(
            "This static cache holds tokens but no LVTC state: pass the cache this model's prefill filled, or call "
            "reset() on it before a new prompt."
        )
    layout = build_lvtc_layout(image_mask, attention_mask, position_ids, config.image_seq_length,
                               config.hr_tokens_per_tile)
    if static:
        cache.size_long_layers(k, layout.long_len - short_len)
    # Packed rows (position resets, no mask, no cache) are told apart by their positions only, as in the LLM's own
    # forward; a 2D mask would switch that detection off and let the sequences see each other.
    packed = attention_mask is None and cache is None and find_packed_sequence_indices(position_ids) is not None
    long_mask = None if attention_mask is None and (packed or bool((layout.long_mask == 1).all())) else layout.long_mask
    if cache is not None:
        cache.lvtc_state = LVTCState(layout.long_mask, short_len, layout.position_offset, layout.text_tail)
    return LVTCStep(True, cache, use_cache, position_ids, attention_mask, layout.long_position_ids, long_mask, layout,
                    varlen, layout.varlen_kwargs(varlen) if varlen else {})


def _decoding_long_layout(cache, attention_mask, position_ids, past_length, short_len: int):
    """A decoding step's long-layout 2D mask and positions: the prefill's (`LVTCState`) followed by this step's."""
    state: LVTCState | None = getattr(cache, "lvtc_state", None)
    if state is None:
        raise ValueError(
            "This cache holds tokens but no LVTC state: pass the past_key_values returned by this model's prefill "
            "forward (an InternVLXLVTCCache), not a cache filled elsewhere."
        )
    batch, device = position_ids.shape[0], position_ids.device
    if attention_mask is not None:
        tail = attention_mask[:, state.short_prefix_len:]
    else:
        # Every token is real. A static cache gets all the slots its short layers have after the prompt (the causal
        # mask hides those not yet written): a length known without reading its tensor fill level.
        tail_len = (cache.layers[0].max_cache_len if isinstance(cache, StaticCache) else past_length + short_len)
        tail = torch.ones(batch, tail_len - state.short_prefix_len, dtype=torch.long, device=device)
    long_mask = torch.cat([state.long_prefix_mask.to(device), tail.to(state.long_prefix_mask.dtype)], -1)
    return long_mask, position_ids + state.position_offset.to(device)[:, None]


def run_lvtc(language_model, config, step: LVTCStep, inputs_embeds: torch.Tensor, image_mask: torch.Tensor,
             features, output_attentions: bool, output_hidden_states, **kwargs) -> InternVLXModelOutputWithPast:
    """Algorithm 1 over the LLM's layers: layers ``< k`` on the short layout, layer ``k``'s input expanded
    (`expand_tiles`), the extra LR projectors' features added at their layers, layers ``>= k`` on the long layout,
    and after the last layer each tile pooled back to the short layout (`pool_tiles`), so outputs line up with the
    input ids. ``features``: the prefill's `InternVLXImageFeatures` (None without images)."""
    lm, text_config, lvtc = language_model, config.get_text_config(), config.lvtc
    k, depth = lvtc.expand_layer, len(language_model.layers)
    layer_types = lvtc_layer_types(text_config, depth)
    cache, prefill = step.cache, step.prefill

    def masks_for(layers, hidden, mask_2d, positions) -> dict[str, torch.Tensor | None]:
        """One mask per attention kind among ``layers`` (built for the first layer of that kind)."""
        masks = {}
        for idx in layers:
            kind = layer_types[idx]
            if kind not in masks:
                masks[kind] = _MASK_FUNCTIONS[kind](config=text_config, inputs_embeds=hidden, attention_mask=mask_2d,
                                                    position_ids=positions, layer_idx=idx, **cache_kwarg(cache))
        return masks

    injections = {}
    if prefill and features is not None:
        for layer_idx, extra in zip(lvtc.injection_layers, features.extra_lr_features):
            injections[layer_idx] = extra.reshape(-1, extra.shape[-1])
    hidden = inputs_embeds
    selection = hidden_state_selection(output_hidden_states, depth + 1)
    all_hidden = [] if output_hidden_states else None
    attentions, hooks = [], []
    if output_attentions:
        for module, index in _attention_weight_modules(lm, depth):
            def record(_module, _args, output, index=index):
                if isinstance(output, tuple) and output[index] is not None:
                    attentions.append(output[index])
            hooks.append(module.register_forward_hook(record))
        kwargs["output_attentions"] = True  # the attention backends warn when they cannot return weights
    masks = masks_for(range(min(k, depth)), inputs_embeds, step.attention_mask, step.position_ids)
    positions, rope = step.position_ids, lm.rotary_emb(inputs_embeds, position_ids=step.position_ids)
    try:
        for idx, layer in enumerate(lm.layers[:depth]):
            if idx == k:
                if prefill:
                    hidden = expand_tiles(hidden, step.layout, features, config, lvtc.upsample_mode, lvtc.hr_scale)
                masks = masks_for(range(k, depth), hidden if prefill else inputs_embeds, step.long_mask,
                                  step.long_position_ids)
                positions = step.long_position_ids
                rope = lm.rotary_emb(hidden, position_ids=positions)
            elif idx in injections:
                extra = torch.zeros_like(hidden).masked_scatter(image_mask[..., None].to(hidden.device),
                                                                injections[idx].to(hidden.device, hidden.dtype))
                hidden = hidden + extra
            if all_hidden is not None:
                all_hidden.append(hidden if selection is None or len(all_hidden) in selection else None)
            hidden = layer(hidden, attention_mask=masks[layer_types[idx]], position_ids=positions,
                           use_cache=step.use_cache, position_embeddings=rope, **cache_kwarg(cache), **kwargs,
                           **(step.varlen if idx < k else step.long_varlen))
    finally:
        for hook in hooks:
            hook.remove()
    if prefill and k < depth:
        hidden = pool_tiles(hidden, step.layout, inputs_embeds.shape[1], config)
    hidden = lm.norm(hidden)
    if all_hidden is not None:
        all_hidden.append(hidden if selection is None or len(all_hidden) in selection else None)
    return InternVLXModelOutputWithPast(
        last_hidden_state=hidden,
        **cache_kwarg(cache if step.use_cache else None),
        hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        attentions=tuple(attentions) if output_attentions else None,
        image_hidden_states=features.pooler_output if features is not None else None,
    )


def _tile_sides(config) -> tuple[int, int]:
    """The LR and HR token grids' sides of one tile (16 and 32 for InternVL's 448 px tiles)."""
    return round(config.image_seq_length**0.5), round(config.hr_tokens_per_tile**0.5)


def expand_tiles(hidden: torch.Tensor, layout: LVTCLayout, features, config, mode: str,
                 hr_scale: str = "none") -> torch.Tensor:
    """Layer k: upsample each tile's LR states 2D and add the HR projector output (residual, Sec. 3.2)."""
    side1, side2 = _tile_sides(config)
    batch, short_len, dim = hidden.shape
    device = hidden.device  # layer k-1's device: with a device_map the layout may live elsewhere
    flat = hidden.reshape(-1, dim)
    index, source = layout.text_long.to(device), flat[layout.text_short.to(device)]
    if layout.visual_short.numel():  # a text-only batch has no tile to expand
        tiles = flat[layout.visual_short.to(device)].reshape(-1, side1, side1, dim).permute(0, 3, 1, 2)
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        up = F.interpolate(tiles, size=(side2, side2), mode=mode, **kwargs).permute(0, 2, 3, 1).reshape(-1, dim)
        hr = features.hr_features.reshape(-1, dim).to(device, up.dtype)
        if hr_scale == "rms":  # opt-in (LVTCConfig.hr_scale): HR enters at the LR state's scale, per token
            hr = scale_to_rms(hr, up)
        up = up + hr
        index, source = torch.cat([index, layout.visual_long.to(device)]), torch.cat([source, up])
    long = flat.new_zeros(batch * layout.long_len, dim).index_copy(0, index, source)
    return long.reshape(batch, layout.long_len, dim)


def pool_tiles(hidden: torch.Tensor, layout: LVTCLayout, short_len: int, config) -> torch.Tensor:
    """After the last layer: average each tile's HR states back to LR so outputs line up with input_ids."""
    side1, side2 = _tile_sides(config)
    batch, _, dim = hidden.shape
    device = hidden.device
    flat = hidden.reshape(-1, dim)
    index, source = layout.text_short.to(device), flat[layout.text_long.to(device)]
    if layout.visual_long.numel():
        tiles = flat[layout.visual_long.to(device)].reshape(-1, side2, side2, dim).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(tiles, (side1, side1)).permute(0, 2, 3, 1).reshape(-1, dim)
        index, source = torch.cat([index, layout.visual_short.to(device)]), torch.cat([source, pooled])
    short = flat.new_zeros(batch * short_len, dim).index_copy(0, index, source)
    return short.reshape(batch, short_len, dim)


def scale_to_rms(hr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``hr`` rescaled, per token, to the RMS of ``reference`` (``LVTCConfig.hr_scale="rms"``: the HR projector's
    output enters the residual at the scale of the upsampled LR states)."""
    reference_rms = reference.float().pow(2).mean(-1, keepdim=True).sqrt()
    return hr * (reference_rms * torch.rsqrt(hr.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(hr.dtype)
