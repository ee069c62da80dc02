"""The saving path's tile arithmetic (`internvlx_hf.vllm.lvtc.tiles`, plain Python: no vLLM needed) against brute
force: each count from an explicit list of a prompt's live tokens, each prefix-cache hit by trying every length, and
every resumed hit against what layer k's upsampling reads (torch's own `F.interpolate`), for blocks of 32, 64 and 128
and several tile geometries (InternVL's 256 -> 1024 per tile among them)."""

from __future__ import annotations

import math
import random
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from internvlx_hf.vllm.lvtc.tiles import RequestTiles, short_block_keys, tile_spans, whole_tiles_end

#: (short, long) slots per tile: InternVL's 448px tiles (16x16 -> 32x32), the vLLM tests' tiny ones (8x8 -> 16x16),
#: and a 4x4 -> 8x8 one small enough to try every hit
GEOMETRIES = [(256, 1024), (64, 256), (16, 64)]
BLOCKS = (32, 64, 128)


def prompt(rng: random.Random, images: list[int], long: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """Tiles of `images` (tiles per image) at random places in a prompt with text between: (spans, length)."""
    spans, index = [], rng.randrange(0, 200)
    for tiles in images:
        for _ in range(tiles):
            spans.append((index, index + long - 1))
            index += long
        index += rng.randrange(1, 150)
    return tuple(spans), index + rng.randrange(0, 100)


def live(spans, short: int, length: int) -> list[int]:
    """The long indexes of the short layout's tokens, in order (every token but each tile's HR-only slots)."""
    hidden = {index for first, last in spans for index in range(first + short, last + 1)}
    return [index for index in range(length) if index not in hidden]


@lru_cache(maxsize=None)
def lr_slots_read(short: int, long: int, mode: str = "bilinear") -> tuple[frozenset, ...]:
    """Per long slot of a tile, the LR slots layer k's upsampling reads (a weight other than 0 in torch's
    `F.interpolate` of each LR slot's indicator)."""
    side, long_side = math.isqrt(short), math.isqrt(long)
    basis = torch.eye(short, dtype=torch.float64).reshape(short, 1, side, side)
    options = {"align_corners": False} if mode == "bilinear" else {}
    weights = F.interpolate(basis, size=(long_side, long_side), mode=mode, **options).reshape(short, long)
    return tuple(frozenset(torch.nonzero(weights[:, slot]).flatten().tolist()) for slot in range(long))


@pytest.mark.parametrize("short,long", GEOMETRIES)
def test_counts_and_indexes_are_the_brute_forces(short, long):
    """`short`, `long_index`, `splits_tile`, `meeting`, `whole_tiles_end` and the short blocks' keys, on random prompts
    of up to 40 tiles, against the explicit list of live tokens (and of each tile's slots)."""
    rng = random.Random(short)
    for _ in range(20):
        spans, length = prompt(rng, [rng.randrange(1, 14) for _ in range(rng.randrange(0, 4))], long)
        tiles = RequestTiles(spans, short, long)
        tokens = live(spans, short, length)
        for n in range(0, length + 1, 7):
            assert tiles.short(n) == sum(index < n for index in tokens), n
            assert tiles.splits_tile(n) == any(first < n <= last for first, last in spans)
            inside = [first for first, last in spans if first < n <= last]
            assert whole_tiles_end(spans, n) == (inside[0] if inside else n)
            for high in (n, n + 1, n + 5, n + long, n + 3 * long + 2):
                assert list(tiles.meeting(n, high)) == [
                    tile for tile, (first, last) in enumerate(spans) if first < high and last >= n], (n, high)
        assert [tiles.long_index(s) for s in range(len(tokens))] == tokens
        for block in BLOCKS:
            hashes = [f"h{index}" for index in range(length // block)]  # a full long block's hash
            keys = short_block_keys(tiles, hashes, len(tokens) // block + 1, block)
            want = []
            for number in range(len(tokens) // block):  # a short block's key: its last token's long block's hash
                holder = tokens[(number + 1) * block - 1] // block
                if holder >= len(hashes):
                    break
                want.append(hashes[holder])
            assert keys == want


def longest_hit_brute(spans, short: int, long: int, max_length: int, held: int, step: int, block: int) -> int:
    """Every length from `max_length` down: one that splits no tile, ends on a multiple of `step` or at a tile's start
    and whose short tokens are held; or one inside a tile's HR-only slots where a step can resume the tile
    (`lr_slots_to_recompute`, slot by slot, checked against torch's weights below) with every short block before its
    LR end's block held."""
    from internvlx_hf.vllm.lvtc.geometry import lr_slots_to_recompute

    hidden = {index for first, last in spans for index in range(first + short, last + 1)}
    before = [0]  # short tokens among the first n long ones, for each n
    for index in range(max_length + long):
        before.append(before[-1] + (index not in hidden))
    starts = [first for first, _ in spans]
    for length in range(max_length, 0, -1):
        inside = [first for first, last in spans if first < length <= last]
        if not inside:
            if (length % step == 0 or length in starts) and before[length] <= held:
                return length
            continue
        first = inside[0]
        lr_end = before[first + short]  # short tokens up to the tile's LR end
        if length - first >= short and held >= lr_end - lr_end % block \
                and lr_slots_to_recompute(length - first, lr_end, short, long, block):
            return length
    return 0


@pytest.mark.parametrize("short,long", GEOMETRIES)
@pytest.mark.parametrize("block", BLOCKS)
def test_the_longest_hit_is_the_brute_forces(short, long, block):
    """`RequestTiles.longest_hit` with resuming (`block_size`) against a search of every length: the longest that
    splits no tile and ends on a multiple of the step or at a tile's start, with its short tokens held; or that ends
    inside a tile's HR-only slots where the brute force says a step can resume it. On random prompts of 1-3 images,
    for every cached short length around each tile's LR end."""
    rng = random.Random(block + long)
    resumed = 0
    for _ in range(6):
        spans, length = prompt(rng, [rng.randrange(1, 4) for _ in range(rng.randrange(1, 3))], long)
        tiles = RequestTiles(spans, short, long)
        helds = {0, tiles.short(length)}
        for tile, first in enumerate(tiles.starts):
            lr_end = tiles.lr_ends[tile]
            helds |= {max(lr_end - lr_end % block + delta, 0) for delta in (-block, -1, 0, 1, block)}
        max_lengths = {length - 1} | {last - rng.randrange(0, long - short) for _, last in spans}
        for max_length in sorted(m for m in max_lengths if m > 0):
            for held in sorted(helds):
                got = tiles.longest_hit(max_length, held, block, block)
                want = longest_hit_brute(spans, short, long, max_length, held, block, block)
                assert got == want, (spans, max_length, held, got, want)
                resumed += tiles.splits_tile(got)
    assert resumed > 0  # (hits inside a tile were tried)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("short,long", GEOMETRIES)
def test_a_resumed_hit_recomputes_every_lr_slot_layer_k_reads(short, long, mode):
    """At every slot where a step can resume a tile (`lr_slots_to_recompute`, the rule `RequestTiles` searches with),
    for blocks of 32-128 and any LR end: the LR slots the step recomputes (the tile's last `count`) include every one
    that layer k reads for the slots from there on (torch's interpolation weights), the LR slots after the last full
    short block before the LR end (whose K/V the cache does not hold), and their copies are in the step."""
    from internvlx_hf.vllm.lvtc.geometry import lr_slots_to_recompute

    reads = lr_slots_read(short, long, mode)
    first_read = [min(reads[slot]) for slot in range(long)]  # then, from each slot on: the first LR slot read
    for slot in range(long - 2, -1, -1):
        first_read[slot] = min(first_read[slot], first_read[slot + 1])
    resumable = 0
    for block in BLOCKS:
        for lr_end in range(short, short + block):
            for slot in range(short, long):
                count = lr_slots_to_recompute(slot, lr_end, short, long, block)
                if count:
                    resumable += 1
                    assert first_read[slot] >= short - count, (block, lr_end, slot)
                    assert count >= lr_end % block and long - count >= slot
    assert resumable > 0


def test_tile_spans_follow_the_embeds_of_each_item():
    """Each item's tiles from its placeholder's embed positions (a video's frames with text between)."""
    from types import SimpleNamespace

    embeds = torch.tensor([False] + [True] * 8 + [False, False] + [True] * 8)
    feature = SimpleNamespace(mm_position=SimpleNamespace(offset=10, length=19, is_embed=embeds))
    image = SimpleNamespace(mm_position=SimpleNamespace(offset=40, length=4, is_embed=None))
    request = SimpleNamespace(mm_features=[image, feature])
    assert tile_spans(request, 4) == [(11, 14), (15, 18), (21, 24), (25, 28), (40, 43)]
