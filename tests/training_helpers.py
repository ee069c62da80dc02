"""Shared pieces of the training tests: converted fixture checkpoints, drawn images, JSONL data, Trainer settings."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from conftest import require_fixture

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 200, 30)}

_CACHE_DIR: Path | None = None
_CONVERTED: dict[tuple, Path] = {}


def converted(fixture: str, **options) -> Path:
    """A golden fixture converted with `internvlx convert` options, once per test session (never modified)."""
    global _CACHE_DIR
    key = (fixture, tuple(sorted(options.items())))
    if key not in _CONVERTED:
        from internvlx_hf.conversion import convert

        if _CACHE_DIR is None:
            _CACHE_DIR = Path(tempfile.mkdtemp(prefix="internvlx-training-tests-"))
            atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
        dst = _CACHE_DIR / f"{fixture}-{len(_CONVERTED)}"
        convert(require_fixture(fixture), dst, progress=False, **options)
        _CONVERTED[key] = dst
    return _CONVERTED[key]


def load(folder: Path):
    """(model, processor) of a checkpoint folder, through the installed package."""
    from internvlx_hf import InternVLXForConditionalGeneration, InternVLXProcessor

    # trust_remote_code: a converted tokenizer may come with its own code (tokenization_internvlx.py)
    return (InternVLXForConditionalGeneration.from_pretrained(folder),
            InternVLXProcessor.from_pretrained(folder, trust_remote_code=True))


def draw(path: Path, colour: str, size: tuple[int, int] = (64, 64)) -> Path:
    """A white image with a coloured square in it (PNG)."""
    image = Image.new("RGB", size, (255, 255, 255))
    side = min(size) // 2
    ImageDraw.Draw(image).rectangle([side // 2, side // 2, side // 2 + side, side // 2 + side], fill=COLOURS[colour])
    image.save(path)
    return path


def colour_rows(folder: Path, count: int, size: tuple[int, int] = (64, 64)) -> list[dict]:
    """InternVL JSONL rows "What colour is the square?" -> "It is <colour>." with their images drawn in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        draw(folder / f"square{index}.png", colour, size)
        rows.append({"id": index, "image": f"square{index}.png", "conversations": [
            {"from": "human", "value": "What colour is the square?"},
            {"from": "gpt", "value": f"It is {colour}."},
        ]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSONL (strings are written as they are: bad lines for the error tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def training_args(output_dir: Path, **overrides):
    """TrainingArguments for fast deterministic CPU runs."""
    from transformers import TrainingArguments

    values = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                  save_strategy="no", logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                  max_steps=3, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
