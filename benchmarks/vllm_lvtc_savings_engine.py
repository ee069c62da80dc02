"""Child process of `bench_vllm_lvtc_savings.py`: runs vLLM engines in this process and writes what they did.

`python benchmarks/vllm_lvtc_savings_engine.py SPEC OUT`. SPEC (JSON) lists engines (checkpoint, engine options,
`"path": "masked"` to serve an LVTC checkpoint on the masked fallback path rather than the default saving one,
`"router": true` for an InternVL3.5-Flash checkpoint with its router on, `"options"` merged into the engine's) and the
work: `requests` answered one at a time and then all at once (greedy tokens and logprobs, for parity; `max_tokens`
per engine or for all), and optionally
`timing`: prefill time of each of a few requests (`max_tokens=1`, median of `repeats`) and requests/s at each
concurrency, in rounds that run every engine once (interleaved, so drifting load on the shared machine hits all
engines alike), each round with images none of the engines has seen (so that its time includes processing the image
and the ViT, which vLLM would otherwise take from its caches). Every engine records, per request, the
most KV blocks it held in each KV-cache group and the layers of each group. With `timing["phases"]` each engine first
answers one untimed load round, and every timed load round records where its time went (`Phases`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: its scheduler is readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_tiny import vllm_prompt  # noqa: E402


def _scheduler(llm):
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return core.scheduler if core is not None else None


def held(scheduler, request_id: str, record: str = "blocks_held"):
    """Blocks held per group by a request (`record="prompt_tokens"`: its prompt's length as the scheduler held it);
    vLLM's engine appends `-<8 characters>` to the id it was given."""
    if scheduler is None or not hasattr(scheduler, record):  # (a user's own scheduler class)
        return None
    for key, value in getattr(scheduler, record).items():
        if key.rsplit("-", 1)[0] == request_id:
            return value
    return None


def _result(output, scheduler) -> dict:
    completion = output.outputs[0]
    return {
        "prompt_tokens": len(output.prompt_token_ids),
        "tokens": list(completion.token_ids),
        "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
        "blocks_held": held(scheduler, output.request_id),
    }


def recording_scheduler(router: bool = False):
    """The saving path's scheduler (`router`: the Flash router's) with what this benchmark records, kept out of the
    one that serves (the record grows with every request): after each step, the most KV blocks each request held in
    each KV-cache group and its prompt's length as the scheduler holds it (the router's: shortened), and each
    prefill chunk as vLLM's last word on it gave it (`(request, first token, end)`). Every engine of a comparison takes
    one (plain and masked ones the saving path's too: it only feeds short-layout KV managers, which they lack)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if router:
        from internvlx_hf.vllm.router.scheduler import RouterSchedulerMixin as Mixin
    else:
        from internvlx_hf.vllm.lvtc.saving.scheduler import LVTCSchedulerMixin as Mixin

    class RecordingScheduler(Mixin, Scheduler):  # (vLLM's CPU platform schedules synchronously)
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.blocks_held: dict[str, list[int]] = {}
            self.prompt_tokens: dict[str, int] = {}
            self.chunks: list[tuple[str, int, int]] = []

        def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
            num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
            if num_new_tokens and num_computed_tokens < request.num_prompt_tokens:
                self.chunks.append((request.request_id, num_computed_tokens, num_computed_tokens + num_new_tokens))
            return num_new_tokens

        def schedule(self, *args, **kwargs):
            out = super().schedule(*args, **kwargs)
            for request_id in list(self.requests):
                held = [sum(not block.is_null for block in manager.req_to_blocks.get(request_id, ()))
                        for manager in self.kv_cache_manager.coordinator.single_type_managers]
                best = self.blocks_held.setdefault(request_id, [0] * len(held))
                self.blocks_held[request_id] = [max(a, b) for a, b in zip(best, held)]
                self.prompt_tokens[request_id] = self.requests[request_id].num_prompt_tokens
            return out

    return RecordingScheduler


def bytes_per_block(group) -> int:
    """KV bytes one block of a group holds over all of the group's layers (from the worker's KV-cache config: the
    scheduler's replaces a group of layers of different sizes by one of them)."""
    spec = group.kv_cache_spec
    specs = getattr(spec, "kv_cache_specs", None)  # UniformTypeKVCacheSpecs: layers of different sizes
    if specs:
        return sum(layer.page_size_bytes for layer in specs.values())
    return spec.page_size_bytes * len(group.layer_names)


def start(spec: dict):
    from vllm import LLM

    options = dict(spec["engine"], **spec.get("options", {}))
    if spec.get("path") == "masked":  # the fallback path, for comparison (its one log line says so)
        options["hf_overrides"] = {"lvtc_vllm_path": "masked"}
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":  # (read only where the engine core runs in this process)
        options.setdefault("scheduler_cls", recording_scheduler(router=spec.get("router", False)))
    started = time.time()
    print(f"[engine] {spec['name']}: starting", flush=True)
    llm = LLM(spec["checkpoint"], **options)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":  # the engine core runs in a process of its own
        info = {"startup_s": time.time() - started, "multiprocessing": True}
        print(f"[engine] {spec['name']}: started in {info['startup_s']:.0f} s (engine core in its own process)",
              flush=True)
        return llm, info
    scheduler = _scheduler(llm)
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    config = executor.driver_worker.worker.model_runner.kv_cache_config
    assert [g.layer_names for g in config.kv_cache_groups] == [
        g.layer_names for g in scheduler.kv_cache_config.kv_cache_groups]
    groups = [{"layers": len(group.layer_names), "spec": type(group.kv_cache_spec).__name__,
               "block_size": group.kv_cache_spec.block_size, "bytes_per_block": bytes_per_block(group)}
              for group in config.kv_cache_groups]
    info = {"startup_s": time.time() - started, "groups": groups, "num_blocks": config.num_blocks,
            "scheduler": type(scheduler).__name__}
    print(f"[engine] {spec['name']}: started in {info['startup_s']:.0f} s, groups {groups}", flush=True)
    return llm, info


def answer(llm, requests: list[dict], max_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    scheduler = _scheduler(llm)
    inputs = [vllm_prompt(request) for request in requests]
    alone = [_result(llm.generate([one], params, use_tqdm=False)[0], scheduler) for one in inputs]
    together = [_result(out, scheduler) for out in llm.generate(inputs, params, use_tqdm=False)]
    return {"alone": alone, "together": together, "preemptions": getattr(scheduler, "preemptions", None),
            "chunks": getattr(scheduler, "chunks", None)}


class Phases:
    """Seconds an engine spends in each phase of a step, summed (engine core in this process): the ViT and projectors
    (`encoder`), the model's forward in steps that prefill prompt tokens and in steps that only decode, the attention
    metadata (the saving path's short layout included) and the scheduler. The rest of a round (sampling, the
    runner's inputs, the processor, the output) is what its wall time leaves. vLLM's runner methods, wrapped here
    for measuring only (a vLLM without one of them records none of that phase)."""

    def __init__(self, llm) -> None:
        core = llm.llm_engine.engine_core.engine_core
        self.runner = core.model_executor.driver_worker.worker.model_runner
        self.seconds: dict[str, float] = {}
        # (the Flash router's vision tower and router run in the scheduler's `schedule`, through the worker's model's
        # `route_requests`: its "router" time is within the "scheduler" one, with this in-process engine core)
        model = self.runner.get_model()
        for obj, method, phase in ((self.runner, "_execute_mm_encoder", "encoder"),
                                   (self.runner, "_build_attention_metadata", "attention metadata"),
                                   (core.scheduler, "schedule", "scheduler"),
                                   (model, "route_requests", "router")):
            if hasattr(obj, method):
                setattr(obj, method, self._timed(getattr(obj, method), lambda phase=phase: phase))
        if hasattr(self.runner, "_model_forward"):
            self.runner._model_forward = self._timed(self.runner._model_forward, self._forward_phase)

    def _forward_phase(self) -> str:
        requests = self.runner.input_batch.num_reqs
        tokens = int(self.runner.query_start_loc.cpu[requests])
        return "forward, decode-only steps" if tokens == requests else "forward, steps with prompt tokens"

    def _timed(self, function, phase):
        def timed_call(*args, **kwargs):
            name = phase()
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
        return timed_call

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {name: value - before.get(name, 0.0) for name, value in self.seconds.items()}


def fresh(request: dict, salt: int) -> dict:
    """The request with images of the same sizes but other pixels (seeds moved by `salt * 7919`)."""
    return {**request, "images": [[w, h, seed + salt * 7919] for w, h, seed in request.get("images", [])]}


def timed(llm, inputs: list[dict], max_tokens: int) -> tuple[float, list]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    began = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    return time.perf_counter() - began, outputs


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    spec = json.loads(Path(spec_path).read_text())
    results: dict = {}
    engines = {}
    for engine in spec["engines"]:
        llm, info = start(engine)
        results[engine["name"]] = {"info": info}
        if engine.get("requests"):
            results[engine["name"]].update(answer(llm, engine["requests"],
                                                  engine.get("max_tokens", spec.get("max_tokens", 8))))
            print(f"[engine] {engine['name']}: answered {len(engine['requests'])} requests", flush=True)
        if spec.get("timing"):
            engines[engine["name"]] = llm
        else:
            del llm
    timing = spec.get("timing")
    if timing:
        import torch

        print(f"[engine] torch threads: {torch.get_num_threads()}", flush=True)
        prefill_requests = {key: vllm_prompt(r) for key, r in timing["prefill_requests"].items()}
        phases = {}
        for name, llm in engines.items():  # warm-up: the first step's one-off costs
            for request in prefill_requests.values():
                timed(llm, [request], 1)
            if timing.get("phases"):
                batch = [vllm_prompt(fresh(r, 999)) for r in timing["load_requests"][:max(timing["concurrency"])]]
                timed(llm, batch, timing["max_tokens"])
                phases[name] = Phases(llm)
                results[name]["phases"] = {str(c): [] for c in timing["concurrency"]}
            results[name]["prefill_s"] = {key: [] for key in prefill_requests}
            results[name]["prefill_blocks_held"] = {}
            results[name]["prefill_prompt_tokens"] = {}
            results[name]["rps"] = {str(c): [] for c in timing["concurrency"]}
        for round_ in range(timing["repeats"]):
            for key, spec_ in timing["prefill_requests"].items():
                # every round's images are new to the engines (their caches of processed images and of the ViT's
                # outputs miss, as for a user's new image); each engine gets the same ones
                request = vllm_prompt(fresh(spec_, round_ + 1))
                for name, llm in engines.items():
                    seconds, outputs = timed(llm, [request], 1)
                    results[name]["prefill_s"][key].append(seconds)
                    results[name]["prefill_blocks_held"][key] = held(_scheduler(llm), outputs[0].request_id)
                    results[name]["prefill_prompt_tokens"][key] = len(outputs[0].prompt_token_ids)
                    results[name].setdefault("prefill_prompt_tokens_held", {}).setdefault(key, []).append(
                        held(_scheduler(llm), outputs[0].request_id, "prompt_tokens"))
                print(f"[engine] prefill {key} round {round_}: "
                      + ", ".join(f"{n} {results[n]['prefill_s'][key][-1]:.2f} s" for n in engines), flush=True)
        for level, concurrency in enumerate(timing["concurrency"]):
            for round_ in range(timing["load_repeats"]):
                batch = [vllm_prompt(fresh(r, 1000 * (level + 1) + round_ + 1))
                         for r in timing["load_requests"][:concurrency]]
                for name, llm in engines.items():
                    before = dict(phases[name].seconds) if name in phases else None
                    seconds, _ = timed(llm, batch, timing["max_tokens"])
                    results[name]["rps"][str(concurrency)].append(concurrency / seconds)
                    if before is not None:
                        results[name]["phases"][str(concurrency)].append({"round": seconds,
                                                                          **phases[name].since(before)})
                print(f"[engine] concurrency {concurrency} round {round_}: "
                      + ", ".join(f"{n} {results[n]['rps'][str(concurrency)][-1]:.3f} req/s" for n in engines),
                      flush=True)
        for name, llm in engines.items():
            scheduler = _scheduler(llm)
            if hasattr(scheduler, "routed_tiles"):  # the Flash router's: what it routed in the whole run
                results[name]["router"] = {key: getattr(scheduler, key)
                                           for key in ("routed_requests", "routed_tiles", "compressed_tiles")}
            results[name]["prefill_median_s"] = {k: statistics.median(v) for k, v in results[name]["prefill_s"].items()}
            results[name]["rps_median"] = {c: statistics.median(v) for c, v in results[name]["rps"].items()}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
