"""Tiny InternVL-X checkpoints for vLLM, the requests they answer, and the transformers reference: shared by the vLLM
benchmarks and the vLLM tests (tests/vllm_helpers.py imports them from here; a benchmark imports only the package and
the benchmarks' own modules).

vLLM's CPU attention needs a head size of at least 32, so these models have 2 heads of 32 in the LLM (and in the
ViT); the tokenizer, chat template and image tokens are the packaged demo model's (vocabulary 812, 112px tiles of
8x8 patches: 16 tokens per tile at ratio 0.5, 64 at ratio 1.0).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXImageProcessor, InternVLXProcessor
from internvlx_hf.demo.packaged import DEMO_MODEL_DIR

IMAGE_TOKEN_ID, IMAGE_START_ID, IMAGE_END_ID = 805, 803, 804
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def text_config(llm: str, layers: int = 4, **extra) -> dict:
    text = dict(model_type=llm, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=812, max_position_embeddings=4096, rms_norm_eps=1e-6,
                pad_token_id=800, eos_token_id=802, tie_word_embeddings=False)
    if llm == "qwen3":
        text["head_dim"] = 32
    return text | extra


def build_checkpoint(folder: str | Path, llm: str = "qwen2", projector: str = "mlp", lvtc: dict | None = None,
                     seed: int = 0, max_tiles: int = 12, tiling: str = "ratio", text: dict | None = None,
                     vision: dict | None = None, **overrides) -> Path:
    """Write a random tiny InternVL-X checkpoint (weights, config, processor, tokenizer) into `folder`.

    `text` / `vision`: extra text / vision config values; `overrides`: InternVLXConfig values."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = InternVLXConfig(
        text_config=text_config(llm, **(text or {})),
        vision_config={**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=112, patch_size=14), **(vision or {})},
        image_token_id=IMAGE_TOKEN_ID, image_start_token_id=IMAGE_START_ID, image_end_token_id=IMAGE_END_ID,
        projector_type=projector, pvtc_num_heads=2, lvtc=lvtc, template="Hermes-2", **overrides,
    )
    torch.manual_seed(seed)
    model = InternVLXForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that images and text move the logits visibly
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embeddings" not in name:
                param.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = 802
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEMO_MODEL_DIR / name, folder / name)
    tokenizer_processor = InternVLXProcessor.from_pretrained(DEMO_MODEL_DIR)
    processor = InternVLXProcessor(
        image_processor=InternVLXImageProcessor(image_size=112, max_tiles=max_tiles, tiling=tiling),
        tokenizer=tokenizer_processor.tokenizer, chat_template=tokenizer_processor.chat_template,
        image_seq_length=config.image_seq_length,
    )
    processor.save_pretrained(folder)
    return folder


def image(width: int, height: int, seed: int) -> Image.Image:
    """A random RGB image (seeded): different images give different features."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def video(frames: int, seed: int, size: int = 96) -> np.ndarray:
    """Random frames `(frames, size, size, 3)` uint8, as vLLM hands a decoded video."""
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


@torch.no_grad()
def reference_generate(model, processor, prompt: str, images=None, videos=None, max_new_tokens: int = 8,
                       top: int = 5, **processor_kwargs) -> dict:
    """Greedy generation of our transformers model: `prompt_ids`, new `tokens`, the log-probability of each
    (`logprobs`) and each step's `top` most likely tokens as `[id, logprob]`, best first."""
    inputs = processor(text=prompt, images=images, videos=videos, return_tensors="pt", **processor_kwargs)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, min_new_tokens=max_new_tokens)
    prompt_ids = inputs["input_ids"][0].tolist()
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    steps = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    best = [step.topk(top) for step in steps]
    return {
        "prompt_ids": prompt_ids,
        "tokens": tokens,
        "logprobs": [step[token].item() for step, token in zip(steps, tokens)],
        "top": [[[int(i), float(v)] for v, i in zip(values.tolist(), indices.tolist())] for values, indices in best],
    }


#: A tiny InternVL3.5-Flash checkpoint (`build_checkpoint` options: Qwen3 with 64-wide heads, as vLLM's CPU attention
#: needs, and the router on; 16 tokens per tile, 4 per compressed tile)
FLASH = dict(llm="qwen3", text=dict(head_dim=64), vir={}, seed=1)


def routed_prompt(model, processor, request: dict) -> list[int]:
    """The prompt ids transformers' router runs for `request` (`InternVLXModel.route`; a text prompt's own)."""
    inputs = processor(text=request["prompt"], images=[image(*i) for i in request["images"]] or None,
                       videos=[video(*v) for v in request.get("videos", [])] or None, return_tensors="pt",
                       **request.get("mm_processor_kwargs", {}))
    if "pixel_values" not in inputs:
        return inputs.input_ids[0].tolist()
    return model.model.route(inputs.input_ids, inputs.pixel_values).input_ids[0].tolist()


USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
# (width, height): tiles with max_tiles=12 and the thumbnail
ONE_TILE, SIX_TILES, TWELVE_TILES, THIRTEEN_TILES = (112, 112), (560, 112), (1232, 112), (448, 336)


def request_spec(text, images=(), videos=(), **mm_processor_kwargs) -> dict:
    """A request as `vllm_prompt` takes it: the prompt (one user turn in the tiny checkpoints' template), images
    as (width, height, seed), videos as (frames, seed), and per-request processor options."""
    return {"prompt": USER.format(text), "images": [list(i) for i in images], "videos": [list(v) for v in videos],
            "mm_processor_kwargs": mm_processor_kwargs}


#: The requests of tests/test_vllm.py (benchmarks/bench_vllm_lvtc_savings.py answers them too)
REQUESTS = {
    "text": request_spec("Write a haiku about the sea."),
    "1 tile": request_spec("<image>\nWhat is this?", images=[(*ONE_TILE, 1)]),
    "6 tiles": request_spec("<image>\nDescribe the picture.", images=[(*SIX_TILES, 2)]),
    "12 tiles": request_spec("Look: <image>\nDescribe.", images=[(*TWELVE_TILES, 3)]),
    "13 tiles": request_spec("<image>\nDescribe.", images=[(*THIRTEEN_TILES, 4)]),
    "two images": request_spec("<image>\nand <image>\nCompare them.", images=[(300, 200, 5), (*ONE_TILE, 6)]),
    # the 6-tile image with a tile budget of 2 (+ thumbnail), asked per request
    "max_tiles=2": request_spec("<image>\nDescribe the picture.", images=[(*SIX_TILES, 2)], max_tiles=2),
    # RVTC's edge tiling, asked per request: 5 tiles for this image (ratio tiling: 13)
    "tiling=edge": request_spec("<image>\nDescribe.", images=[(200, 150, 8)], tiling="edge"),
    "video": request_spec("<video>\nWhat happens?", videos=[(4, 7)]),
}


def vllm_prompt(request: dict) -> dict:
    """A request of `request_spec`'s format as vLLM's `LLM.generate` / `LLMEngine.add_request` take it: the images and
    videos generated from their seeds (or a file of projector outputs, `image_embeds`), the processor options."""
    data = {}
    if request.get("images"):
        data["image"] = [image(w, h, seed) for w, h, seed in request["images"]]
    if request.get("image_embeds"):  # a file of projector outputs, one (rows, hidden) tensor per image
        import torch

        data["image"] = torch.load(request["image_embeds"])
    if request.get("videos"):
        data["video"] = [video(frames, seed) for frames, seed in request["videos"]]
    prompt = {"prompt": request["prompt"], "multi_modal_data": data} if data else {"prompt": request["prompt"]}
    if request.get("mm_processor_kwargs"):
        prompt["mm_processor_kwargs"] = request["mm_processor_kwargs"]
    if request.get("uuids"):  # the client's identifiers of its items (vLLM's `multi_modal_uuids`)
        prompt["multi_modal_uuids"] = request["uuids"]
    return prompt
