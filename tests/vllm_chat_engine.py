"""`vllm.LLM` on checkpoints as users call it, for tests/test_vllm_chat.py, in its own process (one engine after the
other): `python vllm_chat_engine.py SPEC OUT`.

SPEC (JSON): name -> the checkpoint, engine options, `chat` (lists of messages for `LLM.chat`, image parts as
`{"type": "image_url", "image_url": [width, height, seed]}`) and `generate` (prompts with their images for
`LLM.generate`). OUT, by name: each one's prompt ids, greedy tokens and each step's top 5 logprobs, or the error it
raised.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core runs in this process

from vllm_helpers import image, with_kv_cache  # noqa: E402

#: how many of each step's most likely tokens come back with their logprobs
TOP = 5


def _messages(messages: list[dict]) -> list[dict]:
    """Image parts as PIL images (`image_pil` parts, vLLM's way of passing an image object to `LLM.chat`)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_pil", "image_pil": image(*part["image_url"])} if part["type"] == "image_url"
                       else part for part in content]
        out.append({"role": message["role"], "content": content})
    return out


def _answer(call) -> dict:
    try:
        output = call()[0]
    except Exception as error:  # noqa: BLE001 - what a user sees is the answer
        return {"error": f"{type(error).__name__}: {error}"}
    completion = output.outputs[0]
    return {"prompt_token_ids": list(output.prompt_token_ids), "tokens": list(completion.token_ids),
            # each step's TOP best logprobs, best first
            "top": [sorted((entry.logprob for entry in step.values() if entry.rank <= TOP), reverse=True)
                    for step in completion.logprobs]}


def answers(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(spec["checkpoint"], **with_kv_cache(spec["engine"]))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=TOP)
    results = {"chat": [], "generate": []}
    for messages in spec["chat"]:
        results["chat"].append(_answer(lambda: llm.chat(_messages(messages), params, use_tqdm=False)))
    for request in spec["generate"]:
        prompt = {"prompt": request["prompt"]}
        if request["images"]:
            prompt["multi_modal_data"] = {"image": [image(*size) for size in request["images"]]}
        results["generate"].append(_answer(lambda: llm.generate([prompt], params, use_tqdm=False)))
    return results


def main() -> None:
    import gc

    results = {}
    for name, spec in json.loads(Path(sys.argv[1]).read_text()).items():
        results[name] = answers(spec)
        gc.collect()
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
