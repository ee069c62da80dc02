"""The router's scheduler (`router_scheduler`, the engine's `scheduler_cls` for a Flash checkpoint with its router on):
vLLM's, routing each request it admits (`route_request`) before vLLM sees its length."""

from __future__ import annotations

import itertools
import sys

import torch
from vllm.multimodal.inputs import MultiModalFieldElem, MultiModalKwargsItem, PlaceholderRange
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from internvlx_hf.vllm.router.admission import Placement, decisions_tag, shortened
from internvlx_hf.vllm.router.internals import check_internals
from internvlx_hf.vllm.scheduler_refusals import RequestRefusalsMixin, for_async_scheduling

#: Each modality's tiles in an item's data: images' tiles and videos' frames (one tile each).
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}

#: The item fields the model reads each tile's decision from, and the key its item's rows were kept under at
#: admission (`model.embed_multimodal`).
DECISIONS = "vir_compressed"
ROWS_KEY = "vir_rows_key"


def route_request(route_tiles, config, request, keys: list[int] | None = None) -> list[list[bool]]:
    """Route `request`'s tiles with `route_tiles` (the model's vision tower and router, `model.route_tiles`: the
    quantile over all of them; `config` the model's) and rewrite the request to the prompt transformers runs: its
    prompt ids, each item's placeholder range and embedding mask, its cache identifier (which gains the item's
    decisions), its data (the decisions, for the model's projectors; with `keys`, one per item in prompt order, the
    key the worker kept its rows under) and its block hashes. Returns each item's decisions (none without images or
    videos)."""
    items = sorted((f for f in request.mm_features if f.modality in PIXELS), key=lambda f: f.mm_position.offset)
    if not items:
        return []
    missing = [f.identifier for f in items if f.data is None]
    if missing:
        raise RuntimeError(f"InternVL3.5-Flash router: request {request.request_id} reached the scheduler without the "
                           f"pixels of {missing} (vLLM's multimodal cache kept them elsewhere); the router needs them "
                           "when it admits the request; serve without the router: "
                           "hf_overrides={\"vir\": {\"enabled\": false}}.")
    keys = None if keys is None else keys[:len(items)]
    decisions = route_tiles([f.data[PIXELS[f.modality]].data for f in items], keys, [f.identifier for f in items])
    placements = [Placement(f.mm_position.offset, f.mm_position.length,
                            tuple(f.mm_position.is_embed.tolist()) if f.mm_position.is_embed is not None
                            else (True,) * f.mm_position.length) for f in items]
    ids, moved = shortened(list(request.prompt_token_ids), placements, decisions, config.image_seq_length,
                           config.compressed_tokens_per_tile)
    for index, (feature, place, tiles) in enumerate(zip(items, moved, decisions)):
        feature.mm_position = PlaceholderRange(offset=place.offset, length=place.length,
                                               is_embed=torch.tensor(place.is_embed))
        feature.identifier += decisions_tag(tiles)
        pixels = feature.data[PIXELS[feature.modality]]
        # a new item: vLLM's multimodal caches may hand the same item object to other requests, routed otherwise
        data = MultiModalKwargsItem(dict(feature.data))
        data[DECISIONS] = MultiModalFieldElem(data=torch.tensor(tiles, dtype=torch.bool), field=pixels.field)
        if keys is not None:  # (each tile carries its item's key: the field is the pixels', per tile)
            data[ROWS_KEY] = MultiModalFieldElem(data=torch.full((len(tiles),), keys[index], dtype=torch.long),
                                                 field=pixels.field)
        feature.data = data
    request.prompt_token_ids = ids
    request._all_token_ids[:] = ids  # (the list behind `all_token_ids`, a read-only view of it)
    request.num_prompt_tokens = len(ids)
    request.block_hashes.clear()
    request.update_block_hashes()
    return decisions


def _route_on_worker(worker, pixels: list[torch.Tensor], keys: list[int] | None = None,
                     dropped: list[int] | None = None, items: list[str] | None = None) -> list[list[bool]]:
    """Run on the engine's worker (`collective_rpc`): its model's `route_tiles`."""
    runner = getattr(worker, "model_runner", None)
    model = runner.get_model() if runner is not None else worker.get_model()
    return model.route_tiles(pixels, keys, dropped, items)


def _forget_on_worker(worker) -> None:
    """Run on the engine's worker (`collective_rpc`): its model's `forget_routing`."""
    runner = getattr(worker, "model_runner", None)
    (runner.get_model() if runner is not None else worker.get_model()).forget_routing()


def engine_executor():
    """The executor of the engine core building the scheduler (found up the call stack: vLLM's `EngineCore` builds its
    executor, then its scheduler), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        executor = getattr(frame.f_locals.get("self"), "model_executor", None)
        if executor is not None and hasattr(executor, "collective_rpc"):
            return executor
        frame = frame.f_back
    return None


class RouterSchedulerMixin(RequestRefusalsMixin):
    """Routes each request it admits (`route_request`) on the engine's worker, through the engine's executor (the
    worker holds the model; vLLM's `collective_rpc` runs a call there in order with the steps). Refuses, per request,
    what a shortened prompt cannot answer as sent: prompt logprobs (vLLM would give them for the shortened prompt),
    images given as embeddings (the router decides from pixels) and streaming-input sessions (their updates extend
    the prompt under the same id). Counts requests, tiles and compressed tiles routed (read by tests and
    benchmarks)."""

    router_scheduler_channel = True  # what `router.config` accepts as a scheduler of the router's

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_internals()
        self.executor = engine_executor()
        if self.executor is None:
            raise RuntimeError(
                "InternVL3.5-Flash router: the scheduler was built outside a vLLM engine core (no executor up its call "
                "stack), so it cannot reach the worker that routes each request; serve the checkpoint with vLLM's "
                "LLM or `vllm serve`, or without the router: hf_overrides={\"vir\": {\"enabled\": false}}.")
        self.model_config = self.vllm_config.model_config.hf_config
        # keys of the rows the worker keeps from each admission (`router/rows.py`): by request, until it ends; those
        # of ended requests are sent with the next admission for the worker to drop
        self._row_keys = itertools.count()
        self._request_keys: dict[str, list[int]] = {}
        self._ended_keys: list[int] = []
        self.routed_requests = 0
        self.routed_tiles = 0
        self.compressed_tiles = 0

    def add_request(self, request) -> None:
        reason = self._refusal(request)
        if reason is not None:
            self.refuse(request, "InternVL3.5-Flash router: request %s finished with an error: %s", request.request_id,
                        reason)
            return
        keys = [next(self._row_keys) for _ in request.mm_features]
        try:
            decisions = route_request(self.route_tiles, self.model_config, request, keys)
        except Exception as error:  # noqa: BLE001 - whatever fails in routing ends this request, not the engine
            self._ended_keys += keys  # (rows the worker may have kept for it)
            self.refuse(request, "InternVL3.5-Flash router: request %s finished with an error: routing its images "
                        "failed (%s: %s)", request.request_id, type(error).__name__, error)
            return
        if decisions:
            self._request_keys[request.request_id] = keys
            self.routed_requests += 1
            self.routed_tiles += sum(len(tiles) for tiles in decisions)
            self.compressed_tiles += sum(sum(tiles) for tiles in decisions)
        super().add_request(request)

    def route_tiles(self, pixels: list[torch.Tensor], keys: list[int] | None = None,
                    items: list[str] | None = None) -> list[list[bool]]:
        dropped, self._ended_keys = self._ended_keys, []
        # (each worker answers alike)
        return self.executor.collective_rpc(_route_on_worker, args=(pixels, keys, dropped, items))[0]

    def reset_encoder_cache(self) -> None:
        # (vLLM's call after a weight update, as its docstring asks: the router's kept scores and rows go with it)
        super().reset_encoder_cache()
        self._forget()

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        reset = super().reset_prefix_cache(*args, **kwargs)
        if reset:  # (reinforcement-learning frameworks reset the prefix cache after pushing new weights)
            self._forget()
        return reset

    def _forget(self) -> None:
        self._ended_keys = []  # (the worker lets go of every kept row)
        self.executor.collective_rpc(_forget_on_worker)

    def _free_request(self, request, *args, **kwargs):
        self._ended_keys += self._request_keys.pop(request.request_id, [])
        return super()._free_request(request, *args, **kwargs)

    @staticmethod
    def _refusal(request) -> str | None:
        if getattr(request, "resumable", False):
            return ("a streaming-input session, whose updates would extend its prompt and images under one id after "
                    "the router shortened it; send each turn as a request of its own")
        if any(f.data is not None and f.modality in PIXELS and PIXELS[f.modality] not in f.data
               for f in request.mm_features):
            return ("an image was given as its embeddings (--enable-mm-embeds), and the router decides from the "
                    "pixels; send the image itself")
        params = request.sampling_params
        if params is not None and params.prompt_logprobs is not None and any(
                f.modality in PIXELS for f in request.mm_features):
            return ("prompt logprobs were asked for, and the router shortened the prompt (64 tokens per compressed "
                    "tile): vLLM would give them for the shortened prompt, not the one sent; ask without "
                    "prompt_logprobs, or serve without the router: hf_overrides={\"vir\": {\"enabled\": false}}")
        return None


class RouterScheduler(RouterSchedulerMixin, Scheduler):
    pass


class RouterAsyncScheduler(RouterSchedulerMixin, AsyncScheduler):
    pass


def router_scheduler(*, vllm_config, **kwargs):
    """The router's `scheduler_cls` (`router.config.ROUTER_SCHEDULER`)."""
    return for_async_scheduling(RouterScheduler, RouterAsyncScheduler, vllm_config, **kwargs)
