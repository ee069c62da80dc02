"""Runs vLLM on InternVL-X checkpoints for tests/test_vllm.py, in its own process: `python vllm_engine.py SPEC OUT`.

SPEC (JSON) lists engines, each a checkpoint, its engine options and its requests; every engine answers its requests
twice: one at a time, then all at once (vLLM batches them). OUT gets, per engine and request, the prompt's token ids
and the greedy tokens with their logprobs and each step's top `LOGPROBS`, both times (or, for an engine that did not
start, its `error`), the spec classes of its KV-cache groups and its scheduler's class; an engine given `dummy_runs`
(token counts) makes V1's dummy forwards first (`dummy_run`); `refused` requests (with extra sampling options) are
sent after those, and their finish reasons kept, then the `sequence` requests one by one, each with the tiles the
vision tower ran for it. The engines run in this process (no worker processes), one after the other.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core runs in this process

from vllm_helpers import vllm_prompt, with_kv_cache  # noqa: E402

#: how many of each step's most likely tokens come back with their logprobs
LOGPROBS = 5


def _result(output) -> dict:
    completion = output.outputs[0]
    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "cached_tokens": output.num_cached_tokens or 0,  # the prompt tokens vLLM's prefix cache served
        "tokens": list(completion.token_ids),
        "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
        # the top LOGPROBS of each step (vLLM adds the sampled token when it is not among them), best first
        "top": [sorted(([token, entry.logprob] for token, entry in step.items() if entry.rank <= LOGPROBS),
                       key=lambda pair: pair[1], reverse=True) for step in completion.logprobs],
    }


def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.time()
    llm = LLM(spec["checkpoint"], **with_kv_cache(spec["engine"]))
    startup = time.time() - started
    dummy_runs = [dummy_run(llm, tokens) for tokens in spec.get("dummy_runs", [])]
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=LOGPROBS,
                            ignore_eos=True)
    inputs = [vllm_prompt(request) for request in spec["requests"]]
    # an adapter (spec "lora": its folder) for every request but those marked `"base": true`
    loras = [None] * len(inputs)
    if spec.get("lora"):
        from vllm.lora.request import LoRARequest

        adapter = LoRARequest("adapter", 1, spec["lora"])
        loras = [None if request.get("base") else adapter for request in spec["requests"]]
    alone = [_result(llm.generate([one], params, use_tqdm=False, lora_request=lora)[0])
             for one, lora in zip(inputs, loras)]
    together = [_result(out) for out in llm.generate(inputs, params, use_tqdm=False, lora_request=loras)]
    # requests that also give their conversation (`messages`, text only): `LLM.chat`, as vLLM renders and tokenizes it
    chat = [_result(llm.chat(request["messages"], params, use_tqdm=False)[0])
            for request in spec["requests"] if request.get("messages")]
    # requests the engine should finish with an error (`refused`: a request and its extra sampling options)
    refused = []
    for request in spec.get("refused", []):
        out = llm.generate([vllm_prompt(request)], SamplingParams(temperature=0.0, max_tokens=4,
                                                                  **request.get("sampling", {})), use_tqdm=False)[0]
        refused.append({"finish_reason": out.outputs[0].finish_reason if out.outputs else None,
                        "tokens": list(out.outputs[0].token_ids) if out.outputs else []})
    # requests sent one at a time after those (`sequence`), each with the tiles the vision tower ran for it
    sequence = []
    for request in spec.get("sequence", []):
        before = tower_tiles(llm)
        out = llm.generate([vllm_prompt(request)], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0]
        sequence.append({"finish_reason": out.outputs[0].finish_reason if out.outputs else None,
                         "tokens": list(out.outputs[0].token_ids) if out.outputs else [],
                         "tower_tiles": tower_tiles(llm) - before})
    probe = rows_probe(llm, spec["checkpoint"], spec["rows_probe"]) if spec.get("rows_probe") else None
    # weights pushed into the running engine (`weight_updates`), each followed by its request's answer
    updates = []
    for update in spec.get("weight_updates", []):
        push_weights(llm, update["weights"], update["how"])
        if update["how"] == "copy":  # (written into the parameters: vLLM's caches reset, as its docs ask)
            llm.reset_prefix_cache()
            llm.llm_engine.reset_encoder_cache()
        out = llm.generate([vllm_prompt(update["request"])], params, use_tqdm=False)[0]
        updates.append(_result(out))
    specs = kv_cache_specs(llm)
    scheduler = type(llm.llm_engine.engine_core.engine_core.scheduler).__name__
    prefix_caching = llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    del llm
    gc.collect()
    return {"startup_s": startup, "dummy_runs": dummy_runs, "alone": alone, "together": together, "chat": chat,
            "refused": refused, "sequence": sequence, "rows_probe": probe, "weight_updates": updates, "kv_cache_specs": specs, "scheduler": scheduler,
            "prefix_caching": prefix_caching, "block_size": block_size}


def dummy_run(llm, tokens: int) -> dict:
    """V1's dummy forward of `tokens` tokens once the KV cache exists, as its GPU worker runs it to warm up the
    sampler (`gpu_worker.compile_or_warm_up_model`), and its graph-memory profiling, warm-up sizes and FlashInfer
    autotune do: a slot mapping for every KV-cache group, no attention metadata (neither FULL graphs nor
    `force_attention`). vLLM's CPU worker warms up before the KV cache exists, so no CPU engine makes this call
    itself. Whether it raised, and whether it changed any KV cache (a dummy run must write none)."""
    import torch
    from vllm.config import CUDAGraphMode

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    before = [cache.clone() for cache in runner.kv_caches]
    try:
        runner._dummy_run(num_tokens=tokens, skip_eplb=True, cudagraph_runtime_mode=CUDAGraphMode.NONE)
    except Exception as error:  # noqa: BLE001 - what the test asserts on
        return {"tokens": tokens, "error": f"{type(error).__name__}: {error}"}
    return {"tokens": tokens, "error": None,
            "kv_written": any(not torch.equal(a, b) for a, b in zip(before, runner.kv_caches))}


def push_weights(llm, weights: dict, how: str) -> None:
    """New values for some of the model's weights (checkpoint names), as reinforcement-learning frameworks push them
    into a running engine: through the model's `load_weights` (`how="load_weights"`), or copied into the parameters
    (`"copy"`, as a weight transfer writes them)."""
    import torch

    model = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.get_model()
    if how == "load_weights":
        model.load_weights([(name, torch.tensor(value)) for name, value in weights.items()])
        return
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name.removeprefix("model.")].copy_(torch.tensor(value))


def rows_probe(llm, spec_checkpoint: str, request: dict) -> dict:
    """The router model's step embedding of `request`'s images (two: `pixel_values` as its processor makes them)
    where the rows of the second were kept when routed and the first's were not (an image routed from its kept
    scores, beside a new one): whether the rows equal those computed for both, and the tiles the vision tower ran."""
    import torch

    from internvlx_hf.vllm.router.scheduler import _route_on_worker

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    model = runner.get_model()
    from internvlx_hf import InternVLXProcessor

    data = InternVLXProcessor.from_pretrained(spec_checkpoint).image_processor(
        images=vllm_prompt(request)["multi_modal_data"]["image"], return_tensors="pt")
    pixels, counts = data["pixel_values"], data["num_patches"].tolist()
    parts = list(pixels.split(counts))
    decisions = _route_on_worker(runner, [(parts, [1000, 1001], None)])[0]
    compressed = torch.tensor(sum(decisions, []))
    model.admitted.drop([1000])  # (the first item's rows not kept)
    keys = torch.tensor([1000] * counts[0] + [1001] * counts[1])
    before = model.tower_tiles
    rows = model._embedded(pixels, counts, compressed, keys)
    ran = model.tower_tiles - before
    whole = model._item_features(pixels, counts, compressed)
    return {"equal": all(torch.equal(a, b) for a, b in zip(rows, whole)) and len(rows) == len(whole),
            "tower_tiles": ran, "tiles": counts}


def tower_tiles(llm) -> int:
    """How many tiles the model's vision tower has run so far (summed over the workers)."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    return sum(executor.collective_rpc(_worker_tower_tiles))


def _worker_tower_tiles(worker) -> int:
    return getattr(worker, "worker", worker).model_runner.get_model().tower_tiles


def kv_cache_specs(llm) -> list[str]:
    """The class names of the engine's KV-cache groups' specs (an LVTC checkpoint on the saving path has an
    `LVTCShortSpec` group), read in every worker: in this process, or in the worker processes of a parallel engine."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    return sorted(set().union(*executor.collective_rpc(_worker_kv_cache_specs)))


def _worker_kv_cache_specs(worker) -> list[str]:
    """In a worker (its wrapper, where vLLM wraps it): its KV-cache groups' spec class names."""
    runner = getattr(worker, "worker", worker).model_runner
    return [type(group.kv_cache_spec).__name__ for group in runner.kv_cache_config.kv_cache_groups]


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    specs = json.loads(Path(spec_path).read_text())
    results = {}
    for name, spec in specs.items():
        try:
            results[name] = run_engine(spec)
        except BaseException as error:  # one engine that does not start must not hide the others' answers
            if isinstance(error, KeyboardInterrupt):
                raise
            results[name] = {"error": "".join(traceback.format_exception(error))[-4000:]}
        gc.collect()
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
