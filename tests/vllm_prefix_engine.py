"""Child process of tests/test_vllm_prefix_caching.py: vLLM engines answering runs of requests in the order given,
each request with what vLLM's prefix cache served it.

`python tests/vllm_prefix_engine.py SPEC OUT`. SPEC (JSON): `runs`, name -> a run: `checkpoint`, `engine` (LLM
options), `max_tokens`, and `rounds`: a list of rounds, each a list of requests (tests/vllm_engine.py's format) sent
together in one `LLM.generate` call, the rounds one after another (a conversation's turns, users one after another),
or `{"evict": "short" | "long"}` between two (`evict`: one kind of KV-cache group's cached blocks dropped); a request
may carry `sampling` (SamplingParams values, e.g. `{"n": 3, "seed": 5, "temperature": 1.0}`; greedy without) and
`priority` (an engine with `scheduling_policy="priority"`).
Consecutive runs of one checkpoint and engine options share one engine, its prefix cache and multimodal caches reset
between them (each run starts with an empty cache, as in an engine of its own); the engines start one after the
other in this one process (vLLM's import and start-up once a configuration, not once a test). OUT, per run: per
round, per request, the prompt's length, the tokens vLLM took from its prefix cache (`num_cached_tokens`), the tokens
and logprobs of its first completion and the `top` 5 logprobs of each step (`completions`: every completion's tokens
and logprobs) and its `request_id`; vLLM's own prefix-cache counters, the requests preempted (`preempted`, in order),
the blocks each eviction dropped, the KV-cache groups (`short_groups` of `groups`), and the scheduler's preemptions
and deferred admissions (`LVTCSchedulerMixin.deferrals`) in the run, and each round's deferrals and tiles the vision
tower ran on (the Flash router's engines: when routed and in steps); a run whose engine
did not start or that failed gives its `error` (the others still run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: its scheduler is readable

from vllm_helpers import vllm_prompt, with_kv_cache  # noqa: E402


def counters(llm) -> dict:
    """vLLM's prefix-cache counters (its metrics; `disable_log_stats=False`)."""
    metrics = {metric.name: metric for metric in llm.get_metrics()}
    return {name: metrics[f"vllm:prefix_cache_{name}"].value for name in ("queries", "hits")}


#: how many of each step's most likely tokens come back with their logprobs (`top`)
TOP = 5


def completion(output) -> dict:
    return {"tokens": list(output.token_ids),
            "logprobs": [step[token].logprob for step, token in zip(output.logprobs, output.token_ids)]}


def evict(scheduler, groups: str) -> int:
    """Drop from the prefix cache every cached block no request holds of the `groups` ("short": the LVTC short
    groups', "long": the others'), as vLLM's eviction does when it needs blocks; the number dropped."""
    from vllm.v1.core.kv_cache_utils import get_group_id

    from internvlx_hf.vllm.lvtc.saving.kv_cache import LVTCShortManager

    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    chosen = {index for index, manager in enumerate(managers)
              if isinstance(manager, LVTCShortManager) == (groups == "short")}
    pool = scheduler.kv_cache_manager.block_pool
    blocks = {block.block_id for block in pool.blocks
              if block.block_hash is not None and block.ref_cnt == 0 and get_group_id(block.block_hash) in chosen}
    pool.evict_blocks(blocks)
    return len(blocks)


def run_rounds(llm, scheduler, run: dict, preempted: list) -> dict:
    """One run's rounds on a started engine whose prefix cache is empty; what the module docstring lists."""
    from vllm import SamplingParams

    from internvlx_hf.vllm.lvtc.saving.kv_cache import LVTCShortManager

    before = counters(llm)
    preemptions, deferrals = getattr(scheduler, "preemptions", 0), getattr(scheduler, "deferrals", 0)
    preempted.clear()
    rounds, evicted, round_deferrals, vit_tiles = [], [], [], []
    for requests in run["rounds"]:
        if isinstance(requests, dict):  # {"evict": "short" | "long"}, between rounds
            evicted.append(evict(scheduler, requests["evict"]))
            continue
        params = [SamplingParams(**(dict(temperature=0.0, max_tokens=run.get("max_tokens", 4), logprobs=TOP,
                                         ignore_eos=True) | request.get("sampling", {})))
                  for request in requests]
        deferred = getattr(scheduler, "deferrals", 0)
        tiles = TILES[0]
        # (a request's `priority`, for an engine with scheduling_policy="priority")
        priority = [request.get("priority", 0) for request in requests] if any(
            "priority" in request for request in requests) else None
        outputs = llm.generate([vllm_prompt(request) for request in requests], params, use_tqdm=False,
                               priority=priority)
        round_deferrals.append(getattr(scheduler, "deferrals", 0) - deferred)
        vit_tiles.append(TILES[0] - tiles)
        rounds.append([{
            "request_id": out.request_id,
            "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": out.num_cached_tokens,
            **completion(out.outputs[0]),
            "top": [sorted((entry.logprob for entry in step.values() if entry.rank <= TOP), reverse=True)
                    for step in out.outputs[0].logprobs],
            "completions": [completion(one) for one in out.outputs],
        } for out in outputs])
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    after = counters(llm)
    return {
        "rounds": rounds, "counters": {name: after[name] - before[name] for name in after}, "evicted": evicted,
        "preempted": list(preempted),
        "short_groups": sum(isinstance(manager, LVTCShortManager) for manager in managers),
        "groups": len(managers),
        "preemptions": getattr(scheduler, "preemptions", 0) - preemptions,
        "deferrals": getattr(scheduler, "deferrals", 0) - deferrals, "round_deferrals": round_deferrals,
        "vit_tiles": vit_tiles,
        "caching": llm.llm_engine.vllm_config.cache_config.enable_prefix_caching,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
    }


def start(run: dict):
    """(LLM, its scheduler, the list the scheduler records each preempted request id in)."""
    from vllm import LLM

    llm = LLM(run["checkpoint"], disable_log_stats=False, **with_kv_cache(run["engine"]))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempted: list[str] = []
    preempt = scheduler._preempt_request

    def recorded(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    scheduler._preempt_request = recorded
    # the tiles the model's vision tower ran on (per round: `vit_tiles`), counted where the model runs in this process
    model = scheduler.executor.driver_worker.worker.model_runner.model if hasattr(scheduler, "executor") else None
    if model is not None and hasattr(model, "_vit"):
        vit = model._vit

        def counted(pixel_values):
            TILES[0] += pixel_values.shape[0]
            return vit(pixel_values)

        model._vit = counted
    return llm, scheduler, preempted


TILES = [0]  # the vision tower's tiles so far (`start`)


def main(spec_path: str, out_path: str) -> None:
    import gc
    import traceback

    runs = json.loads(Path(spec_path).read_text())["runs"]
    results, engine, key = {}, None, None
    for name, run in runs.items():
        try:
            if key != (run["checkpoint"], json.dumps(run["engine"], sort_keys=True)):
                # the previous engine gone first: deleting it later would tear down the new one's process groups
                engine = key = None
                gc.collect()
                print(f"=== engine for {name}", flush=True)
                engine = start(run)
                key = (run["checkpoint"], json.dumps(run["engine"], sort_keys=True))
            else:  # the previous run's engine: its caches emptied, as a fresh engine's
                assert engine[0].reset_prefix_cache(), "the prefix cache could not be reset (requests running)"
                engine[0].reset_mm_cache()
            print(f"=== run {name}", flush=True)
            results[name] = run_rounds(engine[0], engine[1], run, engine[2])
        except Exception as error:  # one run that fails must not hide the others' answers
            results[name] = {"error": "".join(traceback.format_exception(error))[-6000:]}
            engine = key = None
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
