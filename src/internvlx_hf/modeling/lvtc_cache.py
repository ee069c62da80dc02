"""LVTC's caches: the per-prefill `LVTCState` that decoding steps need about the long layout, and the dynamic and static
caches that carry it across steps (and through beam search's reordering, batch expansion and assisted decoding's
cropping).

Saved next to checkpoints as remote code: imports only torch, transformers and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticLayer


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


def lvtc_cache_for(cache: Cache | None, text_config, use_cache: bool) -> Cache | None:
    """The cache this forward fills: the one passed, or a new `InternVLXLVTCCache` where a cache is wanted."""
    if use_cache and cache is None:
        return InternVLXLVTCCache(config=text_config)
    if cache is not None and not isinstance(cache, (DynamicCache, StaticCache)):
        raise NotImplementedError(
            f"LVTC needs a dynamic or static cache (its layers hold different lengths), got {type(cache).__name__}; "
            "leave cache_implementation unset (or use 'dynamic' / 'offloaded' / 'static')."
        )
    return cache


def as_lvtc_cache(cache: Cache) -> Cache:
    """A plain `DynamicCache` / `StaticCache` made the LVTC subclass that carries the prefill's `LVTCState`, in place:
    the caller's object is the one that gets filled (transformers' convention), with its storage and options
    (offloading, past recording for assisted decoding). Caches this package builds are built as the subclass.

    The one place the package changes the class of an object a caller holds: the state must follow the cache through
    beam search's reordering, batch expansion and assisted decoding's cropping, which only the subclass's methods see,
    and a new object would leave the caller's cache unfilled."""
    if isinstance(cache, (InternVLXLVTCCache, InternVLXLVTCStaticCache)):
        return cache
    if type(cache) not in (DynamicCache, StaticCache):
        raise NotImplementedError(
            f"LVTC keeps its layout state on a DynamicCache or StaticCache; got a {type(cache).__name__}. Pass a "
            "transformers.DynamicCache or StaticCache (or none: generate() and forward() create one)."
        )
    if type(cache) is StaticCache:
        InternVLXLVTCStaticCache.check_layers(cache)
        cache.__class__ = InternVLXLVTCStaticCache
    else:
        cache.__class__ = InternVLXLVTCCache
    return cache
