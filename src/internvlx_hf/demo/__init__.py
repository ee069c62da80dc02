"""The embedded demo: a tiny InternVL-X model trained by this project, answering questions about images offline.

``model/`` (next to this file) is the ``pvtc+lvtc`` model of the learnability benchmark: a PVTC projector and LVTC
(16 tokens per 112 px tile in layers 0-4, 64 from layer 5), trained from scratch on the synthetic visual QA of
`internvlx_hf.training.synthetic_vqa` by ``scripts/make_demo_model.py`` through `internvlx_hf.training.run`, on
conversations with an empty system block or none (the chat template's default system message), so it answers in the
clients that send no system turn too (lmms-eval, transformers' pipelines, InternVL2's ``chat()``). A second stage
taught it one video question over 4 frames ("Which colour appears first?", `demo_video_samples`, `answer_video`).

The package ships its weights, config and tokenizer, not a copy of the model's code (`internvlx_hf.demo.packaged`):
`demo_model_dir()` is the complete checkpoint folder, remote code added from the package's own modules, which loads
like any checkpoint with ``AutoModel.from_pretrained(demo_model_dir(), trust_remote_code=True)``, and
`save_demo_model(dst)` (``internvlx demo --save DIR``) writes one where clients without internvlx-hf load it.

    from internvlx_hf.demo import answer, demo_samples, load_demo_model
    model, processor = load_demo_model()
    for sample in demo_samples():
        print(sample.question, answer(model, processor, sample.image, sample.question).answer)
    for sample in demo_video_samples():
        print(sample.question, answer_video(model, processor, sample.video, sample.question).answer)

`internvlx demo` is the command-line face of this module.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..token_budget import layer_groups
from .packaged import DEMO_MODEL_DIR, demo_model_dir, save_demo_model

TILING_MODES = ("ratio", "area", "edge")


def demo_record(path: str | os.PathLike = DEMO_MODEL_DIR) -> dict[str, Any]:
    """The recipe and held-out scores of a demo model folder (``demo_model.json``), or {} when there is none."""
    record = Path(path) / "demo_model.json"
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}


def load_demo_model(path: str | os.PathLike | None = None):
    """``(model, processor)`` from a demo model folder (default: the packaged one, `demo_model_dir()`), through
    transformers' Auto classes with ``trust_remote_code=True``, in float32 and eval mode."""
    from transformers import AutoModel, AutoProcessor

    folder = Path(path) if path is not None else demo_model_dir()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no demo model there (config.json missing); regenerate the packaged one "
                                "with `python scripts/make_demo_model.py` or pass a checkpoint folder")
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype="float32").eval()
    processor = AutoProcessor.from_pretrained(str(folder), trust_remote_code=True)
    return model, processor


@dataclass
class DemoSample:
    """A synthetic image (or clip) with its question and the answer that follows from what was drawn."""

    image: Any  # a clip: its last frame
    question: str
    expected: str | None
    task: str
    label: str
    video: Any = None  # a clip: its frames (PIL images)


def demo_video_frames(path: str | os.PathLike = DEMO_MODEL_DIR) -> int:
    """Frames per clip the demo model learnt its video question on (``demo_model.json``; 4)."""
    return _clip_frames(demo_record(path))


def _clip_frames(record: dict[str, Any]) -> int:
    return int(record.get("video", {}).get("frames", 4))


def demo_video_samples(seed: int = 0, count: int = 3, path: str | os.PathLike = DEMO_MODEL_DIR
                       ) -> list[DemoSample]:
    """``count`` seeded synthetic clips of the video task the demo model learnt (``first-colour``: frames of one
    background where a shape appears, then a second one of another colour joins it; "Which colour appears first?"),
    drawn like its training clips."""
    from ..training.synthetic_vqa import make_sample

    record = demo_record(path)  # read once: the tile size and the frames per clip
    size = int(record.get("model", {}).get("tile", 112))
    frames = _clip_frames(record)
    samples = []
    for index in range(count):
        rng = random.Random(f"internvlx-demo-video:{seed}:{index}")
        sample = make_sample("first-colour", rng, size, size, image_size=size, video_frames=frames)
        samples.append(DemoSample(sample.image, sample.question, sample.answer, sample.task,
                                  f"synthetic clip of {frames} frames", video=sample.frames))
    return samples


def demo_samples(seed: int = 0, image_size: int | None = None, path: str | os.PathLike = DEMO_MODEL_DIR
                 ) -> list[DemoSample]:
    """One seeded synthetic image per task (colour, shape, position, count, fine), drawn like the training data.

    ``image_size`` defaults to the demo model's tile size (from ``demo_model.json``; 112).
    """
    from ..training.synthetic_vqa import TASKS, make_sample

    record = demo_record(path)
    if image_size is None:
        image_size = int(record.get("model", {}).get("tile", 112))
    fine = record.get("data", {})
    samples = []
    for task in TASKS:
        rng = random.Random(f"internvlx-demo:{seed}:{task}")
        sample = make_sample(task, rng, image_size, image_size, image_size=image_size,
                             fine_grid=int(fine.get("fine_grid", 8)), fine_glyphs=int(fine.get("fine_glyphs", 8)))
        samples.append(DemoSample(sample.image, sample.question, sample.answer, task, f"synthetic {task}"))
    return samples


@dataclass
class Answer:
    """A greedy answer and what it cost: tiles, tokens per LLM layer group, seconds."""

    answer: str
    tiles: int
    tile_grid: tuple[int, int]
    visual_tokens: int  # <IMG_CONTEXT> tokens in the prompt (what layers before LVTC's k see)
    layer_tokens: list[tuple[str, int]] = field(default_factory=list)  # ("layers 0-4", tokens), ...
    seconds: float = 0.0


def tile_grids(processor, width: int, height: int) -> dict[str, tuple[int, int, int]]:
    """``{mode: (cols, rows, tiles incl. thumbnail)}`` for the RVTC tiling modes under the processor's settings."""
    from ..token_budget import TilingSettings, image_budget

    settings = TilingSettings.from_processor(processor)
    budgets = {mode: image_budget(width, height, mode, settings) for mode in TILING_MODES}
    return {mode: (*budget.grid, budget.tiles) for mode, budget in budgets.items()}


def answer(model, processor, image, question: str, *, tiling: str | None = None, max_new_tokens: int = 8
           ) -> Answer:
    """Greedy answer to ``question`` about ``image`` (a PIL image), in the chat format the demo model learnt
    (an empty system block, ``<image>`` then the question; it also learnt the template's default system message,
    which clients that send no system turn get)."""
    from .recipe import prompt_messages

    prompt = processor.apply_chat_template(prompt_messages(question), tokenize=False, add_generation_prompt=True)
    kwargs = {"tiling": tiling} if tiling else {}
    inputs = processor(images=[image], text=prompt, return_tensors="pt", **kwargs)
    return _generate(model, processor, inputs, max_new_tokens)


def answer_video(model, processor, video, question: str, *, num_frames: int = 4,
                 bound: tuple[float, float] | None = None, max_new_tokens: int = 8) -> Answer:
    """Greedy answer to ``question`` about ``video``: frames in memory (used as given), a video file or a frame
    folder (``num_frames`` taken at segment centres, inside the optional ``bound`` in seconds; the default, 4, is
    what the demo model learnt, `demo_video_frames`). The prompt is InternVL2's video prompt (``Frame1: <image>``
    per frame, one tile each) after an empty system block, as ``processor(videos=...)`` writes it."""
    from .recipe import prompt_messages

    prompt = processor.apply_chat_template(prompt_messages(question, tag="<video>"), tokenize=False,
                                           add_generation_prompt=True)
    kwargs = {"bound": bound} if bound else {}
    inputs = processor(videos=[video], text=prompt, return_tensors="pt", num_frames=num_frames, **kwargs)
    return _generate(model, processor, inputs, max_new_tokens)


def _generate(model, processor, inputs, max_new_tokens: int) -> Answer:
    import torch

    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"], num_patches=inputs["num_patches"],
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=processor.tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    tiles = sum(int(n) for n in inputs["num_patches"])
    grid = tuple(int(v) for v in inputs["tile_grid"][0]) if "tile_grid" in inputs else (1, 1)
    visual = int((inputs["input_ids"] == processor.image_token_id).sum())
    return Answer(text, tiles, grid, visual, layer_groups(model.config, int(inputs["input_ids"].shape[1]), tiles),
                  seconds)


def load_user_image(path: str | os.PathLike):
    """An image file as RGB, with errors that name the file (missing, a folder, not an image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--image {str(path)!r}: no such file; give the path of a PNG/JPEG image")
    if path.is_dir():
        raise ValueError(f"--image {str(path)!r} is a folder; give the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"--image {str(path)!r} is not an image Pillow can read ({type(error).__name__}); give a "
                         "PNG/JPEG/WebP file") from None


def format_grid(grid: tuple[int, int, int]) -> str:
    cols, rows, tiles = grid
    return f"{cols}x{rows}" + (f"+thumbnail={tiles}" if tiles > cols * rows else f"={tiles}")


__all__ = ["DEMO_MODEL_DIR", "TILING_MODES", "Answer", "DemoSample", "answer", "answer_video", "demo_model_dir",
           "demo_record", "demo_samples", "demo_video_frames", "demo_video_samples", "format_grid", "layer_groups",
           "load_demo_model", "load_user_image", "save_demo_model", "tile_grids"]
