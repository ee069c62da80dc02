"""InternVL3.5-Flash's Visual Resolution Router (ViR): per tile, a score from the ViT tokens decides whether the tile
enters the LLM at the model's resolution (``image_seq_length`` tokens, the MLP projector) or compressed (a quarter of
them, `ViRCompressedProjector`), and the prompt loses the compressed tiles' extra placeholders.

What the official Flash code does, kept here (docs/flash.md): the pooling's steps 2-4 all run ``attn2`` / ``norm2``
(``attn3`` / ``attn4`` are stored in checkpoints and never used, so they are not built); the score is ``p0``, the
first of two softmax outputs; a tile is compressed when ``p0`` is strictly above the ``relative_threshold`` quantile of
its scope's scores (``torch.quantile``, linear interpolation) and ``p0 >= absolute_threshold``; a compressed tile
keeps its first ``compressed_tokens_per_tile`` placeholders, and the positions of the shortened prompt are contiguous.
How the decisions reach every route into the model (forwards, generate, caches, trainers): `vir_routing.py`.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import torch
from torch import nn

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
    left out: the router decides the same in every mode, and ViCO trains it on labels, not through its decisions)."""

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
        """Used frozen (in training too): its decisions take no gradient; only ViCO's presets train it, on labels
        (`training.vico`). Without requires_grad it stays out of every other optimizer and DDP's unused-parameter
        check. (Loading replaces the parameters, so the model calls this again after `from_pretrained`.)"""
        self.pooling.requires_grad_(False)
        self.gating.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter as the constructors draw it (the pooling's query N(0, 1) as the reference's torch.randn,
        torch's own initialisation of the attention, Linear and LayerNorm layers): an untrained router, for a
        checkpoint that gains one (`internvlx convert --add-router`)."""
        self.pooling.query_token.normal_()
        for module in self.modules():
            if isinstance(module, nn.MultiheadAttention):
                module._reset_parameters()
            elif isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()

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
    tokens = torch.cat(pieces)
    unused = projector if full is None else compressed_projector if small is None else None
    if unused is not None and torch.is_grad_enabled():
        # A step that compresses every tile (or none) leaves one projector out of the graph: DDP (with reentrant
        # checkpointing, where find_unused_parameters cannot be set) and ZeRO wait for its gradient forever. A zero
        # term gives each of its trained parameters a gradient of 0, as a step that used it on nothing would.
        trained = [parameter.sum() for parameter in unused.parameters() if parameter.requires_grad]
        if trained:
            tokens = tokens + (0.0 * sum(trained)).to(tokens.dtype)
    return tokens


__all__ = ["ViRPooling", "ViRGating", "ViRCompressedProjector", "ViRRouter", "tile_tokens", "vir_decisions"]
