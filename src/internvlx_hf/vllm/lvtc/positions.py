"""Each token's layout and RoPE position, in vLLM's per-request position rows (its M-RoPE machinery).

vLLM computes a request's rows once from its whole prompt (`get_mrope_input_positions`) and continues them for every
decoded token as ``p + delta`` in all three rows (``p``: the token's index, ``delta``: one integer per request). The
plugin needs more per token than one position, and must read it inside ``forward`` without Python state or host
reads (so that torch.compile and CUDA graphs capture it):

- **LVTC** schedules a request in its long layout (`masked.py`, `saving/`). Layers from ``k`` take the long
  position ``p``; layers below ``k`` take the short-layout position ``p - (unused slots before the token)`` and must
  ignore the unused slots; layer ``k`` must know each tile slot's index within its tile.
- **LongRoPE** (Phi-3) in transformers takes, in each forward call, the long factors when the call's largest position
  reaches ``original_max_position_embeddings`` (the switch ``K``), the short ones otherwise: a prompt of more than
  ``K`` tokens is encoded with the long factors, a shorter one with the short factors and its decoded tokens switch
  at position ``K`` (keys already cached keep theirs). vLLM's own LongRoPE takes the long factors for every token once
  ``max_model_len > K``. Each layer group (short and long layout) decides with its own positions.

Prompt tokens (row 2 negative):

- row 0: RoPE index of the long layout: ``p``, plus ``K`` where the long factors apply (vLLM's LongRoPE table holds
  the short factors' rows ``[0, K)`` then the long factors' rows, so ``p + K`` picks the long row of ``p``);
- row 1: RoPE index of the short layout (the same rule on the short position), plus `MASKED` on unused slots;
- row 2: ``-1 - j`` for slot ``j`` of a tile, `PROMPT_TEXT` for every other token.

Decoded tokens: all rows ``p + n * max_model_len`` (``n``: the request's tiles), so that ``p`` and the request's
unused slots ``E = n * (long - short slots per tile)`` (and from them the short position ``p - E``) come back with
integer arithmetic, and each layout's factors follow the rule above. Every value fits in int32 (vLLM's second model
runner keeps the rows in int32): ``n * max_model_len < max_model_len ** 2 / 1024`` for 448px tiles. Rows the runner
pads a batch with (zeros) read as decoded tokens at position 0.
"""

from __future__ import annotations

import torch

from .geometry import LVTCGeometry

#: row 2 of a prompt token outside every tile (below every tile slot's code -1 - j)
PROMPT_TEXT = -(1 << 30)
#: added to the short-layout RoPE index of an unused slot (past any index): its key is masked out
MASKED = 1 << 29


def _rope_index(position: torch.Tensor, long_factors: torch.Tensor | bool, switch: int | None) -> torch.Tensor:
    if switch is None:
        return position
    return position + switch * torch.as_tensor(long_factors, dtype=position.dtype)


def tile_slots(layout: LVTCGeometry, length: int, mm_features: list,
               text_code: int = PROMPT_TEXT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of a prompt of `length` vLLM tokens: its code (``-1 - slot`` for a tile's slot in the long layout,
    ``text_code`` for text), 1 where the slot is HR-only (absent from the short layout), and whether it is a tile's."""
    code = torch.full((length,), text_code, dtype=torch.int64)
    unused = torch.zeros(length, dtype=torch.int64)
    tile = torch.zeros(length, dtype=torch.bool)
    for feature in mm_features:
        place = feature.mm_position
        embeds = torch.arange(place.offset, place.offset + place.length)
        if place.is_embed is not None:
            embeds = embeds[place.is_embed.to(torch.bool)]
        slot = torch.arange(embeds.numel()) % layout.long_per_tile
        code[embeds] = -1 - slot
        tile[embeds] = True
        unused[embeds[slot >= layout.short_per_tile]] = 1
    return code, unused, tile


def position_rows(layout: LVTCGeometry | None, length: int, mm_features: list, max_model_len: int,
                  switch: int | None = None) -> tuple[torch.Tensor, int]:
    """`(rows, delta)` of a prompt of `length` vLLM tokens (see the module docstring); `switch`: LongRoPE's ``K``."""
    index = torch.arange(length, dtype=torch.int64)
    if layout is not None:
        code, unused, _ = tile_slots(layout, length, mm_features)
    else:
        code = torch.full((length,), PROMPT_TEXT, dtype=torch.int64)
        unused = torch.zeros(length, dtype=torch.int64)
    total = int(unused.sum())
    tiles = total // (layout.long_per_tile - layout.short_per_tile) if layout is not None else 0
    short = index - (torch.cumsum(unused, 0) - unused)
    long_row = _rope_index(index, length > switch if switch is not None else False, switch)
    short_row = _rope_index(short, length - total > switch if switch is not None else False, switch)
    return torch.stack([long_row, short_row + MASKED * unused, code]), tiles * max_model_len


def read_rows(rows: torch.Tensor, layout: LVTCGeometry | None, max_model_len: int,
              switch: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(long RoPE index, short RoPE index (+ MASKED on unused slots), tile slot or -1)` per token: tensor arithmetic
    only (no host reads), so the step can be captured."""
    long_row, short_row, code = rows[0], rows[1], rows[2]
    decoded = code >= 0
    position = code % max_model_len
    unused_per_tile = layout.long_per_tile - layout.short_per_tile if layout is not None else 0
    short_position = position - (code // max_model_len) * unused_per_tile
    long_index = torch.where(decoded, _rope_index(position, position >= (switch or 0), switch), long_row)
    short_index = torch.where(decoded, _rope_index(short_position, short_position >= (switch or 0), switch),
                              short_row)
    slot = torch.where((code < 0) & (code > PROMPT_TEXT), -1 - code, -1) if layout is not None \
        else torch.full_like(code, -1)
    return long_index, short_index, slot


# ------------------------------------------------------------------------------------------- the saving path's rows

#: added to row 0 of a prompt whose long layout takes LongRoPE's long factors (past any position and ``K``)
LONG_FACTORS = 1 << 28


def saving_positions(layout: LVTCGeometry, length: int, mm_features: list,
                     switch: int | None = None) -> tuple[torch.Tensor, int]:
    """The saving path's rows (`saving/`) of a prompt of `length` vLLM tokens, and its delta ``-E`` (``E``: its
    HR-only slots), so that a decoded token's rows are all its short position ``s``.

    - row 1: the short position ``s`` (the short layers' metadata builder reads it);
    - row 2: ``-1 - j`` for slot ``j`` of a tile, ``s`` for every other token;
    - row 0: ``s``, plus for LongRoPE (`switch` = ``K``) ``K`` where the short layout takes the long factors and
      `LONG_FACTORS` where the long layout does: per prompt, as transformers decides (`saving_rope_indices`).
    """
    index = torch.arange(length, dtype=torch.int64)
    code, unused, tile = tile_slots(layout, length, mm_features, text_code=1)
    short = index - (torch.cumsum(unused, 0) - unused)
    code = torch.where(tile, code, short)
    total = int(unused.sum())
    first = short.clone()
    if switch is not None:
        first += switch * int(length - total > switch) + LONG_FACTORS * int(length > switch)
    return torch.stack([first, short, code]), -total


def saving_rope_indices(rows: torch.Tensor, long_positions: torch.Tensor,
                        switch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(short layers' RoPE index, long layers' RoPE index)` per token of a step: the short and long positions, and with
    LongRoPE each plus ``K`` where its long factors apply (vLLM's table holds the short factors' rows, then the long
    ones'): for a prompt token, where its prompt's layout passes ``K`` (row 0's flags); for a decoded token (rows all
    ``s``), from its own position on. Tensor arithmetic only."""
    short = rows[1]
    if switch is None:
        return short, long_positions
    flags = rows[0] - short
    long_factors = flags >= LONG_FACTORS
    short_factors = (flags - LONG_FACTORS * long_factors.to(flags.dtype)) > 0
    short_index = short + switch * (short_factors | (short >= switch)).to(short.dtype)
    long_index = long_positions + switch * (long_factors | (long_positions >= switch)).to(long_positions.dtype)
    return short_index, long_index
