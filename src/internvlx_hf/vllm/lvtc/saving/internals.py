"""The vLLM internals (not public API) the saving path uses, each as it is in vLLM 0.32: what is checked, and what
breaks if vLLM changes it (docs/serving-vllm-lvtc.md lists them)."""

from __future__ import annotations

import dataclasses
import inspect

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationConfig
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.v1.attention.backend import (AttentionMetadataBuilder, CommonAttentionMetadata,
                                      subclass_attention_backend_with_overrides)
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator, KVCacheCoordinator
from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.core.kv_cache_utils import KVCacheBlock, resolve_block_hashes
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from internvlx_hf.vllm_compat import source_has


def _parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


#: The vLLM internals (not public API) the saving path uses, each as it is in vLLM 0.32: what is checked, and what
#: breaks if vLLM changes it. docs/serving-vllm-lvtc.md lists them; `missing_internals` checks them where the config
#: hook chooses the path (a vLLM that differs gets the masked path with one log line), and
#: tests/test_vllm_lvtc_savings.py asserts that none is missing from the vLLM it runs.
INTERNALS = {
    "KVCacheSpecRegistry._ensure_registered() and register(spec, manager, uniform_type_base_spec)": (
        lambda: hasattr(KVCacheSpecRegistry, "_ensure_registered")
        and _parameters(KVCacheSpecRegistry.register) == [
            "kvcache_spec_cls", "manager_class", "uniform_type_base_spec"],
        "the short group's spec and manager are unknown to vLLM: the layers below k would join the full-attention "
        "group (long-layout KV)"),
    "SingleTypeKVCacheManager.get_num_blocks_to_allocate / allocate_new_blocks / free signatures": (
        lambda: _parameters(FullAttentionManager.get_num_blocks_to_allocate) == [
            "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens", "num_local_computed_tokens",
            "num_tokens_main_model", "apply_admission_cap", "prefill_end"]
        and _parameters(FullAttentionManager.allocate_new_blocks) == ["request_id", "num_tokens",
                                                                      "num_tokens_main_model"]
        and _parameters(FullAttentionManager.free) == ["request_id"],
        "LVTCShortManager sizes the short group by short-layout tokens through these calls"),
    "Scheduler.requests, kv_cache_manager.coordinator.single_type_managers, _preempt_request": (
        lambda: hasattr(Scheduler, "_preempt_request") and hasattr(Scheduler, "schedule")
        and source_has(Scheduler.__init__, "self.requests: dict[str, Request]",
                       "self.kv_cache_manager = KVCacheManager(")
        and source_has(KVCacheManager.__init__, "self.coordinator = get_kv_cache_coordinator(")
        and source_has(KVCacheCoordinator.__init__, "self.single_type_managers = "),
        "the scheduler channel (LVTCSchedulerMixin) cannot hand the request table to the short group's managers"),
    "CommonAttentionMetadata fields (positions, block_table_tensor, query_start_loc_cpu, ...)": (
        lambda: {"query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
                 "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal", "positions",
                 "seq_lens_cpu_upper_bound"}
        <= {field.name for field in dataclasses.fields(CommonAttentionMetadata)},
        "the short builder reads the step's long-layout metadata and builds the short layout's"),
    "subclass_attention_backend_with_overrides(name_prefix, backend, overrides)": (
        lambda: _parameters(subclass_attention_backend_with_overrides) == [
            "name_prefix", "attention_backend_cls", "overrides"],
        "the short layers' backend (their own metadata builder and KV write) cannot be made"),
    "AttentionMetadataBuilder.get_cudagraph_support(vllm_config, kv_cache_spec); a builder without full-graph support "
    "lowers full decode graphs (CompilationConfig.resolve_cudagraph_mode_and_sizes)": (
        lambda: _parameters(AttentionMetadataBuilder.get_cudagraph_support) == ["vllm_config", "kv_cache_spec"]
        and source_has(CompilationConfig.resolve_cudagraph_mode_and_sizes,
                       "cudagraph_mode.decode_mode() == CUDAGraphMode.FULL",
                       "and min_cg_support == AttentionCGSupport.NEVER", "splitting_ops_contain_attention()"),
        "a full CUDA graph could replay the short layers' attention with a stale layout (their builder says it "
        "captures none)"),
    "support_torch_compile(mark_unbacked_dims=...)": (
        lambda: "mark_unbacked_dims" in _parameters(support_torch_compile),
        "the gather index of live tokens cannot get its own dynamic size in the compiled layers"),
    "get_attention_context(layer_name), vLLM's lookup of a layer's metadata in a step (a dict, or a list of them)": (
        lambda: _parameters(get_attention_context) == ["layer_name"]
        and source_has(get_attention_context, "isinstance(attn_metadata_raw, dict)",
                       "isinstance(attn_metadata_raw, list)"),
        "the short layers' K/V update could not find its step's metadata (the slots it writes)"),
}


#: What prefix caching and chunked prefill on the saving path use besides `INTERNALS` (a vLLM that lacks one keeps the
#: saving path with whole prompts per step and prefix caching off, said at start: `path._whole_prompts_reason`).
CONVERSATION_INTERNALS = {
    "Scheduler._get_local_prefix_cache_hit(request), the lookup of a waiting request, subclassed by the scheduler": (
        lambda: _parameters(Scheduler._get_local_prefix_cache_hit) == ["request"]
        and source_has(Scheduler._get_local_prefix_cache_hit, "self.kv_cache_manager.get_computed_blocks(request)")
        and source_has(Scheduler.schedule, "= self._get_local_prefix_cache_hit(request)"),
        "the short group's cache lookup would not know the request's tiles (it would find no hit)"),
    "SingleTypeKVCacheManager.find_longest_cache_hit / cache_blocks / add_local_computed_blocks signatures": (
        lambda: _parameters(FullAttentionManager.find_longest_cache_hit) == [
            "block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec", "drop_eagle_block",
            "alignment_tokens", "dcp_world_size", "pcp_world_size"]
        and _parameters(FullAttentionManager.cache_blocks) == [
            "request", "num_tokens", "retention_interval", "replay_boundaries"]
        and _parameters(FullAttentionManager.add_local_computed_blocks) == [
            "request_id", "new_computed_blocks", "num_local_computed_tokens", "num_external_computed_tokens"],
        "the short group's blocks would be cached or found by long-layout counts"),
    "HybridKVCacheCoordinator takes each group's hit length, and copies a partly used last block": (
        lambda: source_has(HybridKVCacheCoordinator.find_longest_cache_hit, "curr_hit_length = _new_hit_length")
        and hasattr(FullAttentionManager, "_apply_cow"),
        "a hit at a tile's start inside a block could not be served"),
    "Scheduler._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens), the last word on a step": (
        lambda: _parameters(Scheduler._reserve_prefill_lookahead) == [
            "request", "num_computed_tokens", "num_new_tokens"]
        and leaves_zero_token_requests_unscheduled(inspect.getsource(Scheduler.schedule)),
        "a prefill chunk could end inside a tile, or a request put off a step be scheduled with no tokens"),
    "BlockPool.cache_full_blocks keys block i by request.block_hashes[i] (resolve_block_hashes passes the list "
    "through at equal block sizes)": (
        lambda: source_has(BlockPool.cache_full_blocks, "request.block_hashes")
        and _passes_hashes_through(resolve_block_hashes),
        "the short group's blocks (cached through `_KeyedRequest`, whose block_hashes are their keys) would be "
        "cached under other blocks' keys: a later hit would read another prompt's K/V"),
    "Scheduler.schedule starts with kv_cache_manager.new_step_starts(); allocate_slots sizes a request "
    "(get_num_blocks_to_allocate) before it caches its blocks (cache_blocks)": (
        lambda: source_has(Scheduler.schedule, "self.kv_cache_manager.new_step_starts()")
        and source_has(KVCacheCoordinator.new_step_starts, "manager.new_step_starts()")
        and _in_order(KVCacheManager.allocate_slots, "self.coordinator.get_num_blocks_to_allocate(",
                      "self.coordinator.cache_blocks("),
        "a hit could copy a block the same step fills before the step computes it (`_copies_block_filled_this_step`)"),
    "KVCacheManager.estimate_cached_tokens(request), called on the scheduler's manager for a request's prefill stats, "
    "reads kv_cache_config.kv_cache_groups, get_blocks(request_id).blocks and each block's block_hash_num_tokens": (
        lambda: _parameters(KVCacheManager.estimate_cached_tokens) == ["request"]
        and source_has(Scheduler.update_from_output, "self.kv_cache_manager.estimate_cached_tokens(request)")
        and source_has(KVCacheManager.estimate_cached_tokens, "self.kv_cache_config.kv_cache_groups",
                       "self.get_blocks(request.request_id).blocks")
        and "blocks" in {field.name for field in dataclasses.fields(KVCacheBlocks)}
        and isinstance(inspect.getattr_static(KVCacheBlock, "block_hash_num_tokens", None), property),
        "the scheduler's replacement (`_estimate_cached_tokens`, the cached tokens of a request's prefill stats in the "
        "long layout's units) would read what this vLLM no longer has"),
}


#: What the saving path uses on vLLM's second model runner (V2, `model_state.py`) besides `INTERNALS`: checked where
#: the engine runs V2 (a vLLM that differs gets the masked path with one log line, `path._masked_reason`). Each
#: reads V2's modules when asked (they need not import where V1 runs).
V2_INTERNALS = {
    "V2 asks the model for its runner state (resolve_model_state_cls: get_model_state_cls()), a DefaultModelState "
    "subclass with __init__(vllm_config, model, encoder_cache, device), add_request(req_index, new_req_data), "
    "remove_request(req_id)": (
        lambda: source_has(_v2("model_states").resolve_model_state_cls, 'hasattr(model, "get_model_state_cls")')
        and _parameters(_v2("model_states.default").DefaultModelState.__init__) == [
            "vllm_config", "model", "encoder_cache", "device"]
        and _parameters(_v2("model_states.default").DefaultModelState.add_request) == ["req_index", "new_req_data"]
        and _parameters(_v2("model_states.default").DefaultModelState.remove_request) == ["req_id"],
        "V2 would keep no tiles per request (vLLM's default runner state) and the short builder would get none"),
    "V2 builds a step's attention metadata (model_state.prepare_attn) before it writes the step's positions "
    "(prepare_inputs), handing build_attn_metadata the state's model_specific_attn_metadata, whose "
    "get_extra_attn_kwargs(attn_metadata_builder, num_reqs) gives each builder its arguments": (
        lambda: _in_order(_v2("model_runner").GPUModelRunner.execute_model, "self.model_state.prepare_attn(",
                          "self.model_state.prepare_inputs(input_batch")
        and source_has(_v2("attn_utils").build_attn_metadata, "model_specific_attn_metadata.get_extra_attn_kwargs(")
        and source_has(_v2("model_states.default").DefaultModelState.prepare_attn,
                       "model_specific_attn_metadata=model_specific_attn_metadata")
        and _parameters(_v2("model_states.interface").ModelSpecificAttnMetadata.get_extra_attn_kwargs) == [
            "attn_metadata_builder", "num_reqs"],
        "the short builder would get no tiles for the step (it stops), or get them for another step"),
    "RopeState.init_prefill_positions stages each request's rows on the host (StagedWriteTensor.stage_write: "
    "_staged_write_indices, _staged_write_contents, _staged_write_cu_lens), row num_dims * req_index + i": (
        lambda: source_has(_v2("mm.rope").RopeState.init_prefill_positions,
                           "self.prefill_positions.stage_write(self.num_dims * req_idx + i, 0, pos)")
        and source_has(_v2("buffer_utils").StagedWriteTensor.stage_write, "self._staged_write_indices.append(index)",
                       "self._staged_write_contents.extend(x)",
                       "self._staged_write_cu_lens.append(len(self._staged_write_contents))"),
        "a new request's rows could not be checked against its tiles (`model_state.staged_rows`)"),
    "V2's dummy runs build their batch with InputBatch.make_dummy, whose requests are f\"req_{i}_{random_uuid()}\" "
    "(16 hex digits)": (
        lambda: source_has(_v2("input_batch").InputBatch.make_dummy, 'req_ids = [f"req_{i}_{random_uuid()}"')
        and _dummy_ids_recognised(),
        "a dummy run could not be told from a step of requests the runner state never received (it would stop)"),
}


def _dummy_ids_recognised() -> bool:
    from vllm.utils import random_uuid

    from internvlx_hf.vllm.lvtc.saving.model_state import is_dummy_batch

    return is_dummy_batch([f"req_{i}_{random_uuid()}" for i in range(3)])


def _v2(module: str):
    """A module of vLLM's second model runner, `vllm.v1.worker.gpu.<module>`."""
    import importlib

    return importlib.import_module(f"vllm.v1.worker.gpu.{module}")


def leaves_zero_token_requests_unscheduled(schedule_source: str) -> bool:
    """Whether both of `Scheduler.schedule`'s loops ask `_reserve_prefill_lookahead` last and leave a request it
    answers 0 for unscheduled this step: the running loop goes on to the next request, the waiting loop stops (the
    request and those after it stay waiting). The saving path's deferral (`LVTCSchedulerMixin`) answers 0 for a
    request whose hit copies a block the same step fills."""
    import re

    calls = [m.end() for m in re.finditer(r"num_new_tokens = self\._reserve_prefill_lookahead\(", schedule_source)]
    if len(calls) != 2:
        return False
    running, waiting = (schedule_source[end: end + 2500] for end in calls)
    zero = r"\)\s+if num_new_tokens == 0:(\s+#[^\n]*)*\s+"
    return bool(re.match(r"[^)]*" + zero + r"req_index \+= 1\s+continue", running)
                and re.match(r"[^)]*" + zero + r"break", waiting))


def _passes_hashes_through(resolve) -> bool:
    hashes = [b"block"]
    return resolve(hashes, 16, 16) is hashes


def _in_order(function, *snippets: str) -> bool:
    source = inspect.getsource(function)
    places = [source.find(snippet) for snippet in snippets]
    return -1 not in places and places == sorted(places)


def missing_internals(table: dict | None = None) -> list[str]:
    """The entries of `table` (`INTERNALS` by default) this vLLM does not have as the saving path uses them."""
    missing = []
    for name, (check, _) in (INTERNALS if table is None else table).items():
        try:
            ok = bool(check())
        except Exception:  # an attribute gone, a signature that cannot be read
            ok = False
        if not ok:
            missing.append(name)
    return missing
