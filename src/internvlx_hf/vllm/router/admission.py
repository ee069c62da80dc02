"""A request's prompt after the router, as transformers' `generate` runs it (`modeling/vir.py` `shorten_prompt`): each
compressed tile keeps its first `kept` placeholders and loses the rest; `<img>`, `</img>`, frame labels and text
stay. Plain Python on vLLM's numbers (prompt ids, each item's offset, length and embedding mask), no vLLM needed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where an image or video sits in a prompt: vLLM's `PlaceholderRange` as plain values (`is_embed`: which of
    its `length` tokens take the encoder's rows; each tile's `per_tile` such tokens in order)."""

    offset: int
    length: int
    is_embed: tuple[bool, ...]


def shortened(prompt_ids: list[int], placements: list[Placement], decisions: list[list[bool]], per_tile: int,
              kept: int) -> tuple[list[int], list[Placement]]:
    """The prompt without each compressed tile's placeholders after its first `kept`, and each item's new placement.

    `placements` in prompt order, `decisions[i]` the tiles of item i (True: compressed). Raises ValueError where an
    item's embedding tokens are not `per_tile` per tile (a prompt the router cannot read)."""
    dropped: set[int] = set()
    for index, (place, tiles) in enumerate(zip(placements, decisions, strict=True)):
        embeds = [place.offset + j for j, flag in enumerate(place.is_embed) if flag]
        if len(embeds) != per_tile * len(tiles):
            raise ValueError(f"item {index} of the prompt has {len(embeds)} image tokens for {len(tiles)} tiles of "
                             f"{per_tile}: the router reads whole tiles")
        for tile, compressed in enumerate(tiles):
            if compressed:
                dropped.update(embeds[tile * per_tile + kept:(tile + 1) * per_tile])
    ids = [token for position, token in enumerate(prompt_ids) if position not in dropped]
    before = _dropped_before(len(prompt_ids), dropped)
    moved = []
    for place in placements:
        flags = tuple(flag for j, flag in enumerate(place.is_embed) if place.offset + j not in dropped)
        moved.append(Placement(offset=place.offset - before[place.offset], length=len(flags), is_embed=flags))
    return ids, moved


def _dropped_before(length: int, dropped: set[int]) -> list[int]:
    counts, running = [], 0
    for position in range(length):
        counts.append(running)
        running += position in dropped
    return counts


def decisions_tag(decisions: list[bool]) -> str:
    """What an item's cache identifier gains (`#vir=` and one digit per tile): vLLM's encoder cache and prefix-cache
    keys then name the item's decisions, which depend on the request's other tiles (the quantile is the request's)."""
    return "#vir=" + "".join("1" if compressed else "0" for compressed in decisions)
