"""Spike (issue 93): InternVL3.5-Flash's router run when vLLM admits a request, before its length is fixed.

Hypothesis: vLLM 0.32's V1 engine serves a Flash checkpoint exactly (transformers' greedy tokens and logprobs) if,
when the scheduler admits a request, the router runs on the request's tiles (its quantile over all of them) and the
request is rewritten to the shortened prompt: each compressed tile's placeholders after its first quarter deleted,
each image's placeholder range and embedding mask moved, its encoder-cache identifier made decision-specific and
its block hashes recomputed. vLLM's own KV allocation, prefix caching, chunked prefill and batching then run on
the prompt transformers' `generate` runs, with no layout of the plugin's.

What decides it: greedy tokens equal and top logprobs within 1e-4 of transformers' for one image, two images (the
quantile across them), several requests in one step, a resent request (a prefix-cache hit on compressed tiles) and a
prefill split in chunks; the prompt tokens vLLM counts equal transformers' shortened prompt.

Not product code: the router and the tiles' projections run in the transformers model here (the vLLM model would
hold them), the engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the scheduler finds the
router directly) and the engine starts with the router off (`config_hook.check_router` refuses it on).

    .venv-vllm/bin/python experiments/vllm-flash-router/spike_admission.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from vllm_tiny import USER, build_checkpoint, image, reference_generate  # noqa: E402

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.modeling.vir import tile_tokens, vir_decisions  # noqa: E402

HF: InternVLXForConditionalGeneration | None = None  # the transformers model: the router and the tiles' projections
COUNTED: list[int] = []  # each admitted request's prompt tokens, as vLLM's scheduler counts them


def shorten(request) -> None:
    """The request as transformers' router leaves it: decisions over all its tiles (scope "sample"), the prompt
    without each compressed tile's deleted placeholders, each item's range, mask, identifier and the block hashes."""
    config = HF.config
    images = [f for f in request.mm_features if f.modality == "image"]
    if not images:
        return
    pixels = [f.data["pixel_values"].data for f in images]
    with torch.no_grad():
        vit, _, _ = HF.model._vision_output(torch.cat(pixels), None, {})
        scores = HF.model.vir.scores(vit)
    vir = config.vir
    compressed = vir_decisions(scores, [scores.shape[0]], vir.relative_threshold, vir.absolute_threshold)
    per_tile, kept = config.image_seq_length, config.compressed_tokens_per_tile
    ids, new, shift, start = list(request.prompt_token_ids), [], 0, 0
    for feature, decisions in zip(images, compressed.split([p.shape[0] for p in pixels])):
        position = feature.mm_position
        new += ids[start:position.offset]
        piece = ids[position.offset:position.offset + position.length]
        mask = position.is_embed.tolist()
        first = mask.index(True)
        body = []
        for tile, squeeze in enumerate(decisions.tolist()):
            body += piece[first + tile * per_tile: first + tile * per_tile + (kept if squeeze else per_tile)]
        rest = piece[first + len(decisions) * per_tile:]
        piece = piece[:first] + body + rest
        embed = [False] * first + [True] * len(body) + [False] * len(rest)
        feature.mm_position = type(position)(offset=len(new), length=len(piece), is_embed=torch.tensor(embed))
        feature.identifier = f"{feature.identifier}:vir{''.join('1' if d else '0' for d in decisions.tolist())}"
        item = feature.data
        item["vir_compressed"] = type(item["pixel_values"])(data=decisions.clone(), field=item["pixel_values"].field)
        new += piece
        start = position.offset + position.length
        shift += position.length - len(piece)
    new += ids[start:]
    request.prompt_token_ids = new
    request._all_token_ids[:] = new
    request.num_prompt_tokens = len(new)
    request.block_hashes.clear()
    request.update_block_hashes()


def embed_with_router(self, **kwargs):
    """The tiles' rows as transformers' router gives them: the 64-token projector for compressed tiles."""
    counts = [int(n) for n in kwargs["image_num_patches"].reshape(-1).tolist()]
    given = kwargs.get("vir_compressed")  # (none in vLLM's profiling run: every tile at full size)
    compressed = (given.reshape(-1).bool() if given is not None
                  else torch.zeros(kwargs["pixel_values"].shape[0], dtype=torch.bool))
    with torch.no_grad():
        vit, _, _ = HF.model._vision_output(kwargs["pixel_values"].float(), None, {})
        features = tile_tokens(vit, compressed, HF.model.multi_modal_projector, HF.model.vir.projector)
    per_tile = torch.where(compressed, HF.config.compressed_tokens_per_tile, HF.config.image_seq_length)
    per_item = [int(rows.sum()) for rows in per_tile.split(counts)]
    return tuple(part.to(self.model_dtype) for part in features.split(per_item))


def main() -> None:
    global HF
    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler

    import internvlx_hf.vllm.model as plugin_model

    class AdmissionScheduler(Scheduler):
        def add_request(self, request) -> None:
            shorten(request)
            COUNTED.append(request.num_prompt_tokens)
            super().add_request(request)

    work = Path(tempfile.mkdtemp(prefix="flash-spike-"))
    folder = build_checkpoint(work / "flash", llm="qwen3", text=dict(head_dim=64), vir={}, seed=1)
    HF = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    plugin_model.InternVLXForConditionalGeneration.embed_multimodal = embed_with_router

    requests = {
        "6 tiles": ("<image>\nDescribe the picture.", [(560, 112, 2)]),
        "13 tiles": ("<image>\nDescribe.", [(448, 336, 4)]),
        "two images": ("<image>\nand <image>\nCompare them.", [(300, 200, 5), (1232, 112, 3)]),
        "1 tile": ("<image>\nWhat is this?", [(112, 112, 1)]),
    }
    references = {}
    for name, (text, images) in requests.items():
        pictures = [image(*i) for i in images]
        references[name] = reference_generate(HF, processor, USER.format(text), images=pictures)
        inputs = processor(text=USER.format(text), images=pictures, return_tensors="pt")
        routing = HF.model.route(inputs.input_ids, inputs.pixel_values)
        references[name]["short_len"] = routing.input_ids.shape[1]
        references[name]["compressed"] = routing.compressed.int().tolist()
        scores = routing.scores.float()
        references[name]["above_quantile"] = int((scores > torch.quantile(scores, 0.1)).sum())

    def prompts(names):
        return [{"prompt": USER.format(requests[n][0]),
                 "multi_modal_data": {"image": [image(*i) for i in requests[n][1]]}} for n in names]

    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)
    results = {}
    for label, options in (("chunked 64", dict(max_num_batched_tokens=64, enable_chunked_prefill=True)),
                           ("whole", dict(max_num_batched_tokens=4096))):
        llm = LLM(str(folder), dtype="float32", enforce_eager=False, max_model_len=4096, max_num_seqs=8,
                  gpu_memory_utilization=0.15, limit_mm_per_prompt={"image": 2, "video": 0},
                  hf_overrides={"vir": {"enabled": False}}, scheduler_cls=AdmissionScheduler, **options)
        names = list(requests)
        for mode, batches in (("alone", [[n] for n in names]), ("together", [names]), ("resent", [names])):
            for batch in batches:
                COUNTED.clear()
                answers = llm.generate(prompts(batch), params, use_tqdm=False)
                assert sorted(COUNTED) == sorted(references[n]["short_len"] for n in batch), (COUNTED, batch)
                for name, out in zip(batch, answers):
                    completion = out.outputs[0]
                    results[(label, mode, name)] = (list(completion.token_ids), completion.logprobs,
                                                    out.num_cached_tokens)
        del llm

    worst, failures = 0.0, []
    for (label, mode, name), (tokens, logprobs, cached) in results.items():
        reference = references[name]
        if tokens != reference["tokens"]:
            failures.append(f"{label}/{mode}/{name}: {tokens} != {reference['tokens']}")
            continue
        for step, top in zip(logprobs, reference["top"]):
            for token, value in top:
                if token in step:
                    worst = max(worst, abs(step[token].logprob - value))
        print(f"{label:10s} {mode:8s} {name:10s} tokens equal; cached {cached}; "
              f"prompt {reference['short_len']} tokens (vLLM's count equal), "
              f"{sum(reference['compressed'])} of {len(reference['compressed'])} tiles compressed "
              f"({reference['above_quantile']} above the quantile)")
    print(f"largest |logprob difference| over the top 5: {worst:.2e}")
    print("FAILURES:\n" + "\n".join(failures) if failures else "every answer equals transformers'")


if __name__ == "__main__":
    main()
