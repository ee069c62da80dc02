"""Child process of `bench_vllm_lvtc_conversation.py`: vLLM engines in this process, timed on what chat servers do.

`python benchmarks/vllm_conversation_engine.py SPEC OUT`. SPEC (JSON): `engines` (name, checkpoint, options) and
`rounds`; every round gives every engine the same work on images none of them has seen (new seeds), the engines in
turn (their order alternating between rounds), so that drifting load on the shared machine hits all alike:

- `chat`: a conversation about one image, `turns` turns, each engine keeping its own as a chat client does (its
  answer of `answer_tokens` tokens, in words that tokenize back to the same tokens (`WORDS`), resent in the next
  turn's whole prompt); the seconds to the first token of each turn (its prefill: what the prefix cache shortens)
  and the tokens vLLM's prefix cache served it;
- `users`: `users` people asking different questions about one image: the first alone, then the others at once;
- `decode`: 4 text streams decoding while a request with a 6-tile image arrives; the seconds between consecutive
  tokens of the 4 streams from its arrival to its first token (vLLM's `LLMEngine.step`, one token per stream a step).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: `step` is synchronous
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm_tiny import USER, request_spec, vllm_prompt  # noqa: E402

QUESTIONS = ["What colours stand out?", "Is there any text?", "What is in the top left corner?",
             "Would it make a good wallpaper?", "Describe it in one word.", "Is it a photograph?",
             "What is the brightest part?", "Count the shapes you see."]


def with_seed(request: dict, seed: int) -> dict:
    return {**request, "images": [[w, h, seed] for w, h, _ in request["images"]]}


def opening(image_size: list[int], seed: int) -> dict:
    """A chat's first turn about one image."""
    return request_spec("<image>\nDescribe the picture.", images=[(*image_size, seed)])


#: the words answers are written in: each one token with its leading space, so that an answer's text tokenizes back to
#: its tokens when a client resends it (the test models' free answers are arbitrary tokens, whose text often does not)
WORDS = ("the a picture shows colours shapes light dark red green blue small large bright left right top bottom with "
         "and of in on is are some many no one two three corner edge middle pattern line lines square squares").split()


def word_tokens(llm) -> list[int]:
    tokenizer = llm.get_tokenizer()
    ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in WORDS]
    return [one[0] for one in ids if len(one) == 1]


def timed(llm, requests: list[dict], max_tokens: int, allowed: list[int] | None = None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, allowed_token_ids=allowed)
    began = time.perf_counter()
    outputs = llm.generate([vllm_prompt(r) for r in requests], params, use_tqdm=False)
    return time.perf_counter() - began, outputs


def decode_gaps(llm, arriving: dict, tag: str, streams: int = 4, max_tokens: int = 400) -> list[float]:
    """Seconds between consecutive tokens of `streams` decoding text streams, from the arrival of `arriving` until its
    first token."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-stream-{index}" for index in range(streams)]
    for index, request_id in enumerate(ids):
        engine.add_request(request_id, vllm_prompt(request_spec(f"Tell story {index} of {tag}.")), params)

    def owner(output) -> str:  # (vLLM may add a suffix to the id it was given)
        return next(i for i in ids + [f"{tag}-image"] if output.request_id.startswith(i))

    seen = dict.fromkeys(ids, 0)
    while min(seen.values()) < 2:  # every stream decoding
        for out in engine.step():
            seen[owner(out)] = len(out.outputs[0].token_ids)
    engine.add_request(f"{tag}-image", vllm_prompt(arriving), SamplingParams(temperature=0.0, max_tokens=1))
    last = dict.fromkeys(ids, time.perf_counter())
    gaps: list[float] = []
    arrived = False
    while not arrived:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            key = owner(out)
            count = len(out.outputs[0].token_ids)
            if key not in seen:
                arrived = arrived or count > 0
            elif count > seen[key]:
                gaps.append(now - last[key])
                last[key], seen[key] = now, count
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return gaps


def deferrals(engines: dict) -> dict:
    """Each engine's admissions its scheduler put off a step so far (`LVTCSchedulerMixin.deferrals`; None: vLLM's own
    scheduler)."""
    return {name: getattr(llm.llm_engine.engine_core.engine_core.scheduler, "deferrals", None)
            for name, llm in engines.items()}


def main() -> None:
    from vllm import LLM

    spec = json.loads(Path(sys.argv[1]).read_text())
    engines = {}
    for engine in spec["engines"]:
        began = time.perf_counter()
        engines[engine["name"]] = LLM(engine["checkpoint"], **engine["options"])
        print(f"[engine] {engine['name']}: started in {time.perf_counter() - began:.0f} s", flush=True)
    names = list(engines)
    image_size = spec["image"]
    work = spec["work"]
    results = {name: {"chat_s": [], "chat_cached": [], "chat_prompt_tokens": [], "users_first_s": [],
                      "users_rest_s": [], "users_cached": [], "decode_gaps_s": []} for name in names}
    for name, llm in engines.items():  # warm-up: one-off costs of the first requests, on an image used nowhere else
        timed(llm, [opening(image_size, seed=999)], 2)
    for round_ in range(spec["rounds"]):
        order = names if round_ % 2 == 0 else names[::-1]
        seed = 1000 * (round_ + 1)
        if "chat" in work:
            # each engine its own conversation, as a chat client keeps it: the engine's own answer (a fixed number of
            # tokens) resent in the next turn's prompt; the first token of each turn timed (prefill, what the prefix
            # cache shortens), then the answer decoded (not timed)
            prompts = {name: opening(image_size, seed) for name in names}
            words = {name: word_tokens(engines[name]) for name in names}
            per_engine = {name: ([], [], []) for name in names}
            for turn in range(work["chat"]["turns"]):
                for name in order:
                    seconds, outputs = timed(engines[name], [prompts[name]], 1)
                    per_engine[name][0].append(seconds)
                    per_engine[name][1].append(outputs[0].num_cached_tokens or 0)
                    per_engine[name][2].append(len(outputs[0].prompt_token_ids))
                    _, answer = timed(engines[name], [prompts[name]], work["chat"]["answer_tokens"],
                                      allowed=words[name])
                    question = QUESTIONS[(turn + 1) % len(QUESTIONS)]
                    prompts[name] = prompts[name] | {"prompt": prompts[name]["prompt"] + answer[0].outputs[0].text
                                                     + "<|im_end|>\n" + USER.format(question)}
            for name in names:
                for key, values in zip(("chat_s", "chat_cached", "chat_prompt_tokens"), per_engine[name]):
                    results[name][key].append(values)
            print(f"[engine] chat round {round_}: " + ", ".join(
                f"{n} {' / '.join(f'{s:.2f}' for s in per_engine[n][0])} s (cached {per_engine[n][1]})"
                for n in names), flush=True)
        if "users" in work:
            users = [request_spec(f"<image>\n{q}", images=[(*image_size, seed + 1)])
                     for q in QUESTIONS[: work["users"]["users"]]]
            for name in order:
                first, out_first = timed(engines[name], users[:1], work["users"]["max_tokens"])
                rest, out_rest = timed(engines[name], users[1:], work["users"]["max_tokens"])
                results[name]["users_first_s"].append(first)
                results[name]["users_rest_s"].append(rest)
                results[name]["users_cached"].append([o.num_cached_tokens or 0 for o in out_first + out_rest])
            print(f"[engine] users round {round_}: " + ", ".join(
                f"{n} {results[n]['users_first_s'][-1]:.2f} + {results[n]['users_rest_s'][-1]:.2f} s" for n in names)
                + f"; admissions put off a step so far: {deferrals(engines)}", flush=True)
        if "decode" in work:
            arriving = with_seed(request_spec("<image>\nDescribe the picture.", images=[(*image_size, 0)]), seed + 2)
            for name in order:
                gaps = decode_gaps(engines[name], arriving, tag=f"r{round_}-{name}")
                results[name]["decode_gaps_s"].append(gaps)
            print(f"[engine] decode round {round_}: " + ", ".join(
                f"{n} {len(results[n]['decode_gaps_s'][-1])} gaps, max {max(results[n]['decode_gaps_s'][-1]):.2f} s"
                for n in names), flush=True)
    for name, llm in engines.items():
        config = llm.llm_engine.vllm_config
        results[name]["engine"] = {
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "enable_chunked_prefill": config.scheduler_config.enable_chunked_prefill,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "block_size": config.cache_config.block_size, "lvtc_vllm_path": getattr(
                config.model_config.hf_config, "lvtc_vllm_path", None)}
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
