"""The vision-to-LLM projectors: the InternVL MLP and PVTC (Sec. 3.1: each window of ViT tokens pooled into one
query that cross-attends to the window), and `attach_projectors`, the projector modules a model (transformers' or
vLLM's) holds under the names checkpoints use.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.internvl.modeling_internvl import InternVLVisionRMSNorm

from .configuration_internvlx import InternVLXConfig


def pixel_shuffle(features: torch.Tensor, window: int) -> torch.Tensor:
    """Merge each ``window x window`` block of a ``(n, S, S, C)`` grid into one token of ``window^2 * C`` channels.

    Channel order inside a merged token is the block's tokens in row-major order (top-left, top-right,
    bottom-left, bottom-right for 2x2): this is InternVL2's pixel shuffle with ``ps_version="v2"``.
    """
    n, side, _, channels = features.shape
    blocks = side // window
    features = features.reshape(n, blocks, window, blocks, window, channels).permute(0, 1, 3, 2, 4, 5)
    return features.reshape(n, blocks, blocks, window * window * channels)


def group_windows(features: torch.Tensor, window: int) -> torch.Tensor:
    """``(n, S, S, D)`` -> ``(n * (S/window)^2, window^2, D)``: the tokens of each window, row-major."""
    n, side, _, channels = features.shape
    blocks = side // window
    features = features.reshape(n, blocks, window, blocks, window, channels).permute(0, 1, 3, 2, 4, 5)
    return features.reshape(n * blocks * blocks, window * window, channels)


class InternVLXMLPProjector(nn.Module):
    """InternVL2's `mlp1`: pixel shuffle, then LayerNorm / Linear / GELU / Linear. The CLS token is dropped."""

    def __init__(self, vit_hidden_size: int, llm_hidden_size: int, window: int):
        super().__init__()
        self.window = window
        in_features = vit_hidden_size * window * window
        self.layer_norm = nn.LayerNorm(in_features)  # PyTorch default eps 1e-5, as InternVL2
        self.linear_1 = nn.Linear(in_features, llm_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden_size, llm_hidden_size)

    def forward(self, vit_embeds: torch.Tensor) -> torch.Tensor:
        """``(tiles, 1 + S*S, C)`` (CLS first) -> ``(tiles, N*N, D)``."""
        patches = vit_embeds[:, 1:]
        side = int(patches.shape[1] ** 0.5)
        merged = pixel_shuffle(patches.reshape(patches.shape[0], side, side, -1), self.window)
        merged = merged.flatten(1, 2)
        return self.linear_2(self.act(self.linear_1(self.layer_norm(merged))))


class PVTCInputMLP(nn.Module):
    """RMSNorm -> Linear (no bias) -> SiLU: turns ViT features into PVTC queries, keys and values."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.norm = InternVLVisionRMSNorm(in_features, eps=1e-6)
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(self.norm(hidden_states)))


class PVTCCrossAttention(nn.Module):
    """Point-to-region cross-attention: one query per window attends to that window's tokens only."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"PVTC hidden size {hidden_size} is not divisible by pvtc_num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query_norm = InternVLVisionRMSNorm(hidden_size, eps=1e-6)
        self.kv_norm = InternVLVisionRMSNorm(hidden_size, eps=1e-6)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, query: torch.Tensor, window_tokens: torch.Tensor) -> torch.Tensor:
        """``query`` ``(W, 1, D)``, ``window_tokens`` ``(W, M*M, D)`` -> ``(W, 1, D)`` (residual included)."""
        windows, length, hidden = window_tokens.shape
        kv = self.kv_norm(window_tokens)
        q = self.q_proj(self.query_norm(query)).view(windows, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(windows, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(windows, length, self.num_heads, self.head_dim).transpose(1, 2)
        # All windows at once: SDPA batches over (windows, heads); softmax runs over the window's M*M tokens.
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(windows, 1, hidden)
        return query + self.o_proj(attended)


class PVTCFeedForward(nn.Module):
    """Pre-norm SwiGLU with a residual, 4x wide (the reference `InternEncoderLayer` MLP)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = InternVLVisionRMSNorm(hidden_size, eps=1e-6)
        self.gate_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.down_proj = nn.Linear(4 * hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        return hidden_states + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))


class PVTCLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.attn = PVTCCrossAttention(hidden_size, num_heads)
        self.mlp = PVTCFeedForward(hidden_size)

    def forward(self, query: torch.Tensor, window_tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(query, window_tokens))


class PVTCProjector(nn.Module):
    """PVTC (paper Sec. 3.1): per ``M x M`` window, a local query (pixel-shuffled window -> MLP) and a global query
    (CLS -> MLP, times a learnable per-position ``cls_scale``) each cross-attend to the window's tokens through
    ``L`` layers; the two results are summed. ``(S/M)^2`` tokens per tile.
    """

    def __init__(self, vit_hidden_size: int, llm_hidden_size: int, grid: int, window: int, num_layers: int,
                 num_heads: int):
        super().__init__()
        self.window = window
        side = grid // window
        self.local_query = PVTCInputMLP(vit_hidden_size * window * window, llm_hidden_size)
        self.global_query = PVTCInputMLP(vit_hidden_size, llm_hidden_size)
        self.key_value = PVTCInputMLP(vit_hidden_size, llm_hidden_size)
        # "diverse transformations to F_GQ at each position" (Sec. 3.1): one learnable scale per output token.
        self.cls_scale = nn.Parameter(torch.randn(1, side, side, llm_hidden_size))
        self.local_layers = nn.ModuleList(PVTCLayer(llm_hidden_size, num_heads) for _ in range(num_layers))
        self.global_layers = nn.ModuleList(PVTCLayer(llm_hidden_size, num_heads) for _ in range(num_layers))

    def forward(self, vit_embeds: torch.Tensor) -> torch.Tensor:
        """``(tiles, 1 + S*S, C)`` (CLS first) -> ``(tiles, N*N, D)``."""
        tiles = vit_embeds.shape[0]
        cls_token, patches = vit_embeds[:, 0], vit_embeds[:, 1:]
        grid = int(patches.shape[1] ** 0.5)
        patches = patches.reshape(tiles, grid, grid, -1)
        side = grid // self.window

        local = self.local_query(pixel_shuffle(patches, self.window)).reshape(tiles * side * side, 1, -1)
        global_query = self.global_query(cls_token)[:, None, None, :] * self.cls_scale
        global_ = global_query.reshape(tiles * side * side, 1, -1)
        window_tokens = group_windows(self.key_value(patches), self.window)
        for layer in self.local_layers:
            local = layer(local, window_tokens)
        for layer in self.global_layers:
            global_ = layer(global_, window_tokens)
        # Summed in the output shape so the result owns its storage: a view here would be the root output of an
        # FSDP2-wrapped model (image_hidden_states), which FSDP warns can silently lose gradients on in-place use.
        return local.reshape(tiles, side * side, -1) + global_.reshape(tiles, side * side, -1)


def build_projector(config: InternVLXConfig, projector_type: str, ratio: float) -> nn.Module:
    window = round(1.0 / ratio)
    vit, llm = config.vision_config.hidden_size, config.text_config.hidden_size
    if projector_type == "mlp":
        return InternVLXMLPProjector(vit, llm, window)
    if projector_type == "pvtc":
        return PVTCProjector(vit, llm, config.vision_tokens_per_side, window, config.pvtc_num_layers,
                             config.pvtc_num_heads)
    raise ValueError(f"unknown projector type {projector_type!r}; expected 'mlp' or 'pvtc'")


def attach_projectors(module: nn.Module, config: InternVLXConfig) -> None:
    """Give ``module`` the projectors of ``config``, under the names checkpoints use: ``multi_modal_projector`` (the
    first, or only, LR projector), ``lvtc_lr_projectors`` (the other LR ones) and ``lvtc_hr_projector``."""
    module.multi_modal_projector = build_projector(config, config.projector_type, config.downsample_ratio)
    lvtc = config.lvtc
    if lvtc is not None:
        module.lvtc_lr_projectors = nn.ModuleList(
            build_projector(config, lvtc.lr_projector_type, lvtc.lr_downsample_ratio)
            for _ in range(lvtc.num_lr_projectors - 1)
        )
        # With expand_layer == depth nothing is ever expanded: no HR projector, so no parameter that never gets
        # a gradient (DDP would otherwise need find_unused_parameters=True).
        if lvtc.expand_layer < config.get_text_config().num_hidden_layers:
            module.lvtc_hr_projector = build_projector(config, lvtc.hr_projector_type, lvtc.hr_downsample_ratio)
