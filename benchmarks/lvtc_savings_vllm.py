"""Issue 52 (research, not shipped): LVTC on vLLM 0.32, the layers below `k` holding and computing the short layout.

Experimental code for `bench_vllm_lvtc_savings.py`; it subclasses the shipped plugin (`internvlx_hf.vllm`) and uses
only vLLM's extension points, never editing or patching vLLM's files:

- **A KV-cache group of its own for layers below k** (`LVTCShortSpec`, an `AttentionSpec` registered with
  `KVCacheSpecRegistry` under a base type of its own, so vLLM's hybrid allocator puts those layers in their own
  group). Its manager (`LVTCShortManager`) indexes that group's KV by *short-layout* position: for a request of
  `n` long-layout tokens it holds blocks for `n - (HR-only slots before n)` tokens, so the HR-only slots never get a
  block, at prefill as after it. No alignment of the tiles to blocks is needed (hypothesis 1 is not).
- **The image positions reach the manager** through the scheduler: vLLM's `SchedulerConfig.scheduler_cls` names a
  subclass of its scheduler whose only addition hands the scheduler's `requests` table (each `Request` carries its
  `mm_features`) to the manager. vLLM's KV-cache managers are only given a request id and token counts.
- **Layers below k run on the live tokens** (text and LR slots; the HR-only slots are gathered out) with attention
  metadata rebuilt for them (`query_start_loc`, `seq_lens` and `slot_mapping` in short-layout positions, the short
  group's block table) through the backend's own metadata builder, put in vLLM's forward context for those layers'
  names during the forward pass only; at layer `k` the states are scattered back and upsampled as before.
- **Positions**: the per-request rows (vLLM's M-RoPE channel) carry each token's short-layout position and tile slot
  code, with `mrope_position_delta = -E` (E: the request's HR-only slot count), so that decoded tokens arrive with
  their short-layout position too. Long-layout positions (layers from k) come from the attention metadata
  (`seq_lens - query_len + offset`, exactly vLLM's own token index).

The spec, its manager, the scheduler channel, `LVTCShortAttention` and `saving_positions` now live in
`src/internvlx_hf/vllm/saving.py` (issue 56's compiled prototype, which builds the short layers' metadata outside the
forward); this file imports them.

It follows the shipped plugin's internals, so a rewrite of `src/internvlx_hf/vllm/lvtc.py` or `model.py` breaks it at
engine start (tests/test_vllm_lvtc_savings.py builds it to catch that). Written against the plugin of commit 4d6c4f8
(the recorded figures); ported to the plugin of a8427e2, where `LVTCRunner` is an `nn.Module` compiled by vLLM, the
short layers get `KeyBiasAttention` + `KeyBiasRotary`, and the projectors' outputs come in wide embedding rows:
`SavingRunner` is a module beside the shipped runner, restores plain attention and RoPE in the short layers, reads
the wide rows, and runs eager only. Not handled: LongRoPE's switch (Phi-3 prompts whose positions pass
`original_max_position_embeddings`; the rows here carry no long-factor offset).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.forward_context import get_forward_context
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.v1.attention.backend import CommonAttentionMetadata

from internvlx_hf.vllm.config_hook import LVTCConfigHook
from internvlx_hf.vllm.layout import LVTCLayout
from internvlx_hf.vllm.lvtc import KeyBiasAttention, KeyBiasRotary, LVTCRunner
# the KV-cache spec, its manager, the scheduler channel and the position rows live in the issue-56 prototype
from internvlx_hf.vllm.saving import (  # noqa: F401  (re-exported for the benchmark and tests)
    InternVLXLVTCSavingCompiled, LVTCAsyncScheduler, LVTCScheduler, LVTCSchedulerMixin, LVTCShortAttention,
    LVTCShortManager, LVTCShortSpec, hr_only_slots, saving_positions, use_scheduler_channel)

#: The architecture name the experiment registers (a checkpoint is served with it through `hf_overrides`).
ARCHITECTURE = "InternVLXLVTCSavingForConditionalGeneration"


class SavingConfigHook(LVTCConfigHook):
    """The shipped hook (whole images per step, no prefix caching, position rows), plus the scheduler channel."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        LVTCConfigHook.verify_and_update_config(vllm_config)
        if not vllm_config.model_config.enforce_eager:
            # SavingRunner sizes each step's short layers from the step's metadata on the host (no capture)
            raise ValueError("the LVTC-saving experiment runs eager only: start the engine with enforce_eager=True")
        use_scheduler_channel(vllm_config)


# --------------------------------------------------------------------------------------------------- the model


class SavingRunner(nn.Module):
    """The shipped `LVTCRunner`'s projector rows and expansion, with layers below k on the live tokens only.

    A module beside the shipped runner (which it holds as `shipped` and borrows `tile_rows`, `embed_input_ids`,
    `_extra_columns` and `_expand` from), not a subclass: the shipped runner is compiled whole by vLLM
    (`support_torch_compile`), and this forward reads the step's metadata on the host (token counts, masks), so the
    experiment runs eager only (`SavingConfigHook` refuses anything else)."""

    def __init__(self, shipped: LVTCRunner, model, vllm_config):
        super().__init__()
        self.shipped = shipped
        self.model = shipped.model  # a list: the model is not a submodule of its runner
        self.layout: LVTCLayout = shipped.layout
        self.hidden = shipped.hidden
        self.injections = shipped.injections
        self.vllm_config = vllm_config
        layout = self.layout
        lm = model.language_model.model
        static = vllm_config.compilation_config.static_forward_context
        self.short_names: list[str] = []
        for index in range(layout.expand_layer):
            self_attn = lm.layers[index].self_attn
            # The shipped runner gave these layers a padded-head Attention (`KeyBiasAttention`) and a rotary embedding
            # that writes the unused-slot mask into the extra head dimensions (`KeyBiasRotary`); here the unused
            # slots never reach these layers, so both go back to plain ones, at the same layer name (vLLM binds the
            # layer's KV cache by it).
            wrapped = self_attn.attn
            if not isinstance(wrapped, KeyBiasAttention) or not isinstance(self_attn.rotary_emb, KeyBiasRotary):
                raise TypeError(f"LVTC-saving experiment: layer {index} of the shipped plugin is not built as this "
                                f"experiment expects (KeyBiasAttention + KeyBiasRotary below k); it follows "
                                f"src/internvlx_hf/vllm/lvtc.py and must be ported to its changes")
            name = wrapped.attn.layer_name
            static.pop(name)
            attn = LVTCShortAttention(wrapped.num_heads, wrapped.head_size, wrapped.scale,
                                      num_kv_heads=wrapped.num_kv_heads, cache_config=vllm_config.cache_config,
                                      prefix=name)
            attn.short_per_tile, attn.long_per_tile = layout.short_per_tile, layout.long_per_tile
            self_attn.attn = attn
            self_attn.rotary_emb = self_attn.rotary_emb.rotary
            self.short_names.append(name)
        self.builder = None

    # the shipped runner's pieces that do not change
    def tile_rows(self, vit, lr):
        return self.shipped.tile_rows(vit, lr)

    def embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal):
        return self.shipped.embed_input_ids(input_ids, multimodal_embeddings, is_multimodal)

    # ------------------------------------------------------------------------------------- short metadata

    def _short_metadata(self, metas: dict, live: torch.Tensor, short_index: torch.Tensor):
        """Per short layer, attention metadata for the live tokens in short-layout positions and their slot mapping
        (one per KV-cache group: vLLM may split the short layers into several groups, each with its block table);
        and the long token index of every token (vLLM's own position of it)."""
        ref = metas[self.short_names[0]]
        num_reqs = ref.seq_lens.shape[0]
        qsl = ref.query_start_loc[: num_reqs + 1].to(torch.int64)
        tokens = live.shape[0]
        position = torch.arange(tokens, device=live.device)
        request = torch.bucketize(position, qsl[1:], right=True).clamp_(max=num_reqs - 1)
        query_len = qsl[1:] - qsl[:-1]
        seq_lens = ref.seq_lens.to(torch.int64)
        long_index = seq_lens[request] - query_len[request] + (position - qsl[request])
        live = live & (position < qsl[-1])
        live_request = request[live]
        live_short = short_index[live]
        lens = torch.zeros(num_reqs, dtype=torch.int64).scatter_add_(0, live_request, torch.ones_like(live_request))
        short_qsl = torch.zeros(num_reqs + 1, dtype=ref.query_start_loc.dtype)
        short_qsl[1:] = torch.cumsum(lens, 0)
        short_seq = torch.zeros(num_reqs, dtype=torch.int64).scatter_reduce_(0, live_request, live_short + 1, "amax")
        if self.builder is None:
            layer = self.vllm_config.compilation_config.static_forward_context[self.short_names[0]]
            spec = layer.get_kv_cache_spec(self.vllm_config)
            builder_cls = layer.attn_backend.get_builder_cls()
            self.builder = builder_cls(spec, self.short_names, self.vllm_config, live.device)
        block = self.builder.kv_cache_spec.block_size
        per_group: dict[int, tuple] = {}
        installed = {}
        for name in self.short_names:
            group_meta = metas[name]  # the runner builds one metadata object per KV-cache group
            key = id(group_meta)
            if key not in per_group:
                block_table = group_meta.block_table
                slots = block_table[live_request, live_short // block].to(torch.int64) * block + live_short % block
                common = CommonAttentionMetadata(
                    query_start_loc=short_qsl, query_start_loc_cpu=short_qsl.cpu(),
                    seq_lens=short_seq.to(ref.seq_lens.dtype), num_reqs=num_reqs,
                    num_actual_tokens=int(live.sum()), max_query_len=int(lens.max()),
                    max_seq_len=int(short_seq.max()), block_table_tensor=block_table, slot_mapping=slots,
                    causal=True,
                )
                per_group[key] = (self.builder.build(0, common), slots)
            installed[name] = per_group[key]
        return installed, long_index, live

    # -------------------------------------------------------------------------------------------- forward

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds`: the shipped runner's wide rows (`[LLM input | HR | extra LR projectors]`, zeros past the
        LLM input outside the tile slots); `positions`: this experiment's rows (`saving_positions`)."""
        lm = self.model[0].language_model.model
        hidden, side = inputs_embeds[:, : self.hidden], inputs_embeds[:, self.hidden:]
        tokens, dim = hidden.shape
        layout = self.layout
        short_index, code = positions[1], positions[2]
        slot = torch.where(code < 0, -1 - code, -1)
        hr_only = slot >= layout.short_per_tile
        context = get_forward_context()
        metas = context.attn_metadata if isinstance(context.attn_metadata, dict) else None
        live = ~hr_only
        saved = {}
        if metas:
            installed, long_index, live = self._short_metadata(metas, live, short_index)
            for name, (short_meta, slots) in installed.items():
                saved[name] = (metas[name], context.slot_mapping[name])
                metas[name] = short_meta
                context.slot_mapping[name] = slots
        else:  # profiling / warm-up runs without metadata
            long_index = positions[0]
        try:
            hidden_s, residual_s = hidden[live], None
            positions_s, side_s = short_index[live], side[live]
            for index in range(layout.expand_layer):
                if index in self.injections:  # the extra LR projectors' columns: zeros outside the LR slots
                    hidden_s = hidden_s + side_s[:, self.shipped._extra_columns(self.injections[index])]
                hidden_s, residual_s = lm.layers[index](positions_s, hidden_s, residual_s)
        finally:
            for name, (meta, slot_mapping) in saved.items():
                metas[name] = meta
                context.slot_mapping[name] = slot_mapping
        hidden = hidden.new_zeros(tokens, dim)
        hidden[live] = hidden_s + residual_s if residual_s is not None else hidden_s
        hidden = self.shipped._expand(hidden, slot, side)
        residual = None
        for index in range(layout.expand_layer, len(lm.layers)):
            if index in self.injections:
                hidden = hidden + side[:, self.shipped._extra_columns(self.injections[index])]
            hidden, residual = lm.layers[index](long_index, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden


class InternVLXLVTCSaving(InternVLXLVTCSavingCompiled):
    """Issue 56's model with issue 52's `SavingRunner` (short metadata rebuilt in the forward, eager only)."""

    runner_class = SavingRunner


def register() -> None:
    """Make vLLM (in this process) know the experimental architecture; serve a checkpoint with
    `hf_overrides={"architectures": [ARCHITECTURE]}`."""
    from internvlx_hf.vllm import saving

    saving.register()  # the spec and manager, and issue 56's compiled prototype (`saving.ARCHITECTURE`)
    ModelRegistry.register_model(ARCHITECTURE, InternVLXLVTCSaving)
    MODELS_CONFIG_MAP[ARCHITECTURE] = SavingConfigHook
