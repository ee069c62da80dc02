"""LVTC's short-KV path on vLLM, its "saving path" (the default for LVTC checkpoints with expansion): the layers below
`k` hold and compute the short layout only (docs/serving-vllm-lvtc.md, "The saving path: how it works").

The request is scheduled in its long layout (vLLM keeps one token count per request); the layers from `k` run on it as
on any model. The layers below `k`:

- **hold K/V for the short layout only**: `LVTCShortSpec` / `LVTCShortManager`, a KV-cache group of their own whose
  blocks cover each request's short-layout tokens (the long count less the HR-only slots before it, from the
  request's `mm_features`, which `LVTCSchedulerMixin` hands over: the engine's `scheduler_cls` is `lvtc_scheduler`);
- **get their metadata before the forward pass** from their own attention backend (`short_backend`, a subclass of the
  platform's), whose builder reads the step's position rows from the runner's M-RoPE buffer and builds the short
  layout (`short_layout.short_layout`, plain torch: `query_start_loc`, `seq_lens`, the slot mapping into the short
  group's blocks, the gather index of the live tokens), checking that the rows belong to the step; the backend's KV
  write takes that slot mapping;
- **run on the live tokens only**, in the layer loop both paths share (`layers.LVTCLayers.run_layers`), compiled by
  vLLM (`ShortKVLayers`), which takes the gather index and the step's long positions as inputs (the gather index with
  a dynamic size of its own); `ShortKVFront` (not compiled) builds the short layers' attention from vLLM's, hands the
  M-RoPE buffer to the builder at the first forward and picks those tensors from the metadata. The forward pass
  reads nothing back to Python, except in the one step built before the first forward where vLLM runs no warm-up
  (`PendingShortMetadata`).

Prefix caching: the short group's blocks are keyed by the long layout's block hashes (`tiles.short_block_keys`), a hit
may end at a tile's start or where a step resumes a tile (`tiles.RequestTiles.longest_hit`), and a request whose hit
would copy a block the same step fills waits a step (`LVTCSchedulerMixin`).

Positions: `positions.saving_positions` / `positions.saving_rope_indices` (LongRoPE included). The vLLM internals this
uses are listed, with what breaks, in `INTERNALS` and docs/serving-vllm-lvtc.md; `config_hook.choose_lvtc_path` sends
an engine whose vLLM differs to the masked path (`masked.py`), with one log line.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import CommonAttentionMetadata, subclass_attention_backend_with_overrides
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator, KVCacheCoordinator
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, get_kv_quant_mode
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from internvlx_hf.vllm.lvtc.layers import LVTCLayers
from internvlx_hf.vllm.lvtc.positions import saving_rope_indices
from internvlx_hf.vllm.lvtc.short_layout import short_layout
from internvlx_hf.vllm.lvtc.tiles import RequestTiles, short_block_keys, whole_tiles_end
from internvlx_hf.vllm_compat import source_has


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


#: The request whose prefix-cache hit vLLM is looking up (`LVTCSchedulerMixin` sets it around the lookup): vLLM's
#: `find_longest_cache_hit` is a class method that is given the block hashes, not the request and its tiles.
LOOKUP_REQUEST: contextvars.ContextVar[RequestTiles | None] = contextvars.ContextVar("lvtc_lookup", default=None)


class _KeyedRequest:
    """A request seen by vLLM's block pool with the short group's block keys as its block hashes."""

    def __init__(self, request, block_hashes: list) -> None:
        self._request = request
        self.block_hashes = block_hashes

    def __getattr__(self, name: str):
        return getattr(self._request, name)


class LVTCShortManager(FullAttentionManager):
    """Holds blocks for the short-layout tokens of each request only (its HR-only slots never get one).

    Prefix caching: a short block is cached under the long-layout block hash of its last token's block
    (`short_block_keys`); a hit of ``L`` long tokens (the full-attention group's, at most) is taken where ``L`` splits
    no tile and the cached short blocks hold its ``s(L)`` short tokens (`find_longest_cache_hit`)."""

    def __init__(self, kv_cache_spec: LVTCShortSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.short_per_tile = kv_cache_spec.short_per_tile
        self.long_per_tile = kv_cache_spec.long_per_tile
        self.requests: dict | None = None  # the scheduler's table, handed over by LVTCSchedulerMixin
        self._tiles: dict[str, RequestTiles] = {}  # each live request's, computed once
        self._keys: dict[str, list] = {}  # each request's short block keys so far (`short_block_keys`)
        #: every KV-cache group's managers, handed over by LVTCSchedulerMixin to the one short manager that records
        #: `filled_this_step` for all groups
        self.managers: list | None = None
        #: `(group, block id)` of each block the step being scheduled fills, in every group (`cache_blocks`): vLLM
        #: enters such a block in the cache now, and this step's forward computes it
        self.filled_this_step: set[tuple[int, int]] = set()
        self._computed_before: dict[str, int] = {}  # each request's tokens computed before this step (long layout)

    def tiles(self, request) -> RequestTiles:
        """A request's tiles, kept until it is freed (the scheduler and this group's calls ask on every step)."""
        tiles = self._tiles.get(request.request_id)
        if tiles is None:
            tiles = self._tiles[request.request_id] = RequestTiles.of(
                request, self.short_per_tile, self.long_per_tile)
        return tiles

    def short_tokens(self, request_id: str, num_tokens: int) -> int:
        if self.requests is None:
            raise RuntimeError("LVTC short-layout KV group: the scheduler did not hand over its requests "
                               "(scheduler_cls must be an LVTCSchedulerMixin subclass)")
        return self.tiles(self.requests[request_id]).short(num_tokens)

    def held_tokens(self, request_id, new_computed_blocks, num_computed_tokens) -> int:
        """Short-layout tokens a hit of `num_computed_tokens` gives the request: all of the hit's, or, where it
        resumes a tile (`RequestTiles.resume_point`), those of the blocks found (the step recomputes the rest)."""
        short = self.short_tokens(request_id, num_computed_tokens)
        if new_computed_blocks:
            short = min(short, len(new_computed_blocks) * self.block_size)
        return short

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        self._computed_before[request_id] = total_computed_tokens  # (read by this allocation's `cache_blocks`)
        short = lambda n: self.short_tokens(request_id, n)  # noqa: E731
        return super().get_num_blocks_to_allocate(
            request_id, short(num_tokens), new_computed_blocks, short(total_computed_tokens),
            self.held_tokens(request_id, new_computed_blocks, num_local_computed_tokens), short(num_tokens_main_model),
            apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(request_id, self.short_tokens(request_id, num_tokens),
                                           self.short_tokens(request_id, num_tokens_main_model))

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks,
                                          self.held_tokens(request_id, new_computed_blocks, num_local_computed_tokens),
                                          num_external_computed_tokens)

    def cache_blocks(self, request, num_tokens: int, retention_interval=None, *, replay_boundaries) -> None:
        tiles = self.tiles(request)
        size = self.block_size
        before = self._computed_before.pop(request.request_id, num_tokens)
        if self.managers is not None and num_tokens > before:
            self._record_filled(request.request_id, tiles, before, num_tokens)
        hashes = request.block_hashes
        full = tiles.short(num_tokens) // size
        if full <= self.num_cached_block.get(request.request_id, 0):
            return  # (every step of a decoding request: nothing new to cache)
        keys = self._keys.setdefault(request.request_id, [])
        if len(keys) < full:  # the keys of earlier blocks never change: only the new ones are computed
            keys += short_block_keys(tiles, hashes, full, size, first=len(keys))
        super().cache_blocks(_KeyedRequest(request, keys[:full]), len(keys[:full]) * self.block_size,
                             retention_interval, replay_boundaries=replay_boundaries)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        """The longest hit of at most `max_length` long-layout tokens (the full-attention group's hit) that splits no
        tile and whose short-layout tokens the cached short blocks hold (see the class). It may end inside a block:
        at a tile's start, where a block boundary would split the tile (an image's tiles seldom start on one); vLLM
        then copies each group's last, partly used block (its copy-on-write of a partial hit)."""
        found: tuple[list, ...] = tuple([] for _ in kv_cache_group_ids)
        tiles = LOOKUP_REQUEST.get()
        if tiles is None:  # (a lookup the scheduler did not announce: no hit rather than a guess)
            return found, 0
        size = kv_cache_spec.block_size
        for key in short_block_keys(tiles, block_hashes, cdiv(tiles.short(max_length), size), size):
            cached = block_pool.get_cached_block(key, kv_cache_group_ids)
            if not cached:
                break
            for blocks, block in zip(found, cached):
                blocks.append(block)
        length = tiles.longest_hit(max_length, len(found[0]) * size, max(size, alignment_tokens), size)
        held = min(cdiv(tiles.short(length), size), len(found[0]))
        return tuple(blocks[:held] for blocks in found), length

    def new_step_starts(self) -> None:
        super().new_step_starts()
        self.filled_this_step.clear()

    def _record_filled(self, request_id: str, tiles: RequestTiles, before: int, num_tokens: int) -> None:
        """Record the blocks of every group that this step's tokens ``[before, num_tokens)`` of a request fill (the
        first maybe partly computed before: it is complete only after this step)."""
        for manager in self.managers:
            short = isinstance(manager, LVTCShortManager)
            first, end = (tiles.short(before), tiles.short(num_tokens)) if short else (before, num_tokens)
            blocks = manager.req_to_blocks.get(request_id, ())
            for block in blocks[first // manager.block_size: end // manager.block_size]:
                self.filled_this_step.add((manager.kv_cache_group_id, block.block_id))

    def _forget(self, request_id: str) -> None:
        self._tiles.pop(request_id, None)
        self._keys.pop(request_id, None)
        self._computed_before.pop(request_id, None)

    def pop_blocks_for_free(self, request_id: str):
        self._forget(request_id)
        return super().pop_blocks_for_free(request_id)

    def free(self, request_id: str) -> None:
        self._forget(request_id)
        super().free(request_id)


# ----------------------------------------------------------------------------------------------- guarded internals


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
    "support_torch_compile(mark_unbacked_dims=...)": (
        lambda: "mark_unbacked_dims" in _parameters(support_torch_compile),
        "the gather index of live tokens cannot get its own dynamic size in the compiled layers"),
}


#: What prefix caching and chunked prefill on the saving path use besides `INTERNALS` (a vLLM that lacks one keeps the
#: saving path with whole prompts per step and prefix caching off, said at start: `config_hook._whole_prompts_reason`).
CONVERSATION_INTERNALS = {
    "KVCacheManager.get_computed_blocks(request), wrapped by the scheduler": (
        lambda: _parameters(KVCacheManager.get_computed_blocks) == ["request"]
        and source_has(Scheduler._get_local_prefix_cache_hit, "self.kv_cache_manager.get_computed_blocks(request)"),
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
        and inspect.getsource(Scheduler.schedule).count("self._reserve_prefill_lookahead(") == 2,
        "a prefill chunk could end inside a tile"),
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
}


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


def register_spec() -> None:
    """Register the spec and its manager (vLLM's built-in specs first: the registry fills itself with them only while it
    is empty, so a spec registered before that would leave vLLM without its own)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LVTCShortSpec, LVTCShortManager, uniform_type_base_spec=LVTCShortSpec)


# ----------------------------------------------------------------------------------------------- scheduler channel


class LVTCSchedulerMixin:
    """Hands the scheduler's request table (each Request with its `mm_features`) to the short-layout KV managers.

    Counts preemptions; with `record_blocks` (set by benchmarks/ and the tests, in the engine core's process) also
    records the most blocks each request held in each KV-cache group, kept until the engine stops (off in serving:
    the record would grow with every request)."""

    lvtc_scheduler_channel = True  # what `config_hook._scheduler_taken` recognises (it cannot import this module)
    record_blocks = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks_held: dict[str, list[int]] = {}
        self.chunks: list[tuple[str, int, int]] = []  # (request, first token, end) of prefill chunks, when recorded
        self.preemptions = 0
        self.deferrals = 0  # admissions put off a step: their hit would copy a block not computed yet
        self._waits_a_step: set[str] = set()  # this step's such requests (`_reserve_prefill_lookahead` says 0)
        self.short_manager: LVTCShortManager | None = None  # (the first: each short group's sees the same tiles)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        for manager in managers:
            if isinstance(manager, LVTCShortManager):
                manager.requests = self.requests
                if self.short_manager is None:
                    self.short_manager = manager
                    manager.managers = list(managers)  # (it records every group's filled blocks)
                if manager.enable_caching and manager.block_pool.hash_block_size != manager.block_size:
                    raise RuntimeError(
                        "InternVL-X LVTC saving path: vLLM hashes prompts in blocks of "
                        f"{manager.block_pool.hash_block_size} tokens and the short KV group holds blocks of "
                        f"{manager.block_size}; its prefix-cache keys are the long layout's block hashes, one per "
                        "block, so they would name other blocks. Start vLLM without --prefix-match-unit (or with "
                        f"--prefix-match-unit {manager.block_size}), or with --no-enable-prefix-caching.")
        if self.short_manager is not None:
            lookup = self.kv_cache_manager.get_computed_blocks

            def get_computed_blocks(request):
                # the short group's hit needs the request's tiles, which vLLM's lookup does not pass on
                token = LOOKUP_REQUEST.set(self.short_manager.tiles(request))
                try:
                    found = lookup(request)
                finally:
                    LOOKUP_REQUEST.reset(token)
                if self._copies_block_filled_this_step(request, found[0], found[1]):
                    self._waits_a_step.add(request.request_id)
                return found

            self.kv_cache_manager.get_computed_blocks = get_computed_blocks

    def _copies_block_filled_this_step(self, request, blocks, num_computed_tokens: int) -> bool:
        """Whether a hit of `num_computed_tokens` makes vLLM copy a partly used block (in any group) that this step
        fills. vLLM enters a block in the cache when it allocates it, before the step computes it, and copies a hit's
        partly used last block before the step's forward: such a copy would read nothing. (A full block another
        request fills in the same step is read in that forward after it is written, layer by layer, as vLLM does.)"""
        filled = self.short_manager.filled_this_step
        if not num_computed_tokens or not filled:
            return False
        for manager, group_blocks in zip(self.kv_cache_manager.coordinator.single_type_managers, blocks.blocks):
            if not group_blocks:
                continue
            tokens = (manager.held_tokens(request.request_id, group_blocks, num_computed_tokens)
                      if isinstance(manager, LVTCShortManager) else num_computed_tokens)
            if tokens % manager.block_size and (manager.kv_cache_group_id, group_blocks[-1].block_id) in filled:
                return True
        return False

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """vLLM's last word on a request's tokens this step (both scheduling loops call it): a prefill chunk that
        would end inside a tile ends at the tile's start instead (layer k upsamples each tile whole), or the request
        waits for the next step (zero)."""
        if request.request_id in self._waits_a_step:
            # its hit copies a block this step fills (`_copies_block_filled_this_step`): admitted next step, when
            # the block is computed (as vLLM's Mamba manager defers same-step hits); the requests after it wait too
            self._waits_a_step.discard(request.request_id)
            self.deferrals += 1
            return 0
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        end = num_computed_tokens + num_new_tokens
        if self.short_manager is not None and num_new_tokens and end < request.num_prompt_tokens:
            end = whole_tiles_end(self.short_manager.tiles(request).spans, end)
            num_new_tokens = max(end - num_computed_tokens, 0)
        if self.record_blocks and num_new_tokens and num_computed_tokens < request.num_prompt_tokens:
            self.chunks.append((request.request_id, num_computed_tokens, num_computed_tokens + num_new_tokens))
        return num_new_tokens

    def schedule(self, *args, **kwargs):
        self._waits_a_step.clear()
        out = super().schedule(*args, **kwargs)
        if self.record_blocks:
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


def lvtc_scheduler(*, vllm_config, **kwargs):
    """The saving path's `scheduler_cls` (`config_hook.SAVING_SCHEDULER`): the scheduler class for the engine's final
    `async_scheduling`, which vLLM settles after the config hook."""
    scheduler = LVTCAsyncScheduler if vllm_config.scheduler_config.async_scheduling else LVTCScheduler
    return scheduler(vllm_config=vllm_config, **kwargs)


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
    """The runner's M-RoPE buffer, handed over by the model's first forward (vLLM gives the builder no reference to
    it). One per model; the short builder reads the step's rows from it before the forward pass. Holds the model's
    short backend classes too (`short_backend`), so that they and the buffer go with the model."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.backends: dict[type, type] = {}
        self.forwards = 0  # the model's forward calls: a step's metadata is built between two
        self.layout: tuple | None = None  # (query_start_loc, key, layout) of the last build (`LVTCShortBuilder`)


@dataclass
class PendingShortMetadata:
    """The short layers' metadata of a step built before the model's first forward: finished by that forward, once
    the M-RoPE buffer is known (the only step whose metadata is built inside the forward pass)."""

    builder: object
    common: CommonAttentionMetadata
    fast_build: bool

    def finish(self):
        return self.builder.build_short(self.common, self.fast_build)


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

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            cm = common_attn_metadata
            if cm.positions is None or cm.positions.dim() != 1:  # the long-layout token index (guarded internal)
                raise RuntimeError("InternVL-X LVTC saving path: this vLLM's CommonAttentionMetadata.positions is not "
                                   "the step's token index; serve the checkpoint on the masked path: "
                                   "hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
            if channel.buffer is None:
                # Before the model's first forward (vLLM's first step where it runs no warm-up forward: eager mode,
                # VLLM_CPU_CI_ENV): that forward hands over the buffer and finishes this build (`ShortKVFront`).
                return PendingShortMetadata(self, cm, fast_build)
            return self.build_short(cm, fast_build)

        def build_short(self, cm, fast_build=False):
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
                layout = short_layout(channel.buffer, cm.positions, cm.query_start_loc[: cm.num_reqs + 1],
                                      cm.block_table_tensor, num_tokens=tokens, short_per_tile=spec.short_per_tile,
                                      long_per_tile=spec.long_per_tile, block_size=spec.block_size)
                channel.layout = (cm.query_start_loc, key, layout)
            meta = super().build(0, short_common_metadata(cm, layout), fast_build)
            meta.lvtc_gather = layout.gather
            meta.lvtc_long_positions = cm.positions[:tokens]
            meta.lvtc_shift = layout.shift
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


@support_torch_compile(dynamic_arg_dims={"positions": -1, "inputs_embeds": 0, "gather": 0, "long_positions": 0,
                                         "shift": 0},
                       mark_unbacked_dims={"gather": 0})
class ShortKVLayers(LVTCLayers):
    """The LLM's layers on this path, compiled by vLLM: `LVTCLayers.run_layers` with layers below k on the live tokens
    (`gather`, built by the short builder) at their short positions, layers from k at `long_positions`; `shift` says
    where layer k reads a resumed tile's LR states (`short_layout.ShortLayout.shift`)."""

    def __init__(self, *, model, vllm_config, switch: int | None, prefix: str = ""):
        super().__init__(model, vllm_config, switch)

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
        return self.run_layers(hidden, side, short_index, long_index, slot, gather, shift)


def short_kv_unavailable(model) -> str | None:
    """Why this worker cannot run the short-KV path (the model then stops at start with the fix), or None.

    The config hook decides on what it can see (`config_hook.choose_lvtc_path`); what only the built model knows is
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


class ShortKVFront(nn.Module):
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
        self.layers = ShortKVLayers(model=model, vllm_config=vllm_config, switch=switch, prefix=prefix)

    def tile_rows(self, vit, lr):
        return self.layers.tile_rows(vit, lr)

    def embed_input_ids(self, input_ids, multimodal_embeddings, is_multimodal):
        return self.layers.embed_input_ids(input_ids, multimodal_embeddings, is_multimodal)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        self.channel.forwards += 1
        if self.channel.buffer is None:
            # vLLM passes a view of its runner's M-RoPE buffer (`(3, max tokens)`, the step's columns first); the short
            # builder reads the step's rows from that buffer (guarded internal: docs/serving-vllm-lvtc.md)
            buffer = positions._base if positions._base is not None else positions
            if buffer.dim() != 2 or buffer.shape[0] != 3 or buffer.data_ptr() != positions.data_ptr():
                raise RuntimeError(
                    "InternVL-X LVTC saving path: this vLLM does not pass the model a view of its M-RoPE position "
                    f"buffer (positions {tuple(positions.shape)}, base {tuple(buffer.shape)}); serve the checkpoint "
                    "on the masked path: hf_overrides={\"lvtc_vllm_path\": \"masked\"}")
            self.channel.buffer = buffer
        tokens = positions.shape[1]
        metas = get_forward_context().attn_metadata
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
            gather = meta.lvtc_gather
            long_positions = positions[0].clone()
            long_positions[: meta.lvtc_long_positions.shape[0]] = meta.lvtc_long_positions
            shift = torch.zeros_like(long_positions)
            shift[: meta.lvtc_shift.shape[0]] = meta.lvtc_shift
        else:  # warm-up / profile runs (no metadata): a gather index whose size differs from the token count's
            gather = torch.arange(max(tokens - 1, 1), device=positions.device)
            long_positions = positions[0]
            shift = torch.zeros_like(long_positions)
        return self.layers(positions, inputs_embeds, gather, long_positions, shift)


# A process that builds the model, or receives the short group's spec from another process (the engine core gets the
# workers' specs pickled), imports this module first: the spec and its manager are then known there.
register_spec()
