"""How an LVTC checkpoint's tiles are laid out in the token sequence vLLM schedules."""

from __future__ import annotations

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
    lvtc = config.lvtc_config
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


def row_width(config) -> int:
    """Width of an LVTC checkpoint's per-token rows in vLLM's embedding buffer: the LLM input, then the HR projector's
    output (with expansion), then each extra LR projector's. The LLM's hidden size for other checkpoints."""
    hidden = config.get_text_config().hidden_size
    lvtc = config.lvtc_config
    if lvtc is None:
        return hidden
    return hidden * (1 + (1 if lvtc_geometry_of(config) is not None else 0) + lvtc.num_lr_projectors - 1)
