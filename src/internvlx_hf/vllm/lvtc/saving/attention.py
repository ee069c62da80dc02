"""The saving path's attention for the layers below `k`: vLLM's `Attention` reporting the short KV-cache group's spec,
and a backend (a subclass of the platform's) whose builder builds the step's short layout before the forward pass
(`short_layout.short_layout`) from the tiles of the step's requests (V1: checked against the runner's M-RoPE rows as
it wrote them on the host; V2: handed over by the model's runner state), and whose KV write takes that layout's slot
mapping."""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.v1.attention.backend import (AttentionCGSupport, CommonAttentionMetadata,
                                      subclass_attention_backend_with_overrides)
from vllm.v1.kv_cache_interface import get_kv_quant_mode

from internvlx_hf.vllm.lvtc.saving.kv_cache import LVTCShortSpec
from internvlx_hf.vllm.lvtc.short_layout import short_layout
from internvlx_hf.vllm.lvtc.tiles import RequestTiles


class LVTCShortAttention(Attention):
    """vLLM's Attention, reporting the short-layout KV spec (layers below k)."""

    short_per_tile: int = 0
    long_per_tile: int = 0

    def get_kv_cache_spec(self, vllm_config):
        base = super().get_kv_cache_spec(vllm_config)
        return LVTCShortSpec(block_size=base.block_size, num_kv_heads=base.num_kv_heads, head_size=base.head_size,
                             head_size_v=base.head_size_v, dtype=base.dtype,
                             kv_quant_mode=get_kv_quant_mode(self.kv_cache_dtype),
                             short_per_tile=self.short_per_tile, long_per_tile=self.long_per_tile)


# ------------------------------------------------------------------------------ short backend: metadata outside forward


class PositionBufferChannel:
    """V1's model runner and the host side of its M-RoPE buffer, found from the view the model's first forward is
    given (vLLM gives the builder no reference to either: `v1_runner`, `host_rows`). One per model; the short builder
    reads the step's rows from the buffer before the forward pass and checks them against the tiles of the runner's
    requests (`step_tiles`). Holds the model's short backend classes too (`short_backend`), so that they and the
    buffer go with the model, and counts the requests whose rows the model computed (`requests`: none yet means a
    build is a dummy run's, `short_layout`'s ``warm_up``)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # host rows, (3, max tokens)
        self.requests = 0
        self.backends: dict[type, type] = {}
        self.forwards = 0  # the model's forward calls: a step's metadata is built between two
        self.layout: tuple | None = None  # (query_start_loc, key, layout) of the last build (`LVTCShortBuilder`)
        #: vLLM's second model runner, whose runner state (`model_state.LVTCModelState`) hands each build the step's
        #: requests' tiles: the rows are computed from them, not read from the M-RoPE buffer (written after the build)
        self.runner_state = False
        #: V1's model runner (`v1_runner`, found with the buffer; a weak reference, as the runner holds the model):
        #: its batch's request ids and each request's features
        self.runner: weakref.ref | None = None
        self._tiles: dict[str, tuple[object, RequestTiles]] = {}  # by request id: (the runner's request, its tiles)

    def step_tiles(self, short_per_tile: int, long_per_tile: int) -> list[RequestTiles] | None:
        """On V1, the tiles of the requests of the runner's batch, in its order (`tiles.RequestTiles`, from each
        request's features as the runner holds them), each computed once per request; None before the runner is
        known."""
        runner = self.runner() if self.runner is not None else None
        if runner is None:
            return None
        batch, requests = runner.input_batch, runner.requests
        tiles = []
        for req_id in batch.req_ids[: batch.num_reqs]:
            state = requests[req_id]
            kept = self._tiles.get(req_id)
            if kept is None or kept[0] is not state:
                kept = self._tiles[req_id] = (state, RequestTiles.of(state, short_per_tile, long_per_tile))
            tiles.append(kept[1])
        if len(self._tiles) > 2 * len(requests) + 64:  # (finished requests' tiles)
            self._tiles = {req_id: kept for req_id, kept in self._tiles.items() if req_id in requests}
        return tiles


@dataclass
class PendingShortMetadata:
    """The short layers' metadata of a step built before the model's first forward: finished by that forward, once
    the M-RoPE buffer is known (the only step whose metadata is built inside the forward pass)."""

    builder: object
    common: CommonAttentionMetadata
    fast_build: bool

    def finish(self):
        return self.builder.build_short(self.common, self.fast_build)


def v1_runner(buffer: torch.Tensor):
    """vLLM's V1 model runner whose M-RoPE buffer is `buffer` (the device side of its ``CpuGpuBuffer``, of which the
    model's forward pass is given a view; on vLLM's CPU runner both sides are one tensor): the caller up the stack of
    the model's forward (``GPUModelRunner._model_forward`` calls it) that holds that buffer as ``mrope_positions``,
    with its batch (``input_batch``) and each request's state (``requests``). Called once per model, in its first
    forward pass (a guarded internal: docs/serving-vllm-lvtc.md). Found on the stack, not through the garbage
    collector's referrers: vLLM freezes its heap after start-up (``gc.freeze``), which hides every object from them."""
    frame = sys._getframe(1)
    while frame is not None:
        runner = frame.f_locals.get("self")
        holder = getattr(runner, "mrope_positions", None)
        if getattr(holder, "gpu", None) is buffer and isinstance(getattr(runner, "requests", None), dict) \
                and hasattr(getattr(runner, "input_batch", None), "req_ids"):
            return runner
        frame = frame.f_back
    raise RuntimeError(
        "InternVL-X LVTC saving path: the model runner holding this vLLM's M-RoPE buffer was not found where the "
        "plugin looks (the caller of the model's forward pass, with mrope_positions, input_batch and requests), so the "
        "step's rows and requests are unknown to the short layout; serve the checkpoint on the masked path: "
        "hf_overrides={\"lvtc_vllm_path\": \"masked\"}")


def host_rows(runner) -> torch.Tensor:
    """The host side of V1's M-RoPE buffer (``mrope_positions.cpu``: the device tensor itself on vLLM's CPU runner),
    where ``_prepare_inputs`` writes the step's rows before it builds attention metadata."""
    host, device = runner.mrope_positions.cpu, runner.mrope_positions.gpu
    if not isinstance(host, torch.Tensor) or host.device.type != "cpu" or host.shape != device.shape:
        raise RuntimeError(
            "InternVL-X LVTC saving path: this vLLM runner keeps no host copy of its M-RoPE buffer where the plugin "
            "looks (a CpuGpuBuffer's cpu side), so the short layout cannot be built without reading the GPU every "
            "step; serve the checkpoint on the masked path: hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
    return host


def short_common_metadata(cm: CommonAttentionMetadata, layout) -> CommonAttentionMetadata:
    """What the short layers' backend builds its metadata from: the step's short layout (`short_layout.ShortLayout`)
    in the runner's block table, every count a backend reads on the host given from the host (`query_start_loc_cpu`,
    `seq_lens_cpu_upper_bound`: exact here, so FlashInfer's builder does not read the device for it)."""
    return CommonAttentionMetadata(
        query_start_loc=layout.query_start_loc, query_start_loc_cpu=layout.query_start_loc_cpu,
        seq_lens=layout.seq_lens.to(cm.seq_lens.dtype), num_reqs=cm.num_reqs,
        num_actual_tokens=layout.gather.shape[0], max_query_len=layout.max_query_len,
        max_seq_len=layout.max_seq_len, block_table_tensor=cm.block_table_tensor,
        slot_mapping=layout.slot_mapping, causal=True, seq_lens_cpu_upper_bound=layout.seq_lens_cpu)


def short_backend(base: type, channel: PositionBufferChannel) -> type:
    """The platform's attention backend with the short layers' builder and KV write: one class per base and model
    (vLLM groups attention layers by backend class, and asks that dynamic subclasses be cached), kept by the model's
    channel, not for the process's life (a process that builds several engines keeps no one else's buffer)."""
    if base not in channel.backends:
        channel.backends[base] = _short_backend(base, channel)
    return channel.backends[base]


def _short_backend(base: type, channel: PositionBufferChannel) -> type:

    class LVTCShortBuilder(base.get_builder_cls()):
        # vLLM's V1 GPU runner gives a later KV-cache group with an equal spec and builder class the first group's
        # metadata through `update_block_table`, which swaps in that group's slot mapping: the long layout's, where
        # the short layers would write their K/V. Each short group builds its own instead (the step's one layout,
        # `ShortLayout.for_block_table`), as on vLLM's CPU runner.
        supports_update_block_table = False
        lvtc_short = True  # (the runner state's extra build arguments go to this builder only)

        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
            # A full CUDA graph replays the attention metadata in the buffers it was captured with; the short layout
            # is built per step apart from them. Both runners take the weakest support of all groups, so vLLM lowers
            # its default FULL_AND_PIECEWISE (and FULL_DECODE_ONLY) to PIECEWISE for the whole model and refuses FULL
            # (`engine_settings.graph_mode_with_short_layers`).
            return AttentionCGSupport.NEVER

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False, lvtc_tiles=None):
            cm = common_attn_metadata
            if cm.positions is None or cm.positions.dim() != 1:  # the long-layout token index (guarded internal)
                raise RuntimeError("InternVL-X LVTC saving path: this vLLM's CommonAttentionMetadata.positions is not "
                                   "the step's token index; serve the checkpoint on the masked path: "
                                   "hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
            if channel.runner_state:  # V2: the step's tiles, or `DUMMY_RUN` for a dummy run or a graph capture
                if lvtc_tiles is None:
                    raise RuntimeError("InternVL-X LVTC saving path: V2's runner handed the short layers' builder no "
                                       "tiles (this vLLM's build_attn_metadata does not pass the model state's "
                                       "get_extra_attn_kwargs); serve the checkpoint on the masked path: "
                                       "hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
                return self.build_short(cm, fast_build, tiles=lvtc_tiles)
            if channel.buffer is None:
                # Before the model's first forward (vLLM's first step where it runs no warm-up forward: eager mode,
                # VLLM_CPU_CI_ENV): that forward hands over the buffer and finishes this build (`SavingFront`).
                return PendingShortMetadata(self, cm, fast_build)
            return self.build_short(cm, fast_build)

        def build_short(self, cm, fast_build=False, tiles=None):
            # the step's tokens without the runner's padding (CUDA graphs, data parallelism): a host-side count
            tokens = int(cm.query_start_loc_cpu[cm.num_reqs])
            spec = self.kv_cache_spec
            # the layers below k may form several KV-cache groups (as many layers each as the long group): the step's
            # layout is built once, each further group's builder only maps its own blocks. The runners hand every
            # group of one build a shallow copy of the same metadata: its query_start_loc tensor (held, so that its
            # id is not reused) tells one build from the next, with the forward count and the offsets besides.
            key = (channel.forwards, tokens, spec.block_size, tuple(cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()))
            cached = channel.layout
            if cached is not None and cached[0] is cm.query_start_loc and cached[1] == key:
                layout = cached[2].for_block_table(cm.block_table_tensor, spec.block_size)
            else:
                if cm.seq_lens_cpu_upper_bound is None:
                    raise RuntimeError("InternVL-X LVTC saving path: this vLLM's runner gives the attention builder no "
                                       "host sequence lengths (seq_lens_cpu_upper_bound); serve the checkpoint on the "
                                       "masked path: hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
                query_start_loc = cm.query_start_loc_cpu[: cm.num_reqs + 1]
                seq_lens = cm.seq_lens_cpu_upper_bound[: cm.num_reqs]
                if channel.runner_state:
                    # the layout from each request's tiles (the scheduler's arithmetic); `DUMMY_RUN`: a dummy run's
                    warm_up = len(tiles) == 0
                    rows = torch.zeros(3, tokens, dtype=torch.int64) if warm_up else None
                    tiles = None if warm_up else tiles
                else:
                    # V1: the rows it wrote to its M-RoPE buffer's host side before this build, checked against its
                    # requests' tiles (the scheduler's arithmetic)
                    rows, warm_up = channel.buffer, channel.requests == 0
                    tiles = None if warm_up else channel.step_tiles(spec.short_per_tile, spec.long_per_tile)
                # (a backend that takes smaller blocks gets the table in kernel blocks and a spec in their size)
                layout = short_layout(rows, query_start_loc, seq_lens, cm.block_table_tensor, num_tokens=tokens,
                                      short_per_tile=spec.short_per_tile, long_per_tile=spec.long_per_tile,
                                      block_size=spec.manager_block_size, kernel_block_size=spec.block_size,
                                      warm_up=warm_up, tiles=tiles)
                channel.layout = (cm.query_start_loc, key, layout)
            meta = super().build(0, short_common_metadata(cm, layout), fast_build)
            meta.lvtc_gather = layout.gather
            meta.lvtc_long_positions = cm.positions[:tokens]
            meta.lvtc_shift = layout.shift
            return meta

    class LVTCShortImpl(base.get_impl_cls()):
        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            # vLLM's slot mapping for this group comes from long-layout positions; the short one is our metadata's,
            # one slot per live token (the rows after them: padding for CUDA graphs, `graph_step_inputs`, not written)
            # vLLM's own lookup of a layer's metadata (a dict by layer; micro-batching and speculative decoding's
            # list of them, whose first is the step's), as its KV update reads it
            metadata = get_attention_context(layer.layer_name)[0] if get_forward_context().attn_metadata is not None \
                else None
            if metadata is None:
                # V1's dummy forwards once the KV cache exists (its sampler warm-up, graph-memory profiling, warm-up
                # sizes, FlashInfer autotune) hand every group a slot mapping but build no attention metadata: their
                # K/V are nobody's, and the slots given are the long layout's, not this group's: nothing is written
                return
            live = metadata.slot_mapping.shape[0]
            super().do_kv_cache_update(layer, key[:live], value[:live], kv_cache, metadata.slot_mapping)

    return subclass_attention_backend_with_overrides(
        "LVTCShort_", base, {"get_builder_cls": staticmethod(lambda: LVTCShortBuilder),
                             "get_impl_cls": staticmethod(lambda: LVTCShortImpl)})
