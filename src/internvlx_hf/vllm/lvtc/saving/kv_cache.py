"""The saving path's KV-cache group: the layers below `k` hold K/V for each request's short-layout tokens only.

`register_spec` makes vLLM know the group's spec and manager; the plugin's `register()` calls it in every vLLM
process (the engine core receives the workers' specs pickled, and builds its managers from the registry).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field, replace

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from internvlx_hf.vllm.lvtc.tiles import RequestTiles, short_block_keys


@dataclass(frozen=True, kw_only=True)
class LVTCShortSpec(AttentionSpec):
    """Full attention over the short layout of an LVTC request: the group's KV is indexed by short-layout position.

    An `AttentionSpec`, not a `FullAttentionSpec` subclass: vLLM's grouping (`is_kv_cache_spec_uniform`,
    `UniformTypeKVCacheSpecs`) asks the first layer's spec whether all others merge with it, and `FullAttentionSpec`
    accepts any subclass, so a subclass lands in the full-attention group whenever a full-attention layer comes first
    in the model's layer table (measured: one group of all 4 layers)."""

    short_per_tile: int
    long_per_tile: int
    #: the block size of the spec this one was copied from (`copy_with_new_block_size`): vLLM hands a backend that
    #: takes smaller blocks than the KV manager's a copy in its kernel block size (`AttentionGroup
    #: .create_metadata_builders`), and the short layout needs the manager's too (`manager_block_size`)
    copied_from_block_size: int = field(default=0, compare=False)

    def copy_with_new_block_size(self, block_size: int) -> "LVTCShortSpec":
        return replace(self, block_size=block_size, copied_from_block_size=self.block_size)

    @property
    def manager_block_size(self) -> int:
        """The block size the short group's manager allocates and caches in: this spec's, or, for a kernel block
        size's copy (smaller), the one it was copied from (vLLM copies to a larger size only to raise the manager's,
        `unify_kv_cache_spec_page_size`)."""
        return max(self.block_size, self.copied_from_block_size)

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


def register_spec() -> None:
    """Register the spec and its manager (vLLM's built-in specs first: the registry fills itself with them only while it
    is empty, so a spec registered before that would leave vLLM without its own)."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LVTCShortSpec, LVTCShortManager, uniform_type_base_spec=LVTCShortSpec)
