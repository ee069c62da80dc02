"""The vLLM internals (not public API) the router uses, each as it is in vLLM 0.32: what is checked, and what breaks
if vLLM changes it. The router's scheduler checks them when the engine starts (`check_internals`): a vLLM that
differs stops there, naming them, rather than serve a prompt the router did not shorten."""

from __future__ import annotations

import dataclasses
import inspect

from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldElem, PlaceholderRange
from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine.core import EngineCore
from vllm.v1.executor.abstract import Executor
from vllm.v1.request import Request

from internvlx_hf.vllm.lvtc.saving.internals import missing_internals
from internvlx_hf.vllm_compat import source_has


def _fields(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def _prefix_cache_keys():
    """vLLM's `_gen_mm_extra_hash_keys` (private: imported where checked, so that a vLLM without it is reported as
    the other internals are, not an ImportError before the check)."""
    from vllm.v1.core import kv_cache_utils

    return kv_cache_utils._gen_mm_extra_hash_keys


def _built_before(function, first: str, second: str) -> bool:
    source = inspect.getsource(function)
    return first in source and second in source and source.index(first) < source.index(second)


#: name -> (check, what breaks without it)
ROUTER_INTERNALS = {
    "Request: prompt_token_ids, _all_token_ids, num_prompt_tokens, block_hashes, update_block_hashes()": (
        lambda: hasattr(Request, "update_block_hashes")
        and source_has(Request.__init__, "self.prompt_token_ids = ", "self._all_token_ids", "self.num_prompt_tokens = ",
                       "self.block_hashes: list[BlockHash] = []", "self.update_block_hashes()"),
        "the admitted request cannot be rewritten to its shortened prompt"),
    "MultiModalFeatureSpec(data, modality, identifier, mm_position) and PlaceholderRange(offset, length, is_embed)": (
        lambda: {"data", "modality", "identifier", "mm_position"} <= _fields(MultiModalFeatureSpec)
        and {"offset", "length", "is_embed"} <= _fields(PlaceholderRange),
        "an item's placeholders cannot be moved to the shortened prompt"),
    "MultiModalFieldElem(data, field)": (
        lambda: {"data", "field"} <= _fields(MultiModalFieldElem),
        "the router's decisions cannot travel in an item's data to the model's projectors"),
    "the encoder cache and the prefix cache's keys read each item's identifier": (
        lambda: source_has(EncoderCacheManager.check_and_update_cache, "request.mm_features[input_id].identifier")
        and source_has(_prefix_cache_keys(), "mm_feature.identifier"),
        "an image's rows or KV blocks routed for one request could serve another request routed otherwise"),
    "EngineCore builds its executor before its scheduler; Executor.collective_rpc(method, timeout, args, kwargs, "
    "non_block)": (
        lambda: _built_before(EngineCore.__init__, "self.model_executor = ", "self.scheduler: SchedulerInterface = ")
        and list(inspect.signature(Executor.collective_rpc).parameters)[1:6] == ["method", "timeout", "args", "kwargs",
                                                                                 "non_block"],
        "the scheduler cannot reach the worker that routes each request"),
    "Scheduler.schedule asks _handle_blocked_waiting_request(request) of each waiting request it would admit; "
    "Scheduler.waiting, running, max_num_running_reqs, max_num_encoder_input_tokens": (
        lambda: source_has(Scheduler.schedule, "self._handle_blocked_waiting_request(request)")
        and source_has(Scheduler.__init__, "self.waiting = ", "self.running: list[Request] = []",
                       "self.max_num_running_reqs = ", "self.max_num_encoder_input_tokens = "),
        "a request waiting for its routing would be admitted with the prompt as sent"),
    "Scheduler._free_request(request) ends each finished or aborted request": (
        lambda: source_has(Scheduler.update_from_output, "self._free_request(request)")
        and source_has(Scheduler.finish_requests, "self._free_request(request"),
        "the rows kept when routing a request that ends unembedded stay in the worker's store, so that later "
        "requests' rows do not fit and their steps run the vision tower a second time"),
}


def check_internals() -> None:
    """Raise naming each internal this vLLM lacks and what breaks, with the fix."""
    missing = missing_internals(ROUTER_INTERNALS)
    if missing:
        import vllm

        raise RuntimeError(
            f"InternVL3.5-Flash router: vLLM {vllm.__version__} differs from 0.32 in what the router uses: "
            + "; ".join(f"{name} ({ROUTER_INTERNALS[name][1]})" for name in missing)
            + ". Serve with vLLM 0.32 (the `vllm` extra's pin), or without the router: "
            "hf_overrides={\"vir\": {\"enabled\": false}}.")
