"""A 3-turn chat about one image on vLLM with its prefix cache (vLLM's defaults), through `LLM.chat`: each turn's
prompt length (vLLM's count) and the tokens vLLM served from its cache (docs/serving-vllm.md, "What the prefix cache
served").

    internvlx demo --save demo
    .venv-vllm/bin/python experiments/vllm-lvtc-concurrency/chat_turns.py demo
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

QUESTIONS = ["How many shapes?", "What colour is the largest one?", "Where is it?"]


def main(folder: str) -> None:
    from vllm import LLM, SamplingParams

    from vllm_helpers import image

    llm = LLM(folder, dtype="float32", max_model_len=4096)
    buffer = io.BytesIO()
    image(448, 448, 3).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTIONS[0]}]}]
    turns = []
    for turn, question in enumerate(QUESTIONS):
        if turn:
            messages.append({"role": "user", "content": question})
        (answer,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
        turns.append({"turn": turn + 1, "prompt_tokens": len(answer.prompt_token_ids),
                      "cached_tokens": answer.num_cached_tokens})
        messages.append({"role": "assistant", "content": answer.outputs[0].text})
    print(json.dumps({"block_size": llm.llm_engine.vllm_config.cache_config.block_size, "turns": turns}))


if __name__ == "__main__":
    main(*sys.argv[1:])
