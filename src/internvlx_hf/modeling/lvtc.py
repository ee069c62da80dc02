"""LVTC (Sec. 3.2, Algorithm 1): the first ``k`` LLM layers run on the short (LR) layout, layer ``k`` expands each
tile's tokens to the long (HR) grid and the layers after it run long. Read top to bottom: the per-forward state and its
two caches (dynamic, static) that remember the expansion across decoding steps, `LVTCLayout` and its builder (the
index maps between the two layouts), the attention-kind helpers, and `scale_to_rms` (the opt-in HR scaling).

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache, StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


@dataclass
class LVTCState:
    """What decoding steps after an LVTC prefill need to know about the long layout (per batch row).

    Attributes:
        long_prefix_mask: ``(batch, long_prefill_len)`` 2D mask of the prefill in the long layout.
        short_prefix_len: length of the prefill in the short layout (the input ids).
        position_offset: ``(batch,)`` long-layout position minus short-layout position for every later token.
        text_tail: how many of the prefill's last tokens are text of every row's last sequence (no visual token, no
            position reset); they take one slot in both layouts, so a cache crop may remove them.
    """

    long_prefix_mask: torch.Tensor
    short_prefix_len: int
    position_offset: torch.Tensor
    text_tail: int = 0

    def select(self, index: torch.Tensor) -> "LVTCState":
        return LVTCState(self.long_prefix_mask[index], self.short_prefix_len, self.position_offset[index],
                         self.text_tail)

    def drop_prefill_tail(self, tokens: int) -> "LVTCState":
        """The state after the last ``tokens`` tokens of the prefill were cropped from the cache."""
        if tokens > self.text_tail:
            raise ValueError(
                f"Cannot crop {tokens} prefill token(s) from an LVTC cache: only the last {self.text_tail} token(s) "
                "of the prompt are text after its last image (visual tokens take more slots from the expand layer "
                "on, so a crop into them has no consistent long layout). Crop at most that far, or run the prefill "
                "again."
            )
        return LVTCState(self.long_prefix_mask[:, : self.long_prefix_mask.shape[1] - tokens],
                         self.short_prefix_len - tokens, self.position_offset, self.text_tail - tokens)


class InternVLXLVTCCache(DynamicCache):
    """A `DynamicCache` that also carries the `LVTCState` of its prefill.

    Layers ``< k`` cache the short layout and layers ``>= k`` the long one, so the layers hold different lengths;
    the state keeps per-row offsets and the long-layout mask consistent under beam reordering, batch selection and
    cropping. A plain `DynamicCache` handed to an LVTC prefill becomes this class in place (same object, same
    storage and options, e.g. offloading).
    """

    lvtc_state: LVTCState | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.lvtc_state is not None:
            self.lvtc_state = self.lvtc_state.select(beam_idx.to(self.lvtc_state.position_offset.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lvtc_state is not None:
            rows = torch.arange(self.lvtc_state.position_offset.shape[0]).repeat_interleave(repeats)
            self.lvtc_state = self.lvtc_state.select(rows.to(self.lvtc_state.position_offset.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lvtc_state is not None:
            self.lvtc_state = self.lvtc_state.select(indices.to(self.lvtc_state.position_offset.device))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last tokens (assisted / prompt-lookup decoding rejects draft tokens this way).

        ``tokens_to_remove <= 0`` removes that many tokens from every layer (transformers 5's convention): a token
        after the prefill takes one slot in both layouts, so every layer loses the same count and the long layers
        stay aligned with the short ones. A positive value is the older convention, the short-layout length to keep.
        Cropping into the prefill is possible over its text tail only (see `LVTCState.text_tail`).
        """
        length = self.get_seq_length()
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(length - tokens_to_remove, 0)
        state = self.lvtc_state
        into_prefill = remove - (length - state.short_prefix_len) if state is not None else 0
        if into_prefill > 0:
            self.lvtc_state = state.drop_prefill_tail(into_prefill)
        super().crop(-remove)


class InternVLXLVTCStaticCache(StaticCache):
    """A `StaticCache` for LVTC (``generate(..., cache_implementation="static")``, which `torch.compile` needs for a
    ``fullgraph`` decoding step).

    ``max_cache_len`` counts short-layout tokens (the input ids: prompt plus new tokens), the length layers ``< k``
    hold. Layers ``>= k`` hold the long layout, longer by the prompt's extra visual slots, which only the prefill's
    layout knows: the prefill sets their length before they allocate (`size_long_layers`). Each layer writes at its
    own fill level, so the long layers need no shifted write positions; the `LVTCState` of the prefill is kept as in
    `InternVLXLVTCCache`. Full-attention LLMs only (a sliding window layer's length is the window, not the layout). A
    plain `StaticCache` handed to an LVTC prefill becomes this class in place.
    """

    lvtc_state: LVTCState | None = None

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.check_layers()

    def check_layers(self) -> None:
        kinds = sorted({type(layer).__name__ for layer in self.layers if type(layer) is not StaticLayer})
        if kinds:
            raise NotImplementedError(
                f"LVTC's static cache holds full-attention layers only; this LLM's cache also has {kinds}. Leave "
                "cache_implementation unset (LVTC then uses its dynamic cache)."
            )
        # Older transformers releases write a static layer at a `cache_position` the caller passes, one for all
        # layers, which would be wrong for the long layers; the layers that count their own fill level are needed.
        if not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) for layer in self.layers):
            raise NotImplementedError(
                "LVTC's static cache needs a transformers release whose StaticLayer counts its own fill level (it is "
                "tested with 5.23); with this one leave cache_implementation unset (LVTC then uses its dynamic cache)."
            )

    def size_long_layers(self, expand_layer: int, extra_slots: int) -> None:
        """Give layers ``>= expand_layer`` the short length plus the prefill's ``extra_slots`` (long minus short)."""
        needed = self.layers[0].max_cache_len + extra_slots
        for idx, layer in enumerate(self.layers[expand_layer:], start=expand_layer):
            if not layer.is_initialized:
                layer.max_cache_len = needed
            elif layer.max_cache_len < needed:
                raise ValueError(
                    f"This static LVTC cache was allocated for a shorter long layout: layer {idx} holds "
                    f"{layer.max_cache_len} slots, this prompt needs {needed}. Use a new cache for this prompt."
                )

    def reset(self) -> None:
        super().reset()
        self.lvtc_state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.lvtc_state is not None:
            self.lvtc_state = self.lvtc_state.select(beam_idx.to(self.lvtc_state.position_offset.device))


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


def _hidden_state_selection(output_hidden_states, count: int) -> set[int] | None:
    """Indices a list/int ``output_hidden_states`` selects (negative ones count from the end); None = all."""
    if isinstance(output_hidden_states, bool) or output_hidden_states is None:
        return None
    selected = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {i % count for i in selected if -count <= i < count}


def scale_to_rms(hr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``hr`` rescaled, per token, to the RMS of ``reference`` (``LVTCConfig.hr_scale="rms"``: the HR projector's
    output enters the residual at the scale of the upsampled LR states)."""
    reference_rms = reference.float().pow(2).mean(-1, keepdim=True).sqrt()
    return hr * (reference_rms * torch.rsqrt(hr.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(hr.dtype)
