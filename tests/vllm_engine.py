"""Runs vLLM on InternVL-X checkpoints for tests/test_vllm.py, in its own process: `python vllm_engine.py SPEC OUT`.

SPEC (JSON) lists engines, each a checkpoint, its engine options and its requests; every engine answers its requests
twice: one at a time, then all at once (vLLM batches them). OUT gets, per engine and request, the prompt's token ids
and the greedy tokens with their logprobs, both times. The engine runs in this process (no worker processes), one
after the other.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core runs in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (the default takes a share of the machine)

from vllm_helpers import image, video  # noqa: E402


def _inputs(request: dict) -> dict:
    data = {}
    if request.get("images"):
        data["image"] = [image(w, h, seed) for w, h, seed in request["images"]]
    if request.get("videos"):
        data["video"] = [video(frames, seed) for frames, seed in request["videos"]]
    prompt = {"prompt": request["prompt"], "multi_modal_data": data} if data else {"prompt": request["prompt"]}
    if request.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
    return prompt


def _result(output) -> dict:
    completion = output.outputs[0]
    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "tokens": list(completion.token_ids),
        "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
    }


def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.time()
    llm = LLM(spec["checkpoint"], **spec["engine"])
    startup = time.time() - started
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=1, ignore_eos=True)
    inputs = [_inputs(request) for request in spec["requests"]]
    alone = [_result(llm.generate([one], params, use_tqdm=False)[0]) for one in inputs]
    together = [_result(out) for out in llm.generate(inputs, params, use_tqdm=False)]
    del llm
    gc.collect()
    return {"startup_s": startup, "alone": alone, "together": together}


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    specs = json.loads(Path(spec_path).read_text())
    results = {name: run_engine(spec) for name, spec in specs.items()}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
