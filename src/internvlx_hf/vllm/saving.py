"""Issue 56 (research prototype, used only where `hf_overrides` asks for it): LVTC on vLLM with the layers below `k`
holding and computing the short layout, under vLLM's compilation mode.

Opt in with `hf_overrides={"architectures": [ARCHITECTURE]}` (the plugin registers the name in every vLLM process, so
the engine core and workers may run in processes of their own); checkpoints are served as before otherwise.

Shared with issue 52's research engine (benchmarks/lvtc_savings_vllm.py imports them from here):

- `LVTCShortSpec` / `LVTCShortManager`: a KV-cache group of its own for layers below k, holding blocks for each
  request's short-layout tokens only; `LVTCSchedulerMixin` hands the scheduler's request table (with `mm_features`)
  to the manager.
- `saving_positions`: each token's M-RoPE rows are (short position, short position, slot code), delta `-E`.

New here (issue 56, step 2):

- **The short layers' metadata is built outside the forward**, by their own attention backend (a subclass of the
  platform's, `short_backend`) whose builder reads the step's M-RoPE rows from the runner's buffer (handed over by the
  model's first forward, the warm-up that vLLM's compilation mode runs before the first step) and builds the short
  layout: `query_start_loc`, `seq_lens`, the slot mapping into the short group's block table, the live-token gather
  index, and the long-layout positions of the step.
- **K/V of the short layers are written at the short slot mapping**: the backend's impl takes the slot mapping from
  its own metadata instead of the forward context's (which vLLM computes from long-layout positions).
- **The layers run as vLLM-compiled code** (`SavingCompiledRunner`, `support_torch_compile`) that takes the gather
  index and the long positions as inputs, the gather index with its own (unbacked) dynamic dimension; the outer
  forward (not compiled) only picks those tensors from the forward context's metadata: no host reads.

vLLM internals used (each named, guarded by tests/test_vllm_lvtc_savings.py): the runner's M-RoPE buffer is what the
model's `positions` is a view of (`positions._base`); `CommonAttentionMetadata.positions` holds the long-layout token
index; the CPU impl's `do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)`.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import CommonAttentionMetadata, subclass_attention_backend_with_overrides
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, get_kv_quant_mode
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

# the scheduler channel's set-up lives with the config hook (which cannot import this module)
from internvlx_hf.vllm.config_hook import (SAVING_ARCHITECTURE, LVTCSavingConfigHook,  # noqa: F401
                                           use_scheduler_channel)
from internvlx_hf.vllm.layout import LVTCLayout
from internvlx_hf.vllm.lvtc import KeyBiasAttention, KeyBiasRotary, LVTCRunner
from internvlx_hf.vllm.model import InternVLXForConditionalGeneration
from internvlx_hf.vllm.positions import tile_slots

#: The opt-in architecture name (a checkpoint is served with it through `hf_overrides`); the plugin registers it in
#: every vLLM process.
ARCHITECTURE = SAVING_ARCHITECTURE


# ----------------------------------------------------------------------------------------------- KV cache: spec


@dataclass(frozen=True, kw_only=True)
class LVTCShortSpec(AttentionSpec):
    """Full attention over the short layout of an LVTC request: the group's KV is indexed by short-layout position.

    An `AttentionSpec`, not a `FullAttentionSpec` subclass: vLLM's grouping (`is_kv_cache_spec_uniform`,
    `UniformTypeKVCacheSpecs`) asks the first layer's spec whether all others merge with it, and `FullAttentionSpec`
    accepts any subclass, so a subclass lands in the full-attention group whenever a full-attention layer comes first
    in the model's layer table (measured: one group of all 4 layers)."""

    short_per_tile: int
    long_per_tile: int

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # a text-only request holds as many short-layout tokens as long-layout ones
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes


def hr_only_slots(request, short_per_tile: int, long_per_tile: int) -> list[int]:
    """Sorted long-layout indices of a request's HR-only slots (each tile's slots past its first `short`)."""
    slots: list[int] = []
    for feature in request.mm_features or ():
        place = feature.mm_position
        embeds = torch.arange(place.offset, place.offset + place.length)
        if place.is_embed is not None:
            embeds = embeds[place.is_embed.to(torch.bool)]
        slot = torch.arange(embeds.numel()) % long_per_tile
        slots += embeds[slot >= short_per_tile].tolist()
    return sorted(slots)


class LVTCShortManager(FullAttentionManager):
    """Holds blocks for the short-layout tokens of each request only (its HR-only slots never get one)."""

    def __init__(self, kv_cache_spec: LVTCShortSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.short_per_tile = kv_cache_spec.short_per_tile
        self.long_per_tile = kv_cache_spec.long_per_tile
        self.requests: dict | None = None  # the scheduler's table, handed over by LVTCSchedulerMixin
        self._hr_only: dict[str, list[int]] = {}

    def short_tokens(self, request_id: str, num_tokens: int) -> int:
        if self.requests is None:
            raise RuntimeError("LVTC short-layout KV group: the scheduler did not hand over its requests "
                               "(scheduler_cls must be an LVTCSchedulerMixin subclass)")
        slots = self._hr_only.get(request_id)
        if slots is None:
            slots = hr_only_slots(self.requests[request_id], self.short_per_tile, self.long_per_tile)
            self._hr_only[request_id] = slots
        return num_tokens - bisect.bisect_left(slots, num_tokens)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        short = lambda n: self.short_tokens(request_id, n)  # noqa: E731
        return super().get_num_blocks_to_allocate(
            request_id, short(num_tokens), new_computed_blocks, short(total_computed_tokens),
            short(num_local_computed_tokens), short(num_tokens_main_model), apply_admission_cap=apply_admission_cap,
            prefill_end=prefill_end)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self.short_tokens(request_id, num_tokens),
                                           self.short_tokens(request_id, num_tokens_main_model))

    def free(self, request_id: str) -> None:
        self._hr_only.pop(request_id, None)
        super().free(request_id)


def register_spec() -> None:
    """Register the spec and its manager (vLLM's built-in specs first: the registry fills itself with them only while it
    is empty, so a spec registered before that would leave vLLM without its own)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LVTCShortSpec, LVTCShortManager, uniform_type_base_spec=LVTCShortSpec)


# ----------------------------------------------------------------------------------------------- scheduler channel


class LVTCSchedulerMixin:
    """Hands the scheduler's request table (each Request with its `mm_features`) to the short-layout KV managers.

    Also records, for the benchmark, the most blocks each request held in each KV-cache group."""

    lvtc_scheduler_channel = True  # what `config_hook.use_scheduler_channel` recognises (it cannot import this module)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks_held: dict[str, list[int]] = {}
        self.preemptions = 0
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, LVTCShortManager):
                manager.requests = self.requests

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        coordinator = self.kv_cache_manager.coordinator
        for request_id in list(self.requests):
            held = [sum(not block.is_null for block in manager.req_to_blocks.get(request_id, ()))
                    for manager in coordinator.single_type_managers]
            best = self.blocks_held.setdefault(request_id, [0] * len(held))
            self.blocks_held[request_id] = [max(a, b) for a, b in zip(best, held)]
        return out

    def _preempt_request(self, *args, **kwargs):
        self.preemptions += 1
        return super()._preempt_request(*args, **kwargs)


class LVTCScheduler(LVTCSchedulerMixin, Scheduler):
    pass


class LVTCAsyncScheduler(LVTCSchedulerMixin, AsyncScheduler):
    pass


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


def saving_positions(layout: LVTCLayout, length: int, mm_features: list) -> tuple[torch.Tensor, int]:
    """Rows (short position, short position, slot code) of a prompt, and the delta `-E` that continues them."""
    index = torch.arange(length, dtype=torch.int64)
    code, unused, tile = tile_slots(layout, length, mm_features, text_code=1)
    short = index - (torch.cumsum(unused, 0) - unused)
    code = torch.where(tile, code, short)
    return torch.stack([short, short, code]), -int(unused.sum())


# ------------------------------------------------------------------------------ short backend: metadata outside forward


class RowsChannel:
    """The runner's M-RoPE buffer, handed over by the model's first forward (vLLM gives the builder no reference to
    it). One per model; the short builder reads the step's rows from it before the forward pass."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None


def short_layout(rows: torch.Tensor, cm: CommonAttentionMetadata, short_per_tile: int, block_size: int) -> dict:
    """The step's short layout from its M-RoPE rows (columns = the step's long-layout tokens) and the runner's
    long-layout metadata of the short group (its block table): gather index of the live tokens, per request
    `query_start_loc` / `seq_lens` in short positions, and the live tokens' slots in the short group."""
    tokens, num_reqs = cm.num_actual_tokens, cm.num_reqs
    short, code = rows[1, :tokens], rows[2, :tokens]
    live = ~((code < 0) & (-1 - code >= short_per_tile))
    gather = torch.nonzero(live).squeeze(1)
    qsl = cm.query_start_loc_cpu[: num_reqs + 1].to(torch.int64)
    request = torch.bucketize(gather, qsl[1:], right=True)
    live_short = short[gather].to(torch.int64)
    lens = torch.bincount(request, minlength=num_reqs)
    short_qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    short_qsl[1:] = torch.cumsum(lens, 0)
    seq_lens = torch.zeros(num_reqs, dtype=torch.int64).scatter_reduce_(0, request, live_short + 1, "amax")
    blocks = cm.block_table_tensor[request, live_short // block_size].to(torch.int64)
    return {"gather": gather, "query_start_loc": short_qsl, "seq_lens": seq_lens.to(cm.seq_lens.dtype),
            "slot_mapping": blocks * block_size + live_short % block_size, "max_query_len": int(lens.max()),
            "max_seq_len": int(seq_lens.max())}


@functools.lru_cache(maxsize=None)
def short_backend(base: type, channel: RowsChannel) -> type:
    """The platform's attention backend with the short layers' builder and KV write (one class per base and model:
    vLLM groups attention layers by backend class, and asks that dynamic subclasses be cached)."""

    class LVTCShortBuilder(base.get_builder_cls()):
        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            cm = common_attn_metadata
            if channel.buffer is None:
                raise RuntimeError("LVTC-saving model: the short layers' metadata builder has no M-RoPE rows (the "
                                   "model's warm-up forward did not run); start the engine with compilation on "
                                   "(enforce_eager=False)")
            layout = short_layout(channel.buffer, cm, self.kv_cache_spec.short_per_tile,
                                  self.kv_cache_spec.block_size)
            short = CommonAttentionMetadata(
                query_start_loc=layout["query_start_loc"], query_start_loc_cpu=layout["query_start_loc"],
                seq_lens=layout["seq_lens"], num_reqs=cm.num_reqs, num_actual_tokens=layout["gather"].shape[0],
                max_query_len=layout["max_query_len"], max_seq_len=layout["max_seq_len"],
                block_table_tensor=cm.block_table_tensor, slot_mapping=layout["slot_mapping"], causal=True)
            meta = super().build(0, short, fast_build)
            meta.lvtc_gather = layout["gather"]
            meta.lvtc_long_positions = cm.positions[: cm.num_actual_tokens]
            return meta

    class LVTCShortImpl(base.get_impl_cls()):
        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            # vLLM's slot mapping for this group comes from long-layout positions; the short one is our metadata's
            metadata = get_forward_context().attn_metadata[layer.layer_name]
            super().do_kv_cache_update(layer, key, value, kv_cache, metadata.slot_mapping)

    return subclass_attention_backend_with_overrides(
        "LVTCShort_", base, {"get_builder_cls": staticmethod(lambda: LVTCShortBuilder),
                             "get_impl_cls": staticmethod(lambda: LVTCShortImpl)})


# ------------------------------------------------------------------------------------------------- compiled layers


@support_torch_compile(dynamic_arg_dims={"positions": -1, "inputs_embeds": 0, "gather": 0, "long_positions": 0},
                       mark_unbacked_dims={"gather": 0})
class SavingCompiledRunner(nn.Module):
    """The LLM's layers for the saving layout, compiled by vLLM: layers below k on the live tokens (`gather`, built
    by the short builder), scatter back, layer k's expansion (the shipped runner's), layers from k at `long_positions`.
    Borrows the shipped runner's expansion and columns; holds its upsampling table."""

    def __init__(self, *, shipped: LVTCRunner, vllm_config, prefix: str = ""):
        super().__init__()
        self.model = shipped.model
        self.layout: LVTCLayout = shipped.layout
        self.hidden = shipped.hidden
        self.injections = shipped.injections
        self.upsample = shipped.upsample

    _expand = LVTCRunner._expand
    _extra_columns = LVTCRunner._extra_columns

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor, gather: torch.Tensor,
                long_positions: torch.Tensor) -> torch.Tensor:
        lm = self.model[0].language_model.model
        hidden, side = inputs_embeds[:, : self.hidden], inputs_embeds[:, self.hidden:]
        layout = self.layout
        code = positions[2]
        slot = torch.where(code < 0, -1 - code, -1)
        hidden_s, residual_s = hidden.index_select(0, gather), None
        positions_s, side_s = positions[1].index_select(0, gather), side.index_select(0, gather)
        for index in range(layout.expand_layer):
            if index in self.injections:  # the extra LR projectors' columns: zeros outside the LR slots
                hidden_s = hidden_s + side_s[:, self._extra_columns(self.injections[index])]
            hidden_s, residual_s = lm.layers[index](positions_s, hidden_s, residual_s)
        hidden = hidden.new_zeros(hidden.shape).index_copy(0, gather, hidden_s + residual_s)
        hidden = self._expand(hidden, slot, side)
        residual = None
        for index in range(layout.expand_layer, len(lm.layers)):
            if index in self.injections:
                hidden = hidden + side[:, self._extra_columns(self.injections[index])]
            hidden, residual = lm.layers[index](long_positions, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden


class SavingFront(nn.Module):
    """Not compiled: hands the M-RoPE buffer to the short builder (first forward), picks the step's gather index and
    long positions from the short layers' metadata (tensors only), and calls the compiled layers."""

    def __init__(self, shipped: LVTCRunner, model, vllm_config):
        super().__init__()
        self.shipped = [shipped]  # its projector rows and embeddings; its layers run in `layers`
        self.channel = RowsChannel()
        layout = shipped.layout
        lm = model.language_model.model
        static = vllm_config.compilation_config.static_forward_context
        self.short_names: list[str] = []
        for index in range(layout.expand_layer):
            self_attn = lm.layers[index].self_attn
            wrapped = self_attn.attn
            if not isinstance(wrapped, KeyBiasAttention) or not isinstance(self_attn.rotary_emb, KeyBiasRotary):
                raise TypeError(f"LVTC-saving model: layer {index} of the shipped plugin is not built as expected "
                                f"(KeyBiasAttention + KeyBiasRotary below k); port saving.py to lvtc.py's changes")
            name = wrapped.attn.layer_name
            base = wrapped.attn.attn_backend
            static.pop(name)
            attn = LVTCShortAttention(wrapped.num_heads, wrapped.head_size, wrapped.scale,
                                      num_kv_heads=wrapped.num_kv_heads, cache_config=vllm_config.cache_config,
                                      prefix=name, attn_backend=short_backend(base, self.channel))
            attn.short_per_tile, attn.long_per_tile = layout.short_per_tile, layout.long_per_tile
            self_attn.attn = attn
            self_attn.rotary_emb = self_attn.rotary_emb.rotary
            self.short_names.append(name)
        self.layers = SavingCompiledRunner(shipped=shipped, vllm_config=vllm_config, prefix="lvtc_saving")

    def tile_rows(self, vit, lr):
        return self.shipped[0].tile_rows(vit, lr)

    def embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal):
        return self.shipped[0].embed_input_ids(input_ids, multimodal_embeddings, is_multimodal)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        if self.channel.buffer is None:
            self.channel.buffer = positions._base if positions._base is not None else positions
        tokens = positions.shape[1]
        metas = get_forward_context().attn_metadata
        if isinstance(metas, dict) and self.short_names[0] in metas:
            meta = metas[self.short_names[0]]
            gather = meta.lvtc_gather
            long_positions = positions[0].clone()
            long_positions[: meta.lvtc_long_positions.shape[0]] = meta.lvtc_long_positions
        else:  # warm-up / profile runs (no metadata): a gather index whose size differs from the token count's
            gather = torch.arange(max(tokens - 1, 1), device=positions.device)
            long_positions = positions[0]
        return self.layers(positions, inputs_embeds, gather, long_positions)


class InternVLXLVTCSavingCompiled(InternVLXForConditionalGeneration):
    """The shipped model with the short layers holding and computing the short layout, compiled. ``runner_class``:
    what runs the layers in place of the shipped runner (issue 52's eager engine gives its own)."""

    runner_class = SavingFront

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.layout is None:
            raise ValueError("the LVTC-saving model needs an LVTC checkpoint with expansion (k < depth)")
        self.lvtc = self.runner_class(self.lvtc, self, vllm_config)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        return saving_positions(self.layout, len(input_tokens), mm_features)


def register() -> None:
    """Register the spec and the architecture in this process. The plugin (`internvlx_hf.vllm.register`) registers the
    architecture lazily in every vLLM process, and importing this module registers the spec, so this is only needed
    where the plugin's entry point is not installed."""
    register_spec()
    ModelRegistry.register_model(ARCHITECTURE, InternVLXLVTCSavingCompiled)
    MODELS_CONFIG_MAP[ARCHITECTURE] = LVTCSavingConfigHook


# A process that builds the model, or receives the short group's spec from another process (the engine core gets the
# workers' specs pickled), imports this module first: the spec and its manager are then known there.
register_spec()
