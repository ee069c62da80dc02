"""The saving path's layers: the short layers' attention put in place of vLLM's (`SavingFront`, not compiled, which
also hands the M-RoPE buffer to the short builder and picks the step's gather index from its metadata) and the layer
loop both paths share (`layers.LVTCLayers.run_layers`), compiled by vLLM (`SavingLayers`): layers below k on the live
tokens at their short positions, the gather index with a dynamic size of its own. The forward pass reads nothing back
to Python, except in the one step built before the first forward where vLLM runs no warm-up
(`attention.PendingShortMetadata`)."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention

from internvlx_hf.vllm.engine_settings import graph_capture_blocker, graph_mode_with_short_layers
from internvlx_hf.vllm.lvtc.layers import LVTCLayers
from internvlx_hf.vllm.lvtc.positions import saving_rope_indices
from internvlx_hf.vllm.lvtc.short_layout import graph_step_inputs
from internvlx_hf.vllm.lvtc.saving.attention import (LVTCShortAttention, PendingShortMetadata, PositionBufferChannel,
                                                     host_rows, short_backend, v1_runner)


# ------------------------------------------------------------------------------------------------- compiled layers


@support_torch_compile(dynamic_arg_dims={"positions": -1, "inputs_embeds": 0, "gather": 0, "long_positions": 0,
                                         "shift": 0},
                       mark_unbacked_dims={"gather": 0})
class SavingLayers(LVTCLayers):
    """The LLM's layers on this path, compiled by vLLM: `LVTCLayers.run_layers` with layers below k on the live tokens
    (`gather`, built by the short builder) at their short positions, layers from k at `long_positions`; `shift` says
    where layer k reads a resumed tile's LR states (`short_layout.ShortLayout.shift`)."""

    def __init__(self, *, model, vllm_config, switch: int | None, padded: bool = False, prefix: str = ""):
        super().__init__(model, vllm_config, switch)
        self.padded = padded  # the gather padded to the step's token count (`graph_layout`)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor, gather: torch.Tensor,
                long_positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        hidden, side = inputs_embeds[:, : self.hidden], inputs_embeds[:, self.hidden:]
        code = positions[2]
        slot = torch.where(code < 0, -1 - code, -1)
        short_index, long_index = saving_rope_indices(positions, long_positions, self.switch)
        # an HR-only slot's row 1 is its tile's LR end; one the layers below k run on (a resumed tile's copy of LR
        # slot j = slot - (long - short)) is at that LR slot's short position
        long_per_tile = self.layout.long_per_tile
        short_index = short_index - torch.where(slot >= self.layout.short_per_tile, long_per_tile - slot, 0)
        return self.run_layers(hidden, side, short_index, long_index, slot, gather, shift, scratch=self.padded)


def saving_unavailable(model) -> str | None:
    """Why this worker cannot run the short-KV path (the model then stops at start with the fix), or None.

    The config hook decides on what it can see (`lvtc/path.py`); what only the built model knows is
    checked here: the attention backend's KV write of each layer below k."""
    lm = model.language_model.model
    for index in range(model.layout.expand_layer):
        attn = getattr(lm.layers[index].self_attn, "attn", None)
        backend = getattr(attn, "attn_backend", None)
        if not isinstance(attn, Attention) or backend is None:
            return f"layer {index} of the LLM has no vLLM Attention with a backend at self_attn.attn"
        impl = backend.get_impl_cls()
        if not backend.forward_includes_kv_cache_update and not hasattr(impl, "do_kv_cache_update"):
            return (f"the attention backend {backend.get_name()} writes K/V neither in its forward nor through "
                    "do_kv_cache_update, so the short layers' KV cannot be written at their own slots")
    return None


def graph_layout(vllm_config, config) -> bool:
    """Whether the layers below k run on the step's padded token count (`short_layout.graph_step_inputs`) rather than
    on its live tokens: where vLLM may replay piecewise CUDA graphs, which are captured per token count (the mode
    vLLM settles on once the short builder says it captures no full graphs, `graph_mode_with_short_layers`: decided
    here, when the model is built, before vLLM settles it), or where the config asks for it
    (``lvtc_vllm_graph_layout``, to compare the two on a platform without CUDA graphs)."""
    replays = graph_mode_with_short_layers(vllm_config) not in (None, "NONE")
    return bool(replays or getattr(config, "lvtc_vllm_graph_layout", False))


def pads_step(runtime_mode, padded: bool, forced: bool = False) -> bool:
    """Whether this step's layers below k run on its padded token count (`short_layout.graph_step_inputs`): only a
    step vLLM captures or replays as a piecewise CUDA graph (`runtime_mode`, its forward context's
    ``cudagraph_runtime_mode``) of a model built for them (`graph_layout`); every other step (an image prefill past
    the largest capture size, any step of an eager engine) runs them on its live tokens, the saving below k kept.
    ``forced`` (``lvtc_vllm_graph_layout``): every step padded, to run that layout where no graphs replay (the CPU)."""
    return padded and (forced or getattr(runtime_mode, "name", runtime_mode) == "PIECEWISE")


def graph_replay_refusal(runtime_mode, padded: bool) -> str | None:
    """Why a forward pass vLLM captures or replays as a CUDA graph (`runtime_mode`, its forward context's
    ``cudagraph_runtime_mode``) cannot run the layers below k as the model was built, or None: a full graph (the short
    builder says it captures none, so vLLM should never ask), or a piecewise one where the layers were built for the
    live tokens (`graph_layout` foresaw no graphs: a vLLM that settled its mode otherwise)."""
    mode = getattr(runtime_mode, "name", runtime_mode)
    if mode in (None, "NONE") or (mode == "PIECEWISE" and padded):
        return None
    built = "the step's padded token count" if padded else "the live tokens only (no CUDA graphs foreseen)"
    return (f"InternVL-X LVTC saving path: vLLM runs this step as a {mode} CUDA graph, and the layers below k were "
            f"built for {built}; start vLLM with --enforce-eager or --compilation-config "
            "'{\"cudagraph_mode\": \"PIECEWISE\"}', or serve the checkpoint on the masked path: "
            "hf_overrides={\"lvtc_vllm_path\": \"masked\"}")


class SavingFront(nn.Module):
    """Not compiled: gives layers below k their short-KV attention (built from vLLM's, in place), hands the M-RoPE
    buffer to the short builder (first forward), picks the step's gather index and long positions from the short
    layers' metadata (tensors only), and calls the compiled layers."""

    def __init__(self, model, vllm_config, switch: int | None, prefix: str = ""):
        super().__init__()
        self.channel = PositionBufferChannel()
        layout = model.layout
        lm = model.language_model.model
        static = vllm_config.compilation_config.static_forward_context
        self.short_names: list[str] = []
        for index in range(layout.expand_layer):
            self_attn = lm.layers[index].self_attn
            old = self_attn.attn
            # the layer keeps its name (vLLM binds its KV cache by it); vLLM's Attention it replaces is dropped
            static.pop(old.layer_name)
            attn = LVTCShortAttention(old.num_heads, old.head_size, old.impl.scale, num_kv_heads=old.num_kv_heads,
                                      cache_config=vllm_config.cache_config, prefix=old.layer_name,
                                      attn_backend=short_backend(old.attn_backend, self.channel))
            attn.short_per_tile, attn.long_per_tile = layout.short_per_tile, layout.long_per_tile
            self_attn.attn = attn
            self.short_names.append(old.layer_name)
        blocker = graph_capture_blocker(vllm_config)  # (the config hook's check, now that vLLM has settled it)
        if blocker is not None:
            raise RuntimeError(f"InternVL-X LVTC saving path: {blocker}; or serve the checkpoint on the masked path: "
                               "hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
        self.padded = graph_layout(vllm_config, model.config)
        self.forced_padding = bool(getattr(model.config, "lvtc_vllm_graph_layout", False))
        if self.padded:
            # the graphs' per-step inputs, at addresses that stay (`graph_step_inputs`), as many as a step's tokens
            tokens = vllm_config.scheduler_config.max_num_batched_tokens
            self.register_buffer("graph_inputs", torch.zeros(3, tokens, dtype=torch.int64), persistent=False)
        self.layers = SavingLayers(model=model, vllm_config=vllm_config, switch=switch, padded=self.padded,
                                   prefix=prefix)

    def tile_rows(self, vit, lr):
        return self.layers.tile_rows(vit, lr)

    def embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal):
        return self.layers.embed_input_ids(input_ids, multimodal_embeddings, is_multimodal)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        self.channel.forwards += 1
        if self.channel.buffer is None and not self.channel.runner_state:
            # vLLM passes a view of its runner's M-RoPE buffer (`(3, max tokens)`, the step's columns first); the short
            # builder reads the step's rows from that buffer (guarded internal: docs/serving-vllm-lvtc.md)
            buffer = positions._base if positions._base is not None else positions
            if buffer.dim() != 2 or buffer.shape[0] != 3 or buffer.data_ptr() != positions.data_ptr():
                raise RuntimeError(
                    "InternVL-X LVTC saving path: this vLLM does not pass the model a view of its M-RoPE position "
                    f"buffer (positions {tuple(positions.shape)}, base {tuple(buffer.shape)}); serve the checkpoint "
                    "on the masked path: hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
            runner = v1_runner(buffer)
            self.channel.buffer = host_rows(runner)
            self.channel.runner = weakref.ref(runner)
        tokens = positions.shape[1]
        context = get_forward_context()
        refusal = graph_replay_refusal(context.cudagraph_runtime_mode, self.padded)
        if refusal is not None:
            raise RuntimeError(refusal)
        metas = context.attn_metadata
        pad = pads_step(context.cudagraph_runtime_mode, self.padded, self.forced_padding)
        if isinstance(metas, dict) and self.short_names[0] in metas:
            if isinstance(metas[self.short_names[0]], PendingShortMetadata):
                # one pending metadata per KV-cache group (vLLM may split the short layers into several, each
                # with its own block table): each finished by its own builder
                finished: dict[int, object] = {}
                for name in self.short_names:
                    pending = metas[name]
                    if id(pending) not in finished:
                        finished[id(pending)] = pending.finish()
                    metas[name] = finished[id(pending)]
            meta = metas[self.short_names[0]]
            if pad:
                gather, long_positions, shift = graph_step_inputs(
                    self.graph_inputs, meta.lvtc_gather, meta.lvtc_long_positions, meta.lvtc_shift, tokens)
                return self.layers(positions, inputs_embeds, gather, long_positions, shift)
            gather = meta.lvtc_gather
            long_positions = positions[0].clone()
            long_positions[: meta.lvtc_long_positions.shape[0]] = meta.lvtc_long_positions
            shift = torch.zeros_like(long_positions)
            shift[: meta.lvtc_shift.shape[0]] = meta.lvtc_shift
        elif pad:  # a graph's capture or its warm-up run (no metadata): every token at its index
            gather, long_positions, shift = graph_step_inputs(
                self.graph_inputs, torch.arange(tokens, device=positions.device), positions[0], positions[0][:0],
                tokens)
        else:  # warm-up / profile runs (no metadata): a gather index whose size differs from the token count's
            gather = torch.arange(max(tokens - 1, 1), device=positions.device)
            long_positions = positions[0]
            shift = torch.zeros_like(long_positions)
        return self.layers(positions, inputs_embeds, gather, long_positions, shift)
