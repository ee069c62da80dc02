"""How an LVTC checkpoint's tiles are laid out in the token sequence vLLM schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LVTCGeometry:
    """LVTC geometry: layers ``< expand_layer`` see ``short_side**2`` tokens per tile, the others ``long_side**2``."""

    expand_layer: int
    short_side: int
    long_side: int
    upsample_mode: str
    hr_scale: str
    injection_layers: tuple[int, ...]

    @property
    def short_per_tile(self) -> int:
        return self.short_side * self.short_side

    @property
    def long_per_tile(self) -> int:
        return self.long_side * self.long_side


def lvtc_geometry_of(config) -> LVTCGeometry | None:
    """The layout of an InternVLXConfig, or None when nothing ever expands (no LVTC, or ``k`` = the LLM's depth)."""
    from ...modeling.configuration_internvlx import LVTCConfig  # (here: importing this module stays torch-free)

    lvtc = LVTCConfig.of(config)
    if lvtc is None or lvtc.expand_layer >= config.get_text_config().num_hidden_layers:
        return None
    grid = config.vision_tokens_per_side
    return LVTCGeometry(
        expand_layer=lvtc.expand_layer,
        short_side=grid // round(1.0 / lvtc.lr_downsample_ratio),
        long_side=grid // round(1.0 / lvtc.hr_downsample_ratio),
        upsample_mode=lvtc.upsample_mode,
        hr_scale=lvtc.hr_scale,
        injection_layers=tuple(lvtc.injection_layers),
    )


def row_width(config, layout: LVTCGeometry | None) -> int:
    """Width of an LVTC checkpoint's per-token rows in vLLM's embedding buffer: the LLM input, then the HR projector's
    output (with expansion: ``layout``, `lvtc_geometry_of`'s, not None), then each extra LR projector's. The LLM's
    hidden size for other checkpoints."""
    from ...modeling.configuration_internvlx import LVTCConfig

    hidden = config.get_text_config().hidden_size
    lvtc = LVTCConfig.of(config)
    if lvtc is None:
        return hidden
    return hidden * (1 + (1 if layout is not None else 0) + lvtc.num_lr_projectors - 1)


def recomputed_lr_slots(slot, short_end, short_per_tile: int, long_per_tile: int, block_size: int):
    """How many of a tile's LR slots (its last ones) a step that resumes the tile at HR-only slot `slot` recomputes,
    before the checks of `lr_slots_to_recompute`. One arithmetic for the scheduler (ints) and the worker's short
    layout (`short_layout`: tensors, one entry per request)."""
    short_side, long_side = math.isqrt(short_per_tile), math.isqrt(long_per_tile)
    first_row = _at_least((slot // long_side) * short_side // long_side - 1, 0)
    return _at_least(short_per_tile - first_row * short_side, short_end % block_size)


def _at_least(value, floor):
    return value.clamp(min=floor) if hasattr(value, "clamp") else max(value, floor)


def lr_slots_to_recompute(slot: int, short_end: int, short_per_tile: int, long_per_tile: int, block_size: int) -> int:
    """How many of a tile's LR slots (its last ones) a step recomputes when it resumes the tile at HR-only slot `slot`
    (a prefix-cache hit that ends there); 0 where it cannot resume there.

    Layer ``k`` upsamples the tile's LR states, which the cache does not hold (it holds their K/V), so the step runs
    the layers below ``k`` again on the LR slots that the long slots from `slot` on read (their LR rows, one more above
    for bilinear), and on those after the last full short block before the tile's LR end (`short_end`, the request's
    short-layout tokens up to it), whose K/V the cache may not hold. Their inputs travel in the tile's last HR-only
    slots (`LVTCLayers.tile_rows`: HR-only slot ``long - short + j`` carries LR slot ``j``'s), so they must be in the
    step: ``slot <= long - count``."""
    if not short_per_tile <= slot < long_per_tile or long_per_tile - short_per_tile < short_per_tile:
        return 0
    count = recomputed_lr_slots(slot, short_end, short_per_tile, long_per_tile, block_size)
    return count if count <= short_per_tile and slot <= long_per_tile - count else 0
