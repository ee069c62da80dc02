"""The LLM's layer loop of LVTC on vLLM, one for both paths (Algorithm 1): layers ``< k`` on the short layout, layer
``k``'s expansion (each tile's LR states upsampled 2D to the long grid, plus the HR projector's output), the extra LR
projectors' injections, layers ``>= k`` on the long layout.

`LVTCLayers.run_layers` is that loop. The default path (`saving/`) runs layers ``< k`` on the step's live tokens
only (a gather index) and holds their K/V in a KV-cache group of its own; the masked path (`masked.py`) runs them on
every slot of the long layout and masks the unused ones in attention. Both get their per-token positions and tile slots
from vLLM's position rows (`positions.py`), and the projectors' outputs as one wide row per slot (`tile_rows`,
`embed_input_ids`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling.configuration_internvlx import LVTCConfig
from ...modeling.lvtc import scale_to_rms
from .geometry import LVTCGeometry

if TYPE_CHECKING:
    from vllm.config import VllmConfig


class UpsampleTable(nn.Module):
    """Layer k's upsampling as a gather: long slot ``s`` of a tile is ``sum_i weight[s, i] * LR slot source[s, i]``
    (F.interpolate's weights, read off by interpolating each LR slot's indicator once)."""

    def __init__(self, layout: LVTCGeometry):
        super().__init__()
        short, long = layout.short_side, layout.long_side
        basis = torch.eye(layout.short_per_tile, dtype=torch.float64).reshape(-1, 1, short, short)
        options = {"align_corners": False} if layout.upsample_mode == "bilinear" else {}
        weights = F.interpolate(basis, size=(long, long), mode=layout.upsample_mode, **options)
        weights = weights.reshape(layout.short_per_tile, layout.long_per_tile).T  # (long slot, LR slot)
        top = weights.topk(4 if layout.upsample_mode == "bilinear" else 1, dim=-1)
        self.register_buffer("source", top.indices, persistent=False)
        self.register_buffer("weight", top.values.float(), persistent=False)

    def forward(self, hidden: torch.Tensor, slot: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's upsampled LR state (meaningful at tile slots, ``slot >= 0``). LR slot ``j`` of a token's tile
        is read at the tile's slot ``j + shift`` (the default path's `shift`: ``long - short`` in a tile the step
        resumes, whose LR states were recomputed in its last HR-only slots, `geometry.lr_slots_to_recompute`)."""
        tokens = hidden.shape[0]
        slot = slot.clamp(min=0)
        start = torch.arange(tokens, device=slot.device) - slot
        if shift is not None:
            start = start + shift
        source = (start[:, None] + self.source[slot]).clamp(0, tokens - 1)
        weight = self.weight[slot].to(hidden.dtype)
        return (hidden[source] * weight[..., None]).sum(1)


class LVTCLayers(nn.Module):
    """What both LVTC paths share: the projectors' rows (`tile_rows`, `embed_input_ids`), layer k's expansion and the
    layer loop (`run_layers`). The paths' compiled subclasses (`masked.MaskedLayers`, `saving.layers.SavingLayers`) give
    the loop its positions, tile slots and, on the default path, the live tokens' gather index."""

    def __init__(self, model, vllm_config: "VllmConfig", switch: int | None):
        super().__init__()
        self.model = [model]  # a list: the model is not a submodule of the layers it runs
        config = model.config
        self.layout: LVTCGeometry | None = model.layout
        self.switch = switch
        self.hidden = config.get_text_config().hidden_size
        self.injections = {layer: i for i, layer in enumerate(LVTCConfig.of(config).injection_layers)}
        self.upsample = UpsampleTable(self.layout) if self.layout is not None else None

    # ------------------------------------------------------------------------------------------- projector rows

    def tile_rows(self, vit: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """`(tiles, slots, width)`: per slot the LLM input (LR token in the LR slots), then the HR projector's output
        (with expansion), then each extra LR projector's (in the LR slots). The HR-only slots' LLM input and extra
        columns are zeros, except the tile's last ``short`` ones, which carry a copy of the LR slots' (slot
        ``long - short + j`` LR slot ``j``'s): a step that resumes the tile from a prefix-cache hit recomputes LR
        states from them (`geometry.lr_slots_to_recompute`). Nothing else reads those columns of an HR-only slot."""
        model = self.model[0]
        extras = [projector(vit) for projector in model.lvtc_lr_projectors]
        if self.layout is None:
            return torch.cat([lr, *extras], dim=-1)
        tiles, short, dim = lr.shape
        gap = self.layout.long_per_tile - 2 * short

        def carry(x):
            if gap < 0:  # (no room for a copy: such a tile is never resumed inside)
                return torch.cat([x, x.new_zeros(tiles, self.layout.long_per_tile - short, dim)], dim=1)
            return torch.cat([x, x.new_zeros(tiles, gap, dim), x], dim=1)

        hr = model.lvtc_hr_projector(vit)
        return torch.cat([carry(lr), hr, *(carry(extra) for extra in extras)], dim=-1)

    def embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal) -> torch.Tensor:
        """Each token's row: its embedding (or LR input) and, for tile slots, its projectors' outputs; zeros past the
        embedding for every other token."""
        model = self.model[0]
        embeds = model.language_model.embed_input_ids(input_ids)
        width = model.row_width
        rows = embeds.new_zeros(embeds.shape[0], width)
        rows[:, : self.hidden] = embeds
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return rows
        features = torch.cat(list(multimodal_embeddings)).to(rows.dtype)
        mask = is_multimodal.to(rows.device)
        rows[mask] = features
        return rows

    # ---------------------------------------------------------------------------------------------- layer loop

    def run_layers(self, hidden: torch.Tensor, side: torch.Tensor, short_positions: torch.Tensor,
                   long_positions: torch.Tensor, slot: torch.Tensor | None,
                   gather: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   scratch: bool = False) -> torch.Tensor:
        """Algorithm 1 over the step's tokens: ``hidden`` the LLM inputs, ``side`` the projectors' columns, ``slot``
        each token's tile slot (-1 outside tiles), ``gather`` the tokens layers ``< k`` run on (None: all of them),
        ``shift`` where layer ``k`` reads each tile's LR states (`UpsampleTable.forward`). With ``scratch`` the
        gather may also name one row past the tokens (padding for CUDA graphs, `short_layout.graph_step_inputs`):
        it reads zeros there and its results are dropped."""
        lm = self.model[0].language_model.model
        depth = len(lm.layers)
        expand = self.layout.expand_layer if self.layout is not None else depth
        tokens = hidden.shape[0]
        if gather is not None:
            if scratch:
                hidden, side = F.pad(hidden, (0, 0, 0, 1)), F.pad(side, (0, 0, 0, 1))
                short_positions = F.pad(short_positions, (0, 1))
            hidden_s, side_s = hidden.index_select(0, gather), side.index_select(0, gather)
            short_positions = short_positions.index_select(0, gather)
        else:
            hidden_s, side_s = hidden, side
        residual = None
        for index in range(expand):
            if index in self.injections:  # the extra LR projectors' columns: zeros outside the LR slots
                hidden_s = hidden_s + side_s[:, self._extra_columns(self.injections[index])]
            hidden_s, residual = lm.layers[index](short_positions, hidden_s, residual)
        if expand == depth:
            hidden, _ = lm.norm(hidden_s, residual)
            return hidden
        hidden_s = hidden_s + residual if residual is not None else hidden_s
        if gather is not None:
            hidden = hidden.new_zeros(hidden.shape).index_copy(0, gather, hidden_s)[:tokens]
            side = side[:tokens]
        else:
            hidden = hidden_s
        hidden, residual = self._expand(hidden, slot, side, shift), None
        lr_slot = (slot < self.layout.short_per_tile)[:, None]  # (the HR-only slots' extra columns carry copies)
        for index in range(expand, depth):
            if index in self.injections:
                hidden = hidden + torch.where(lr_slot, side[:, self._extra_columns(self.injections[index])], 0)
            hidden, residual = lm.layers[index](long_positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden

    def _extra_columns(self, number: int) -> slice:
        start = (number + (1 if self.layout is not None else 0)) * self.hidden
        return slice(start, start + self.hidden)

    def _expand(self, hidden: torch.Tensor, slot: torch.Tensor, side: torch.Tensor,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """Layer k: each tile's LR states upsampled 2D to the long grid, plus the HR projector's output."""
        up = self.upsample(hidden, slot, shift)
        hr = side[:, : self.hidden].to(up.dtype)
        if self.layout.hr_scale == "rms":
            hr = scale_to_rms(hr, up)
        return torch.where((slot >= 0)[:, None], up + hr, hidden)
