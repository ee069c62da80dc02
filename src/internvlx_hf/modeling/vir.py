"""InternVL3.5-Flash's Visual Resolution Router (ViR): per tile, a score from the ViT tokens decides whether the tile
enters the LLM at the model's resolution (``image_seq_length`` tokens, the MLP projector) or compressed (a quarter of
them, `ViRCompressedProjector`), and the prompt loses the compressed tiles' extra placeholders.

What the official Flash code does, kept here (docs/flash.md): the pooling's steps 2-4 all run ``attn2`` / ``norm2``
(``attn3`` / ``attn4`` are stored in checkpoints and never used, so they are not built); the score is ``p0``, the
first of two softmax outputs; a tile is compressed when ``p0`` is strictly above the ``relative_threshold`` quantile of
its scope's scores (``torch.quantile``, linear interpolation) and ``p0 >= absolute_threshold``; a compressed tile
keeps its first ``compressed_tokens_per_tile`` placeholders, and the positions of the shortened prompt are contiguous.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .input_checks import check_image_inputs
from .projectors import pixel_shuffle


class ViRPooling(nn.Module):
    """One learned query attends to a tile's ViT tokens four times (the reference's `CrossAttentionPooling`): first
    through ``attn1`` / ``norm1``, then three times through ``attn2`` / ``norm2``, each step's output the next query,
    with no residual."""

    steps_on_attn2 = 3

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, dim))
        self.attn1 = nn.MultiheadAttention(embed_dim=dim, num_heads=num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = nn.MultiheadAttention(embed_dim=dim, num_heads=num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(tiles, T, C)`` ViT tokens (no CLS) -> ``(tiles, C)``."""
        tokens = tokens.to(self.query_token.dtype)
        # The reference pads its tiles (all of one length) and passes the all-False padding mask with the attention
        # weights asked for: the same call here keeps its kernels, so the scores match it to the last bits.
        no_padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        query = self.query_token[None].expand(tokens.shape[0], -1, -1)
        query = self.norm1(self.attn1(query, tokens, tokens, key_padding_mask=no_padding)[0])
        for _ in range(self.steps_on_attn2):
            query = self.norm2(self.attn2(query, tokens, tokens, key_padding_mask=no_padding)[0])
        return query[:, 0]


class ViRGateBlock(nn.Module):
    """``x + LayerNorm(Linear(GELU(Linear(x))))``, the residual block of the reference's `Gating` (its dropouts are
    left out: the router is used frozen, in training too, so its decisions are the same in every mode)."""

    def __init__(self, hidden_size: int, expansion: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size * expansion)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size * expansion, hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.norm(self.fc2(self.act(self.fc1(hidden_states))))


class ViRGating(nn.Module):
    """Four residual blocks, LayerNorm, Linear -> 2, softmax: ``(tiles, C)`` -> ``(tiles, 2)`` probabilities, the
    first (``p0``) the score for compressing the tile."""

    def __init__(self, hidden_size: int, num_blocks: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(ViRGateBlock(hidden_size) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            pooled = block(pooled)
        return torch.softmax(self.proj(self.norm(pooled)), dim=-1)


class ViRCompressedProjector(nn.Module):
    """The reference's ``mlp2``: pixel shuffle at ``1 / window`` (4: 16 ViT tokens per token), LayerNorm, then
    Linear / GELU / Dropout / Linear / GELU / Dropout / Linear through twice the LLM width."""

    def __init__(self, vit_hidden_size: int, llm_hidden_size: int, window: int, dropout: float = 0.1):
        super().__init__()
        self.window = window
        in_features = vit_hidden_size * window * window
        self.layer_norm = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, 2 * llm_hidden_size)
        self.linear_2 = nn.Linear(2 * llm_hidden_size, 2 * llm_hidden_size)
        self.linear_3 = nn.Linear(2 * llm_hidden_size, llm_hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, vit_embeds: torch.Tensor) -> torch.Tensor:
        """``(tiles, 1 + S*S, C)`` (CLS first) -> ``(tiles, (S/window)^2, D)``."""
        patches = vit_embeds[:, 1:]
        side = int(patches.shape[1] ** 0.5)
        merged = pixel_shuffle(patches.reshape(patches.shape[0], side, side, -1), self.window).flatten(1, 2)
        hidden = self.dropout(self.act(self.linear_1(self.layer_norm(merged))))
        hidden = self.dropout(self.act(self.linear_2(hidden)))
        return self.linear_3(hidden)


class ViRRouter(nn.Module):
    """The router's modules, under the names checkpoints use: ``pooling``, ``gating`` and ``projector`` (the
    compressed tiles' projector)."""

    def __init__(self, config):
        super().__init__()
        vit = config.vision_config.hidden_size
        llm = config.get_text_config().hidden_size
        self.pooling = ViRPooling(vit, config.vir.pooling_num_heads)
        self.gating = ViRGating(vit)
        self.projector = ViRCompressedProjector(vit, llm, round(1.0 / config.vir.compressed_downsample_ratio))
        self.freeze()

    def freeze(self) -> None:
        """Used frozen (in training too): its decisions take no gradient, and how OpenGVLab trained it is unreleased.
        Without requires_grad it stays out of every optimizer and DDP's unused-parameter check. (Loading replaces
        the parameters, so the model calls this again after `from_pretrained`.)"""
        self.pooling.requires_grad_(False)
        self.gating.requires_grad_(False)

    def scores(self, vit_embeds: torch.Tensor) -> torch.Tensor:
        """``p0`` per tile, ``(tiles,)`` in the router's dtype, from the ViT output ``(tiles, 1 + S*S, C)``."""
        return self.gating(self.pooling(vit_embeds[:, 1:]))[:, 0]


def vir_decisions(scores: torch.Tensor, group_sizes: list[int], relative_threshold: float,
                  absolute_threshold: float) -> torch.Tensor:
    """Which tiles are compressed, ``(tiles,)`` bool: ``p0`` strictly above the ``relative_threshold`` quantile of its
    group and ``p0 >= absolute_threshold``. ``group_sizes`` splits the tiles into the scopes the quantile is taken
    over (consecutive tiles; one group = the reference's whole call).

    The comparisons are the reference's own: the quantile in float32, compared with the scores in their dtype.
    Ties at the quantile are kept (strict ``>``): a group of equal scores compresses nothing.
    """
    if sum(group_sizes) != scores.shape[0]:
        raise ValueError(f"the groups hold {sum(group_sizes)} tiles but there are {scores.shape[0]} scores")
    decisions = []
    for group in scores.split(group_sizes):
        if group.numel() == 0:
            continue
        threshold = torch.quantile(group.to(torch.float32), relative_threshold)
        decisions.append((group > threshold) & (group >= absolute_threshold))
    return torch.cat(decisions) if decisions else scores.new_zeros(0, dtype=torch.bool)


@dataclass
class ViRRouting(ModelOutput):
    """A batch after the router (`InternVLXModel.route`): the shortened prompt and the tokens that fill its
    placeholders.

    Args:
        input_ids: ``(batch, L')`` the prompt without the compressed tiles' deleted placeholders, re-padded.
        attention_mask: ``(batch, L')`` 1 on the kept tokens, 0 on the padding (None where none was given and the rows
            stay unpadded: packed rows).
        position_ids: ``(batch, L')`` renumbered (contiguous per sample, as the reference's positions), where
            position ids were given.
        labels: ``(batch, L')`` the labels of the kept tokens (-100 on the padding), where labels were given.
        image_features: ``(n, D)`` the visual tokens in prompt order: each tile's projector output, or its compressed
            projector output where the router compressed it.
        compressed: ``(tiles,)`` bool, the router's decision per tile (True: compressed).
        scores: ``(tiles,)`` ``p0`` per tile.
        kept: ``(batch, L)`` bool, which tokens of the given prompt are in ``input_ids``.
    """

    input_ids: torch.LongTensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    image_features: torch.Tensor | None = None
    compressed: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    kept: torch.Tensor | None = None


def sample_starts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> torch.Tensor:
    """``(batch, L)`` bool: where each sample begins. A row is one sample, except packed rows (position ids that fall
    back to 0 without an attention mask), whose samples begin at each 0."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    if attention_mask is None and position_ids is not None and position_ids.ndim == 2:
        starts |= position_ids == 0
    return starts


def tiles_per_sample(image_mask: torch.Tensor, starts: torch.Tensor, tokens_per_tile: int) -> list[int]:
    """Tiles of each sample, samples in prompt order (row by row), from an uncompressed prompt's placeholders."""
    sample = torch.cumsum(starts.reshape(-1).long(), 0) - 1
    counts = torch.bincount(sample[image_mask.reshape(-1)], minlength=int(sample[-1]) + 1)
    return (counts // tokens_per_tile).tolist()


def shorten_prompt(input_ids: torch.Tensor, image_mask: torch.Tensor, compressed: torch.Tensor, tokens_per_tile: int,
                   compressed_tokens_per_tile: int) -> torch.Tensor:
    """``(batch, L)`` bool, the tokens kept: every token but a compressed tile's placeholders after its first
    ``compressed_tokens_per_tile``. The prompt holds ``tokens_per_tile`` placeholders per tile, tiles in order."""
    flat = image_mask.reshape(-1)
    index = torch.arange(int(flat.sum()), device=input_ids.device)
    drop = compressed.to(input_ids.device)[index // tokens_per_tile] & (index % tokens_per_tile
                                                                        >= compressed_tokens_per_tile)
    kept = torch.ones_like(flat)
    kept[flat.nonzero()[:, 0]] = ~drop
    return kept.reshape(input_ids.shape)


def repack_rows(kept: torch.Tensor, attention_mask: torch.Tensor | None, padding_side: str,
                tensors: dict[str, tuple[torch.Tensor, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Each row's kept tokens (and, with a mask, only its unpadded ones), re-padded on ``padding_side`` to the
    longest row. ``tensors``: name -> ``(tensor (batch, L), padding value)``. Returns them and the new attention
    mask (None when no mask was given and the rows stay of one length)."""
    live = kept & attention_mask.bool() if attention_mask is not None else kept
    lengths = live.sum(-1)
    width = int(lengths.max())
    if attention_mask is None and bool((lengths != width).any()):
        raise ValueError("the router shortened the rows of a batch without an attention mask to different lengths; "
                         "pass the attention_mask (the processor's) so they can be padded.")
    slots = torch.arange(width, device=kept.device)[None]
    if padding_side == "left":
        new_mask = slots >= (width - lengths)[:, None]
    else:
        new_mask = slots < lengths[:, None]
    out = {}
    for name, (tensor, pad) in tensors.items():
        filled = torch.full((tensor.shape[0], width), pad, dtype=tensor.dtype, device=tensor.device)
        filled[new_mask] = tensor[live]
        out[name] = filled
    return out, (new_mask.long() if attention_mask is not None else None)


def renumber_positions(starts: torch.Tensor, live: torch.Tensor, new_mask: torch.Tensor | None,
                       width: int) -> torch.Tensor:
    """Position ids of the shortened rows (``live``: the given tokens kept, laid out by ``new_mask``): 0, 1, 2, ...
    from each sample's first kept token, as the reference numbers its shortened prompt; the padding gets 0 (masked)."""
    batch = starts.shape[0]
    sample = torch.cumsum(starts.long(), -1)
    # the sample id of every kept token, laid out as the new rows
    laid = torch.zeros(batch, width, dtype=torch.long, device=starts.device)
    mask = new_mask.bool() if new_mask is not None else torch.ones_like(laid, dtype=torch.bool)
    laid[mask] = sample[live]
    first = torch.ones_like(laid, dtype=torch.bool)
    first[:, 1:] = laid[:, 1:] != laid[:, :-1]
    index = torch.arange(width, device=starts.device).expand(batch, -1)
    begin = torch.where(first & mask, index, torch.zeros_like(index))
    begin = torch.cummax(begin, dim=-1).values
    return torch.where(mask, index - begin, torch.zeros_like(index))


def padding_side_of(attention_mask: torch.Tensor | None) -> str:
    """``"left"`` where a row's padding sits on the left (a generation batch), else ``"right"``."""
    if attention_mask is None or attention_mask.ndim != 2:
        return "right"
    left = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] != 0).all())
    return "left" if left else "right"


def tile_tokens(vit: torch.Tensor, compressed: torch.Tensor, projector: nn.Module,
                compressed_projector: nn.Module) -> torch.Tensor:
    """``(n, D)``: each tile's visual tokens in tile order, from the projector or, for a compressed tile, the
    compressed projector (each projector runs only on its own tiles; the reference runs both on every tile)."""
    compressed = compressed.to(vit.device)
    full = projector(vit[~compressed]) if not bool(compressed.all()) else None
    small = compressed_projector(vit[compressed]) if bool(compressed.any()) else None
    pieces, taken = [], {True: 0, False: 0}
    for is_compressed in compressed.tolist():
        source = small if is_compressed else full
        pieces.append(source[taken[is_compressed]])
        taken[is_compressed] += 1
    return torch.cat(pieces)


def route_batch(model, input_ids, pixel_values, attention_mask, position_ids, labels, image_flags,
                padding_side) -> ViRRouting:
    """`InternVLXModel.route` (see there): ``model`` is the base model, with ``vir``, ``multi_modal_projector`` and
    the vision tower."""
    config, vir = model.config, model.config.vir
    if vir is None:
        raise ValueError("This model has no router (config.vir is None): it is not an InternVL3.5-Flash model.")
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    per_tile = config.image_seq_length
    image_mask = input_ids == config.image_token_id
    try:
        check_image_inputs(config, pixel_values, image_mask, image_flags, None, None)
    except ValueError as error:
        raise ValueError(f"{error} (The router takes the prompt before it is shortened: {per_tile} <IMG_CONTEXT> "
                         "per tile; a shortened prompt goes to the forward with its image_features.)") from None
    vit, _, _ = model._vision_output(pixel_values, image_flags, {})
    starts = sample_starts(input_ids, attention_mask, position_ids)
    groups = tiles_per_sample(image_mask, starts, per_tile)
    if vir.scope == "call":
        groups = [sum(groups)]
    with torch.no_grad():  # the router is used frozen: a decision has no gradient
        scores = model.vir.scores(vit)
    if vir.enabled:
        compressed = vir_decisions(scores, groups, vir.relative_threshold, vir.absolute_threshold)
    else:
        compressed = torch.zeros_like(scores, dtype=torch.bool)
    features = tile_tokens(vit, compressed, model.multi_modal_projector, model.vir.projector)
    kept = shorten_prompt(input_ids, image_mask, compressed, per_tile, config.compressed_tokens_per_tile)
    pad = config.get_text_config().pad_token_id
    tensors = {"input_ids": (input_ids, pad if pad is not None else 0)}
    if labels is not None:
        tensors["labels"] = (labels, -100)
    side = padding_side or padding_side_of(attention_mask)
    rows, new_mask = repack_rows(kept, attention_mask, side, tensors)
    if position_ids is not None:
        live = kept & attention_mask.bool() if attention_mask is not None else kept
        position_ids = renumber_positions(starts, live, new_mask, rows["input_ids"].shape[1])
    return ViRRouting(input_ids=rows["input_ids"], attention_mask=new_mask, position_ids=position_ids,
                      labels=rows.get("labels"), image_features=features, compressed=compressed, scores=scores,
                      kept=kept)


__all__ = ["ViRPooling", "ViRGating", "ViRCompressedProjector", "ViRRouter", "ViRRouting", "vir_decisions"]
