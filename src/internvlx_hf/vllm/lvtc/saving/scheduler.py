"""The saving path's scheduler (`lvtc_scheduler`, the engine's `scheduler_cls`): vLLM's, handing its requests to the
short KV-cache group's managers (`kv_cache.py`), ending prefill chunks at tile starts, and deferring a request whose
prefix-cache hit would copy a block the same step fills."""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from internvlx_hf.vllm.lvtc.saving.kv_cache import LOOKUP_REQUEST, LVTCShortManager, LVTCShortSpec
from internvlx_hf.vllm.lvtc.tiles import whole_tiles_end
from internvlx_hf.vllm.scheduler_refusals import RequestRefusalsMixin, for_async_scheduling


class LVTCSchedulerMixin(RequestRefusalsMixin):
    """Hands the scheduler's request table (each Request with its `mm_features`) to the short-layout KV managers.

    Counts preemptions and deferred admissions (read by the tests and benchmarks; what a benchmark records besides goes
    in its own subclass, as `benchmarks/vllm_lvtc_savings_engine.py`'s)."""

    lvtc_scheduler_channel = True  # what `path._scheduler_taken` recognises (it cannot import this module)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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
        if self.short_manager is not None and self.kv_cache_manager.enable_caching:
            # vLLM's estimate of a request's cached tokens (its prefill stats) takes the least over the groups, and
            # the short group's blocks count short-layout tokens: the long layout's count is the others'. (Without
            # prefix caching, which the saving path turns off where CONVERSATION_INTERNALS differ, vLLM's own stays.)
            self.kv_cache_manager.estimate_cached_tokens = self._estimate_cached_tokens

    def _estimate_cached_tokens(self, request) -> int:
        """`KVCacheManager.estimate_cached_tokens` in the long layout's tokens (the units vLLM reports a request's
        cached tokens in): the prefix-cached groups but the short ones, whose blocks are hashed by short-layout
        counts."""
        manager = self.kv_cache_manager
        counts = [max((block.block_hash_num_tokens or 0 for block in blocks), default=0)
                  for group, blocks in zip(manager.kv_cache_config.kv_cache_groups,
                                           manager.get_blocks(request.request_id).blocks)
                  if group.kv_cache_spec.prefix_cacheable and not isinstance(group.kv_cache_spec, LVTCShortSpec)]
        return min(counts, default=0)

    def _get_local_prefix_cache_hit(self, request):
        """vLLM's prefix-cache lookup of a waiting request, with the request's tiles known to the short group's
        `find_longest_cache_hit` (a class method vLLM gives only the block hashes). (KV connectors, whose lookup
        goes elsewhere, take the masked path: `path._untested_settings`.)"""
        if self.short_manager is None:
            return super()._get_local_prefix_cache_hit(request)
        token = LOOKUP_REQUEST.set(self.short_manager.tiles(request))
        try:
            found = super()._get_local_prefix_cache_hit(request)
        finally:
            LOOKUP_REQUEST.reset(token)
        if self._copies_block_filled_this_step(request, found[0], found[1]):
            self._waits_a_step.add(request.request_id)
        return found

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
            if request.has_encoder_inputs:
                # as vLLM's own path for a request it cannot admit (`allocate_slots` gives no blocks): the cached
                # encoder outputs it has just referenced (`_try_schedule_encoder_inputs`) are let go until next step
                self.encoder_cache_manager.free(request)
            return 0
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        end = num_computed_tokens + num_new_tokens
        if self.short_manager is not None and num_new_tokens and end < request.num_prompt_tokens:
            end = whole_tiles_end(self.short_manager.tiles(request).spans, end)
            num_new_tokens = max(end - num_computed_tokens, 0)
        return num_new_tokens

    def add_request(self, request) -> None:
        """vLLM's, but a streaming-input session (a resumable request, `AsyncLLM`'s input streams) is finished at once
        with an error and the reason in the log: each update would extend the request's prompt and images under the
        same id (`Scheduler._update_request_as_session`), and the tiles the short group's manager and the workers
        hold for it would not follow. (The masked path keeps no tiles per request; no session was run on it.)"""
        if getattr(request, "resumable", False) and request.request_id not in self.requests:
            self.refuse(
                request,
                "InternVL-X LVTC saving path: request %s is a streaming-input session, whose updates would extend "
                "its prompt and images under one id, which the short KV group's tiles do not follow: finished with "
                "an error. For sessions, serve the checkpoint on the masked path, which keeps no tiles per request: "
                "hf_overrides={\"lvtc_vllm_path\": \"masked\"}", request.request_id)
            return
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        self._waits_a_step.clear()
        return super().schedule(*args, **kwargs)

    def _preempt_request(self, *args, **kwargs):
        self.preemptions += 1
        return super()._preempt_request(*args, **kwargs)


class LVTCScheduler(LVTCSchedulerMixin, Scheduler):
    pass


class LVTCAsyncScheduler(LVTCSchedulerMixin, AsyncScheduler):
    pass


def lvtc_scheduler(*, vllm_config, **kwargs):
    """The saving path's `scheduler_cls` (`path.SAVING_SCHEDULER`)."""
    return for_async_scheduling(LVTCScheduler, LVTCAsyncScheduler, vllm_config, **kwargs)
