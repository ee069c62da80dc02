"""The router's scheduler (`router_scheduler`, the engine's `scheduler_cls` for a Flash checkpoint with its router on):
vLLM's, routing the waiting requests it is about to admit (one call on the worker per step) before it admits them
with their shortened prompts."""

from __future__ import annotations

import itertools
import sys
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from vllm.multimodal.inputs import MultiModalFieldElem, MultiModalKwargsItem, PlaceholderRange
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from internvlx_hf.vllm.router.admission import Placement, decisions_tag, shortened
from internvlx_hf.vllm.router.internals import check_internals
from internvlx_hf.vllm.scheduler_refusals import RequestRefusalsMixin, for_async_scheduling

#: Each modality's tiles in an item's data: images' tiles and videos' frames (one tile each).
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}

#: The item fields the model reads each tile's decision from, and the key its item's rows were kept under when
#: routed (`model.embed_multimodal`).
DECISIONS = "vir_compressed"
ROWS_KEY = "vir_rows_key"


def routed_items(request) -> list:
    """`request`'s images and videos in prompt order (vLLM's feature specs), each with its pixels; raises naming the
    items whose pixels vLLM's multimodal cache kept elsewhere."""
    items = sorted((f for f in request.mm_features if f.modality in PIXELS), key=lambda f: f.mm_position.offset)
    missing = [f.identifier for f in items if f.data is None]
    if missing:
        raise RuntimeError(f"request {request.request_id} reached the scheduler without the pixels of {missing} "
                           "(vLLM's multimodal cache kept them elsewhere); the router needs them before the request "
                           "is admitted: serve with --mm-processor-cache-gb 0, or without the router: "
                           "hf_overrides={\"vir\": {\"enabled\": false}}")
    return items


def rewrite_request(config, request, items: list, decisions: list[list[bool]], keys: list[int] | None) -> None:
    """Rewrite `request` to the prompt transformers runs once its `items` (`routed_items`) are routed (`decisions`,
    True: compressed; `config` the model's): its prompt ids, each item's placeholder range and embedding mask, its
    cache identifier (which gains the item's decisions), its data (the decisions, for the model's projectors; with
    `keys`, one per item, the key the worker kept its rows under) and its block hashes."""
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


def _worker_model(worker):
    """The model on an engine's worker (what `collective_rpc` calls a function with)."""
    runner = getattr(worker, "model_runner", None)
    return runner.get_model() if runner is not None else worker.get_model()


def _route_on_worker(worker, requests: list, dropped: list[int] | None = None) -> list[list[list[bool]]]:
    """Run on the engine's worker (`collective_rpc`): its model's `route_requests`."""
    return _worker_model(worker).route_requests(requests, dropped)


def _drop_on_worker(worker, dropped: list[int]) -> None:
    """Run on the engine's worker (`collective_rpc`): let go of the rows kept under `dropped`."""
    _worker_model(worker).admitted.drop(dropped)


def _forget_on_worker(worker) -> None:
    """Run on the engine's worker (`collective_rpc`): its model's `forget_routing`."""
    _worker_model(worker).forget_routing()


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


@dataclass
class RoutingBatch:
    """One routing call on the worker, sent while its requests wait: the requests (in the order vLLM admits them),
    their items and the keys of the items' kept rows, the call's future; `stale` once the kept scores were reset
    (weights pushed) while it ran: its requests are routed again."""

    requests: list
    items: list[list]
    keys: list[list[int]]
    future: Future
    stale: bool = False


class RouterSchedulerMixin(RequestRefusalsMixin):
    """Routes the waiting requests vLLM is about to admit, in `schedule`: the requests at the head of the waiting queue
    that fit this step's free slots and the encoder budget (in tiles), in one call on the worker (vLLM's
    `collective_rpc`, in order with the steps, sent without waiting for it); each one is rewritten to its shortened
    prompt once its decisions are back, and vLLM admits it from there. Until then it waits as vLLM keeps a request
    waiting for its grammar (`_handle_blocked_waiting_request`): running requests go on decoding meanwhile. Whatever
    fails in routing finishes that request with an error (a batch that fails is routed again one request at a time,
    so that only the one that fails is finished). Refuses, per request, what a shortened prompt cannot answer as sent:
    prompt logprobs (vLLM would give them for the shortened prompt), images given as embeddings (the router decides
    from pixels) and streaming-input sessions (their updates extend the prompt under the same id). Counts requests,
    tiles and compressed tiles routed (read by tests and benchmarks)."""

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
        # the tiles one routing call takes at most: vLLM's encoder budget for a step (a request with more goes alone)
        self.routing_tiles = max(1, self.max_num_encoder_input_tokens // self.model_config.image_seq_length)
        self._unrouted: dict[str, object] = {}  # request id -> request with images, waiting to be routed
        self._alone: set[str] = set()  # requests of a batch that failed: each routed by itself next
        self._in_flight: RoutingBatch | None = None
        # keys of the rows the worker keeps from each routing (`router/rows.py`): by request, until it ends; those
        # of ended requests are sent with the next routing call for the worker to drop
        self._row_keys = itertools.count()
        self._request_keys: dict[str, list[int]] = {}
        self._ended_keys: list[int] = []
        self._drop_now = False  # a request ended before its prompt was computed: its rows may still be kept
        self.routed_requests = 0
        self.routed_tiles = 0
        self.compressed_tiles = 0
        self.routing_calls = 0

    def add_request(self, request) -> None:
        reason = self._refusal(request)
        if reason is not None:
            self.refuse(request, "InternVL3.5-Flash router: request %s finished with an error: %s", request.request_id,
                        reason)
            return
        if any(f.modality in PIXELS for f in request.mm_features):
            self._unrouted[request.request_id] = request
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        self._collect()
        if self._in_flight is None and self._unrouted:
            self._send()
            self._collect()  # (an in-process worker has answered already; a worker process answers with the next step)
        if self._in_flight is not None and not self.running:
            self._collect(wait=True)  # (no running request decodes meanwhile: the step waits for the routing)
        if self._drop_now and self._ended_keys:  # (not waiting for the next routing call to let them go)
            dropped, self._ended_keys = self._ended_keys, []
            try:
                self.executor.collective_rpc(_drop_on_worker, args=(dropped,), non_block=True)
            except Exception:  # noqa: BLE001 - (kept rows are a cache: the store's bound holds them meanwhile)
                self._ended_keys = dropped + self._ended_keys
        self._drop_now = False
        return super().schedule(*args, **kwargs)

    def _handle_blocked_waiting_request(self, request) -> bool:
        if request.request_id in self._unrouted or (
                self._in_flight is not None and any(r is request for r in self._in_flight.requests)):
            return False  # (waits for its routing: skipped this step, as vLLM skips a request waiting for a grammar)
        return super()._handle_blocked_waiting_request(request)

    def _send(self) -> None:
        """Send one routing call for the unrouted requests vLLM would admit this step (`RoutingBatch`)."""
        slots = self.max_num_running_reqs - len(self.running)
        chosen, items, tiles, failed = [], [], 0, []
        for request in self.waiting:  # (in the order vLLM admits them)
            if slots <= 0:
                break
            slots -= 1
            if request.request_id not in self._unrouted:
                continue
            try:
                its_items = routed_items(request)
            except Exception as error:  # noqa: BLE001 - ends this request, not the engine
                failed.append((request, error))
                continue
            count = sum(f.data[PIXELS[f.modality]].data.shape[0] for f in its_items)
            alone = request.request_id in self._alone
            if chosen and (alone or tiles + count > self.routing_tiles):
                break
            chosen.append(request)
            items.append(its_items)
            tiles += count
            if alone:
                break
        for request, error in failed:  # (after the walk: finishing a request takes it out of the queue walked)
            self._refuse_routing(request, error)
        if not chosen:
            return
        keys = [[next(self._row_keys) for _ in its_items] for its_items in items]
        payload = [([f.data[PIXELS[f.modality]].data for f in its_items], its_keys, [f.identifier for f in its_items])
                   for its_items, its_keys in zip(items, keys)]
        dropped, self._ended_keys = self._ended_keys, []
        try:
            future = self.executor.collective_rpc(_route_on_worker, args=(payload, dropped), non_block=True)
        except Exception as error:  # noqa: BLE001 - (an executor that fails at once: as a call that failed)
            future = Future()
            future.set_exception(error)
        for request in chosen:
            del self._unrouted[request.request_id]
        self._in_flight = RoutingBatch(chosen, items, keys, future)
        self.routing_calls += 1

    def _collect(self, wait: bool = False) -> None:
        """Rewrite the in-flight batch's requests to their shortened prompts once the worker has answered."""
        batch = self._in_flight
        if batch is None or not (wait or batch.future.done()):
            return
        self._in_flight = None
        try:
            # (each worker's answer: alike under tensor parallelism, None from pipeline stages after the first)
            decisions = next(answer for answer in batch.future.result() if answer is not None)
            error = None
        except Exception as failure:  # noqa: BLE001 - whatever fails in routing ends a request, not the engine
            decisions, error = None, failure
        for index, request in enumerate(batch.requests):
            keys = batch.keys[index]
            if request.is_finished():  # (aborted while it was routed)
                self._ended_keys += keys
            elif batch.stale or (error is not None and len(batch.requests) > 1):
                # routed again: by the new weights, or alone (which request of a failed batch failed is unknown)
                self._ended_keys += keys
                self._unrouted[request.request_id] = request
                if error is not None:
                    self._alone.add(request.request_id)
            elif error is not None:
                self._ended_keys += keys
                self._refuse_routing(request, error)
            else:
                try:
                    rewrite_request(self.model_config, request, batch.items[index], decisions[index], keys)
                except Exception as failure:  # noqa: BLE001
                    self._ended_keys += keys
                    self._refuse_routing(request, failure)
                    continue
                self._alone.discard(request.request_id)
                self._request_keys[request.request_id] = keys
                self.routed_requests += 1
                self.routed_tiles += sum(len(tiles) for tiles in decisions[index])
                self.compressed_tiles += sum(sum(tiles) for tiles in decisions[index])

    def _refuse_routing(self, request, error: Exception) -> None:
        """Finish a waiting `request` with an error naming what failed while it was routed."""
        from vllm.logger import init_logger
        from vllm.v1.request import RequestStatus

        self._unrouted.pop(request.request_id, None)
        self._alone.discard(request.request_id)
        init_logger("internvlx_hf.vllm").warning(
            "InternVL3.5-Flash router: request %s finished with an error: routing its images failed (%s: %s)",
            request.request_id, type(error).__name__, error)
        self.finish_requests(request.request_id, RequestStatus.FINISHED_ERROR)
        self._refused.append(request)

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
        if self._in_flight is not None:  # (decided by the old weights: routed again)
            self._in_flight.stale = True
        self.executor.collective_rpc(_forget_on_worker)

    def _free_request(self, request, *args, **kwargs):
        keys = self._request_keys.pop(request.request_id, [])
        self._ended_keys += keys
        # (a request that ended before its prompt was computed, aborted or finished with an error, may leave rows its
        # step never took; the others' rows were taken by their steps)
        self._drop_now |= bool(keys) and request.num_computed_tokens < request.num_prompt_tokens
        self._unrouted.pop(request.request_id, None)
        self._alone.discard(request.request_id)
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
