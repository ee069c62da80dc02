"""A request's tiles in the token sequence vLLM schedules (its long layout), and the short layout's arithmetic on them:
how many short-layout tokens a long count holds, where a prefix-cache hit may end, and each short block's cache key.

Plain Python (no torch, no vLLM), used by the saving path's scheduler and KV manager (`saving/scheduler.py`,
`saving/kv_cache.py`) on every request of every step: each count is a bisection over the tiles' prefix sums,
O(log tiles), and a hit inside a tile is found row by row of the tile's long grid, not slot by slot.
tests/test_lvtc_tiles.py checks each against a brute force.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .geometry import recomputed_lr_slots


def tile_spans(request, long_per_tile: int) -> list[tuple[int, int]]:
    """`(first, last)` long-layout index of each tile of a vLLM request (its `mm_features`), in order."""
    spans = []
    for feature in request.mm_features or ():
        place = feature.mm_position
        embeds = range(place.offset, place.offset + place.length)
        if place.is_embed is not None:
            embeds = [index for index, keep in zip(embeds, place.is_embed.tolist()) if keep]
        embeds = list(embeds)
        spans += zip(embeds[::long_per_tile], embeds[long_per_tile - 1::long_per_tile])
    return sorted(spans)


def whole_tiles_end(spans: Sequence[tuple[int, int]], end: int) -> int:
    """The latest chunk end (exclusive) at or before `end` that leaves no tile split: a tile's first index where `end`
    falls inside one."""
    index = bisect.bisect_right(spans, (end, end)) - 1  # the last tile that starts at or before `end`
    if index >= 0 and spans[index][0] < end <= spans[index][1]:
        return spans[index][0]
    return end


@dataclass(frozen=True)
class RequestTiles:
    """A request's tiles in its long layout (`tile_spans`: consecutive slots, in order), and what the short layout
    makes of them: each tile's first `short_per_tile` slots are live (its LR slots), the rest HR-only."""

    spans: tuple[tuple[int, int], ...]
    short_per_tile: int
    long_per_tile: int
    #: each tile's first long index
    starts: tuple[int, ...] = field(init=False, repr=False)
    #: the short position of each tile's first HR-only slot (where the tile's LR slots end), increasing
    lr_ends: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unused = self.long_per_tile - self.short_per_tile
        starts = tuple(first for first, _ in self.spans)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "lr_ends", tuple(first - tile * unused + self.short_per_tile
                                                  for tile, first in enumerate(starts)))

    @classmethod
    def of(cls, request, short_per_tile: int, long_per_tile: int) -> "RequestTiles":
        return cls(tuple(tile_spans(request, long_per_tile)), short_per_tile, long_per_tile)

    def short(self, num_tokens: int) -> int:
        """Short-layout tokens among the first `num_tokens` long-layout ones."""
        unused = self.long_per_tile - self.short_per_tile
        passed = bisect.bisect_right(self.starts, num_tokens - self.long_per_tile)  # tiles wholly before the end
        hidden = passed * unused
        if passed < len(self.starts):  # the one tile the end may fall in
            hidden += min(max(num_tokens - self.starts[passed] - self.short_per_tile, 0), unused)
        return num_tokens - hidden

    def long_index(self, short_position: int) -> int:
        """The long-layout index of the token at a short-layout position (each earlier tile's HR-only slots before
        it)."""
        before = bisect.bisect_right(self.lr_ends, short_position)
        return short_position + before * (self.long_per_tile - self.short_per_tile)

    def meeting(self, low: int, high: int) -> range:
        """The indexes of the tiles with a slot in the long indexes ``[low, high)`` (a step's tokens of the request)."""
        starts = self.starts
        first = bisect.bisect_right(starts, low - self.long_per_tile)  # the first tile ending at or after `low`
        if first == len(starts) or starts[first] >= high:  # (none: a decode, a chunk of text)
            return range(first, first)
        return range(first, bisect.bisect_left(starts, high, first))

    def splits_tile(self, num_tokens: int) -> bool:
        index = bisect.bisect_left(self.starts, num_tokens) - 1  # the last tile that starts before `num_tokens`
        return index >= 0 and num_tokens <= self.spans[index][1]

    def longest_hit(self, max_length: int, held_short: int, step: int, block_size: int | None = None) -> int:
        """The most long-layout tokens, at most `max_length`, whose short-layout tokens are among the first
        `held_short`, that end on a multiple of `step` or at a tile's start and split no tile; or, with `block_size`
        (the short group's), that end inside a tile's HR-only slots where a step can resume it (`resume_point`)."""
        if held_short <= 0:
            return 0
        # short() only grows, and stays at `held_short` up to the long index of the next short token
        bound = min(max_length, self.long_index(held_short))
        last_start = bisect.bisect_right(self.starts, bound) - 1
        best = max(whole_tiles_end(self.spans, bound // step * step),
                   self.starts[last_start] if last_start >= 0 else 0)
        if block_size is not None:
            best = max(best, self.resume_point(max_length, held_short, block_size, above=best))
        return best

    def resume_point(self, max_length: int, held_short: int, block_size: int, above: int = 0) -> int:
        """The latest long index above `above` and at most `max_length` inside a tile's HR-only slots where a step
        can resume the tile (`geometry.lr_slots_to_recompute`: it recomputes the LR slots layer k reads, from copies
        in the tile's last HR-only slots), with the short blocks before the tile's LR end's block among the first
        `held_short` short tokens; 0 if none. A hit that ends after an image by less than a block (another question
        about the same picture) then re-prefills the few slots after the hit, not the image's last tile."""
        short, long = self.short_per_tile, self.long_per_tile
        if long - short < short:  # (no room in the HR-only slots for a copy of the LR slots)
            return 0
        # the last tile with an HR-only slot at most max_length, among those whose blocks before their LR end's
        # block are held (that bound grows with the tile)
        by_length = bisect.bisect_right(self.starts, max_length - short)
        by_blocks = bisect.bisect_right(self.lr_ends, (held_short // block_size + 1) * block_size - 1)
        for tile in range(min(by_length, by_blocks) - 1, -1, -1):
            first, last = self.spans[tile]
            if last <= above:
                break
            slot = self._latest_resumable_slot(self.lr_ends[tile], block_size,
                                               low=max(short, above - first + 1), high=min(max_length - first,
                                                                                           long - 1))
            if slot is not None:
                return first + slot
        return 0

    def _latest_resumable_slot(self, short_end: int, block_size: int, low: int, high: int) -> int | None:
        """The latest slot in ``[low, high]`` where a step can resume a tile whose LR slots end at short position
        `short_end`: the LR slots it recomputes (`recomputed_lr_slots`, one count per row of the long grid) fit in
        the tile and their copies lie at or after the slot."""
        short, long = self.short_per_tile, self.long_per_tile
        side = math.isqrt(long)
        for row in range(high // side, low // side - 1, -1):
            count = recomputed_lr_slots(row * side, short_end, short, long, block_size)
            slot = min(row * side + side - 1, high, long - count)
            if count <= short and slot >= max(row * side, low):
                return slot
        return None


def short_block_keys(tiles: RequestTiles, block_hashes, num_blocks: int, block_size: int, first: int = 0) -> list:
    """The prefix-cache key of each of a request's short-group blocks `first` to `num_blocks` - 1: the long-layout
    block hash (vLLM's, chained over every token and image before it) of the block holding the short block's last
    token, which covers everything that block's K/V depends on; as many keys as such long blocks are full."""
    keys = []
    for block in range(first, num_blocks):
        long_block = tiles.long_index((block + 1) * block_size - 1) // block_size
        if long_block >= len(block_hashes):
            break
        keys.append(block_hashes[long_block])
    return keys
