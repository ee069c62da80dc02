"""Multi-tile images where the answer sits in some tiles and the others carry little: the data that shows what a
router (InternVL3.5-Flash's, trained by ViCO: `training.vico`) is for. Drawn with PIL from a seed, nothing downloaded.

Each image is a grid of ``cols`` x ``rows`` tiles of ``tile`` pixels, which the processor's ratio tiling cuts back
into exactly those tiles (the meta entry's ``max_dynamic_patch`` is the grid's size): one tile holds the page of the
fine task of `synthetic_vqa` (a grid of small letters, one framed in red: "Which letter is in the red box?"), whose
letters a model reads only at its full tokens per tile; every other tile is filler, ``blank`` (the page's
background), ``flat`` (one light colour) or ``texture`` (faint stripes or checks). Each JSONL row records the grid and
which tiles hold the answer, in the processor's tile order (row by row; the whole-image thumbnail, when the processor
adds one, comes last and is not counted: it shows the page too small to read).

    from internvlx_hf.training.synthetic_tiles import generate_tile_dataset
    meta = generate_tile_dataset("tiles", n=512, tile=112, grid=(2, 1))
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..atomic import staged_folder
from .synthetic_vqa import GLYPHS, _fine_sample

FILLERS = ("blank", "flat", "texture")
QUESTION = "Which letter is in the red box?"


def _filler(rng: random.Random, kind: str, tile: int, background: tuple[int, int, int]) -> Image.Image:
    if kind == "blank":
        return Image.new("RGB", (tile, tile), background)
    if kind == "flat":
        return Image.new("RGB", (tile, tile), tuple(rng.randint(150, 250) for _ in range(3)))
    image = Image.new("RGB", (tile, tile), background)
    draw = ImageDraw.Draw(image)
    shade = tuple(max(0, c - rng.randint(12, 30)) for c in background)
    step = rng.choice((4, 6, 8))
    if rng.random() < 0.5:  # stripes
        for x in range(0, tile, step * 2):
            draw.rectangle([x, 0, x + step - 1, tile - 1], fill=shade)
    else:  # checks
        for y in range(0, tile, step):
            for x in range((y // step) % 2 * step, tile, step * 2):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=shade)
    return image


def make_tile_sample(rng: random.Random, *, tile: int = 448, grid: tuple[int, int] = (2, 2), fine_grid: int = 8,
                     fine_glyphs: int = 8, fillers: tuple[str, ...] = FILLERS) -> dict[str, Any]:
    """One image (``"image"``), its question, answer and what was drawn: ``"tiles"`` with ``grid`` [cols, rows],
    ``answer`` (the tile indices that hold it, row by row) and each tile's ``kind`` (``"page"`` or a filler)."""
    cols, rows = grid
    count = cols * rows
    if count < 2:
        raise ValueError(f"grid={grid} has {count} tile: a router needs tiles that carry little beside the answer's")
    if not 0 < fine_glyphs <= len(GLYPHS):
        raise ValueError(f"fine_glyphs must lie in 1..{len(GLYPHS)}, got {fine_glyphs}")
    bad = [kind for kind in fillers if kind not in FILLERS]
    if bad or not fillers:
        raise ValueError(f"fillers must be some of {FILLERS}, got {fillers}")
    glyphs = list(GLYPHS)[:fine_glyphs]
    page = _fine_sample(rng, tile, tile, tile // fine_grid, glyphs)
    background = page.image.getpixel((0, 0))
    answer = rng.randrange(count)
    image = Image.new("RGB", (cols * tile, rows * tile), background)
    kinds = []
    for index in range(count):
        row, col = divmod(index, cols)
        kind = "page" if index == answer else rng.choice(fillers)
        kinds.append(kind)
        image.paste(page.image if kind == "page" else _filler(rng, kind, tile, background), (col * tile, row * tile))
    return {"image": image, "question": QUESTION, "answer": page.answer,
            "tiles": {"grid": [cols, rows], "answer": [answer], "kinds": kinds, "page": page.objects[0]}}


def generate_tile_dataset(out_dir: str | Path, n: int = 256, *, seed: int = 0, tile: int = 448,
                          grid: tuple[int, int] = (2, 2), fine_grid: int = 8, fine_glyphs: int = 8,
                          fillers: tuple[str, ...] = FILLERS, name: str = "synthetic_tiles",
                          system_message: str | None = "", overwrite: bool = False) -> Path:
    """Write ``n`` samples (PNG images, an InternVL JSONL, a meta JSON with ``max_dynamic_patch`` the grid's size)
    into ``out_dir``; returns the meta JSON's path. Deterministic for the same arguments. ``system_message``: as
    `synthetic_vqa.generate_dataset`'s ("" an empty system block, None the template's default)."""
    out_dir = Path(out_dir).absolute()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it or choose another out_dir")
    rng = random.Random(f"internvlx-synthetic-tiles:{seed}")
    with staged_folder(out_dir) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as jsonl:
            for i in range(n):
                sample = make_tile_sample(rng, tile=tile, grid=grid, fine_grid=fine_grid, fine_glyphs=fine_glyphs,
                                          fillers=fillers)
                path = f"images/{i:06d}.png"
                sample["image"].save(tmp / path, format="PNG")
                conversations = [{"from": "human", "value": "<image>\n" + sample["question"]},
                                 {"from": "gpt", "value": sample["answer"]}]
                if system_message is not None:
                    conversations.insert(0, {"from": "system", "value": system_message})
                record = {"id": f"{name}-{i:06d}", "image": path, "conversations": conversations,
                          "task": "tiles", "width": sample["image"].width, "height": sample["image"].height,
                          "tiles": sample["tiles"]}
                jsonl.write(json.dumps(record) + "\n")
        meta = {name: {"root": str(out_dir), "annotation": str(out_dir / f"{name}.jsonl"), "data_augment": False,
                       "repeat_time": 1, "length": n, "max_dynamic_patch": grid[0] * grid[1]}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir / "meta.json"


__all__ = ["FILLERS", "QUESTION", "generate_tile_dataset", "make_tile_sample"]
