"""Synthetic visual question answering: seeded images + InternVL-format JSONL for training and benchmarks.

Nothing is downloaded: every image is drawn with PIL from a seed, and every answer follows from what was drawn,
so a model that learns the data can be scored by exact match. Five tasks, each with one fixed question wording
and a one-word answer:

- ``colour``: "What colour is the circle?" -> ``red`` (one of `COLOURS`).
- ``shape``: "What shape is the red one?" -> ``circle`` (one of `SHAPES`).
- ``position``: "Where is the red circle?" -> the cell of a 3x3 grid it sits in (``top-left`` ... ``bottom-right``).
- ``count``: "How many shapes?" -> ``1`` ... ``max_count``.
- ``fine``: a page of 5x5-pixel letters (scaled by an integer), one per square cell of ``image_size // fine_grid``
  pixels, one cell framed in red: "Which letter is in the red box?" -> ``E``.
- ``bits``, ``bits-block``, ``bits-count`` (only when asked for, see `EXTRA_TASKS`): every cell holds ``bits_rows``
  x ``bits_side`` random dark or light dots (``bits_rows=1``: a barcode of ``bits_side`` bars), one 2x2 block of
  cells (aligned with the 2x2 pixel-shuffle windows) framed in red. ``bits``: "top-left square, row 3?" ->
  ``010110`` (1 = dark; the row is left out for barcodes); ``bits-block``: "Read the red box." -> that row of all
  four cells, top-left to bottom-right; ``bits-count``: "Dark dots in the top-left square?" -> ``17``. The first
  two need the exact dots, and a 2x2-merged token must carry those of all four cells through the projector's output
  width, a per-patch token those of one; a count fits either.

- ``text`` (only when asked for, see `EXTRA_TASKS`): a word of ``text_length`` letters of the fine task, one per
  cell, side by side on one row of an otherwise empty page: "What does the text say?" -> ``HEXO``. Small text, read
  whole and in order.

- ``first-colour`` (a video task, see `VIDEO_TASKS`): ``video_frames`` frames of one background; frames before a
  point in time are empty, then one shape appears and stays, and in a later frame a second shape of another colour
  joins it: "Which colour appears first?" -> the first shape's colour. The last frame shows both shapes, so only the
  order of the frames tells the answer. Its rows are InternVL video rows over a folder of frames
  (``"video": "videos/000000"``).

The colour, shape and position tasks draw ``1..max_objects`` objects of distinct shapes and colours (the default,
one object, is what every tiny model of the learnability benchmark learns within its budget).

**Why the fine task needs resolution.** With ``fine_grid = image_size / patch_size`` every letter fills one ViT
patch. At 1024 tokens per tile (downsample 1.0) each letter has its own token: the LLM finds the framed token by
attention and reads its letter through the projector's weights, which are shared by all positions. At 256 tokens
(a 2x2 pixel shuffle) one token carries four letters in four channel blocks, and the projector needs separate
weights per block plus a conjunction (which block is framed, which letter is in it). From a small set of fine
samples a 256-token model memorises the training pages instead (its held-out accuracy stays near chance), while a
1024-token model generalises. See docs/benchmarks-learnability.md (the learnability benchmark) for the measured numbers.

**Why the text task needs resolution, differently.** Nothing points at one cell: every letter of the word is asked
for, in order. At 1024 tokens the word is ``text_length`` consecutive tokens of one letter each, read one after the
other. At 256 two (or, across rows of windows, up to four) letters share a token, so the answer has to be unpacked
from one token's channel blocks in reading order, for a word that may start in the left or the right half of a window.

``sizes="fixed"`` draws ``image_size`` squares (one tile); ``sizes="mixed"`` draws small images, banners, wide
images and tall pages (see `MIXED_SIZES`), so the tile grid depends on the tiling mode (RVTC).

Tasks are drawn round-robin from ``tasks``; naming a task twice draws it twice as often. Datasets written by
`generate_dataset` can be joined into one InternVL meta file with `combine_meta` (e.g. a basic set and a small
fine set with ``repeat_time`` > 1).

Files are deterministic: the same arguments give byte-identical images and JSONL (with the same Pillow and zlib)
wherever they are written; the meta JSON holds the folder's absolute path. Each JSONL line also carries what was
drawn (``task``, ``width``, ``height``, ``objects``), from which the answer can be re-derived; InternVL's loader
ignores these keys.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, ImageDraw

from ..atomic import atomic_file, staged_folder

TASKS = ("colour", "shape", "position", "count", "fine")
BASIC_TASKS = ("colour", "shape", "position", "count")
# Tasks that are drawn only when asked for by name (never part of the default `TASKS` mixture).
EXTRA_TASKS = ("bits", "bits-count", "bits-block", "text")
BITS_TASKS = ("bits", "bits-count", "bits-block")
# Tasks over several frames, written as InternVL video rows (a folder of frames per row); only when asked for.
VIDEO_TASKS = ("first-colour",)
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = (
    ("top-left", "top", "top-right"),
    ("left", "centre", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)

# 5x5 bitmaps of the fine task's letters ('#' = ink), most distinct first: no two of the first eight differ in
# fewer than 7 pixels (all ten: 5).
GLYPHS: dict[str, tuple[str, ...]] = {
    "A": ("..#..", ".#.#.", "#...#", "#####", "#...#"),
    "E": ("#####", "#....", "####.", "#....", "#####"),
    "H": ("#...#", "#...#", "#####", "#...#", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#####"),
    "O": (".###.", "#...#", "#...#", "#...#", ".###."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "Z": ("#####", "...#.", "..#..", ".#...", "#####"),
    "C": (".####", "#....", "#....", "#....", ".####"),
    "U": ("#...#", "#...#", "#...#", "#...#", ".###."),
}
FRAME_COLOUR = (230, 0, 0)
INK = (20, 20, 20)

# Mixed-size set: (width, height) in units of `image_size`, with the share of images of each kind. Small and
# banner-like images are where InternVL2's ratio matching spends many tiles and RVTC's area/edge caps spend few.
MIXED_SIZES: tuple[tuple[str, float, float, float], ...] = (
    ("square", 1.0, 1.0, 0.2),
    ("small", 0.5, 0.5, 0.15),
    ("small-banner", 0.75, 0.25, 0.15),
    ("banner", 4.0, 1.0, 0.1),
    ("wide", 2.0, 1.0, 0.1),
    ("page", 1.5, 2.0, 0.1),
    ("tall-page", 1.0, 3.0, 0.1),
    ("small-tall", 0.4, 1.2, 0.1),
)


@dataclass
class Sample:
    """One drawn image with its question, exact answer and the records the answer follows from."""

    image: Image.Image  # a video task's last frame
    task: str
    question: str
    answer: str
    objects: list[dict[str, Any]] = field(default_factory=list)
    frames: list[Image.Image] | None = None  # a video task's frames, in order

    def record(self, sample_id: str, image_path: str) -> dict[str, Any]:
        """The InternVL-format JSONL record (plus ``task``, ``width``, ``height``, ``objects``); for a video task
        ``image_path`` is the folder of its frames, written as ``"video"`` with a ``<video>`` tag."""
        tag, key = ("<video>", "video") if self.frames is not None else ("<image>", "image")
        record = {
            "id": sample_id,
            key: image_path,
            "conversations": [
                {"from": "human", "value": f"{tag}\n" + self.question},
                {"from": "gpt", "value": self.answer},
            ],
            "task": self.task,
            "width": self.image.width,
            "height": self.image.height,
            "objects": self.objects,
        }
        if self.frames is not None:
            record["frames"] = len(self.frames)
        return record


def _check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _background(rng: random.Random) -> tuple[int, int, int]:
    # Light, slightly tinted backgrounds: every object colour and the ink stay far from them.
    return tuple(rng.randint(228, 255) for _ in range(3))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=colour)
    elif shape == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")


def _place_objects(rng: random.Random, width: int, height: int, count: int) -> list[dict[str, Any]]:
    """``count`` objects in distinct cells of a 3x3 grid, distinct (shape, colour) pairs, centred with jitter."""
    cells = rng.sample(range(9), count)
    cell_w, cell_h = width / 3, height / 3
    objects = []
    used = set()
    for cell in cells:
        row, col = divmod(cell, 3)
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if (shape, colour) not in used:
                used.add((shape, colour))
                break
        radius = min(cell_w, cell_h) * rng.uniform(0.34, 0.45)
        cx = (col + 0.5) * cell_w + rng.uniform(-0.05, 0.05) * cell_w
        cy = (row + 0.5) * cell_h + rng.uniform(-0.05, 0.05) * cell_h
        objects.append({"shape": shape, "colour": colour, "cx": round(cx, 2), "cy": round(cy, 2),
                        "r": round(radius, 2), "row": row, "col": col, "position": POSITIONS[row][col]})
    return objects


def _distinct_objects(rng: random.Random, width: int, height: int, count: int) -> list[dict[str, Any]]:
    """Objects whose shapes and colours are all different, so "the circle" / "the red one" are unambiguous."""
    while True:
        objects = _place_objects(rng, width, height, count)
        if len({o["shape"] for o in objects}) == count and len({o["colour"] for o in objects}) == count:
            return objects


def _shapes_image(rng: random.Random, width: int, height: int, objects: list[dict[str, Any]]) -> Image.Image:
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw_shape(draw, o["shape"], o["cx"], o["cy"], o["r"], COLOURS[o["colour"]])
    return image


def _draw_glyph(draw: ImageDraw.ImageDraw, letter: str, left: int, top: int, scale: int) -> None:
    for by, line in enumerate(GLYPHS[letter]):
        for bx, ink in enumerate(line):
            if ink == "#":
                draw.rectangle([left + bx * scale, top + by * scale, left + (bx + 1) * scale - 1,
                                top + (by + 1) * scale - 1], fill=INK)


def _text_sample(rng: random.Random, width: int, height: int, cell: int, glyphs: Sequence[str],
                 length: int) -> Sample:
    """A word of ``length`` letters, one per ``cell`` x ``cell`` square, side by side on one row of the grid (at a
    random row and starting column); every other square is empty."""
    cols, rows = max(length, width // cell), max(2, height // cell)
    width, height = max(width, cols * cell), max(height, rows * cell)
    x0, y0 = (width - cols * cell) // 2, (height - rows * cell) // 2
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    scale = max(1, (cell - 2) // 5)
    offset = (cell - 5 * scale) // 2
    word = "".join(rng.choice(glyphs) for _ in range(length))
    row, start = rng.randrange(rows), rng.randrange(cols - length + 1)
    for i, letter in enumerate(word):
        _draw_glyph(draw, letter, x0 + (start + i) * cell + offset, y0 + row * cell + offset, scale)
    objects = [{"grid": [cols, rows], "origin": [x0, y0], "cell": cell, "scale": scale, "offset": offset,
                "word": word, "row": row, "start": start}]
    return Sample(image, "text", "What does the text say?", word, objects)


def _fine_sample(rng: random.Random, width: int, height: int, cell: int, glyphs: Sequence[str]) -> Sample:
    """A grid of letters, one per ``cell`` x ``cell`` square, with one square framed in red."""
    cols, rows = max(2, width // cell), max(2, height // cell)
    width, height = max(width, cols * cell), max(height, rows * cell)
    x0, y0 = (width - cols * cell) // 2, (height - rows * cell) // 2
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    scale = max(1, (cell - 2) // 5)  # 5x5 bitmap, at least a one-pixel margin for the frame
    offset = (cell - 5 * scale) // 2
    letters = [[rng.choice(glyphs) for _ in range(cols)] for _ in range(rows)]
    for r in range(rows):
        for c in range(cols):
            _draw_glyph(draw, letters[r][c], x0 + c * cell + offset, y0 + r * cell + offset, scale)
    row, col = rng.randrange(rows), rng.randrange(cols)
    fx, fy = x0 + col * cell, y0 + row * cell
    draw.rectangle([fx, fy, fx + cell - 1, fy + cell - 1], outline=FRAME_COLOUR, width=1)
    objects = [{"grid": [cols, rows], "origin": [x0, y0], "cell": cell, "scale": scale, "offset": offset,
                "letters": ["".join(line) for line in letters], "frame": [row, col]}]
    return Sample(image, "fine", "Which letter is in the red box?", letters[row][col], objects)


def _bits_sample(rng: random.Random, width: int, height: int, cell: int, side: int, rows: int,
                 distractors: bool, task: str = "bits") -> Sample:
    """Random dark/light dots (``rows`` x ``side`` per cell; ``rows=1``: a barcode of ``side`` bars) in every cell
    (``distractors``) or only in the framed block, one 2x2 block of cells at even (row, col) framed in red; ``task``
    (see the module docstring) decides what is asked."""
    cols, grid_rows = max(2, width // cell), max(2, height // cell)
    width, height = max(width, cols * cell), max(height, grid_rows * cell)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    # At least a one-pixel margin per cell, where the frame is drawn.
    dot_w, dot_h = (cell - 2) // side, (cell - 2) // rows
    off_x, off_y = (cell - side * dot_w) // 2, (cell - rows * dot_h) // 2
    dots = [[[[rng.random() < 0.5 for _ in range(side)] for _ in range(rows)] for _ in range(cols)]
            for _ in range(grid_rows)]
    # The framed block is one 2x2 pixel-shuffle window: its four cells share one token at downsample 0.5.
    block_row, block_col = 2 * rng.randrange(grid_rows // 2), 2 * rng.randrange(cols // 2)
    for r in range(grid_rows):
        for c in range(cols):
            if not distractors and not (0 <= r - block_row < 2 and 0 <= c - block_col < 2):
                continue
            for y in range(rows):
                for x in range(side):
                    if dots[r][c][y][x]:
                        left, top = c * cell + off_x + x * dot_w, r * cell + off_y + y * dot_h
                        draw.rectangle([left, top, left + dot_w - 1, top + dot_h - 1], fill=INK)
    fx, fy = block_col * cell, block_row * cell
    draw.rectangle([fx, fy, fx + 2 * cell - 1, fy + 2 * cell - 1], outline=FRAME_COLOUR, width=1)
    quadrant, line = rng.randrange(4), rng.randrange(rows)
    r, c = block_row + quadrant // 2, block_col + quadrant % 2
    if task == "bits-count":  # one number per cell: what a 2x2-merged token has room for
        answer = str(sum(d for row in dots[r][c] for d in row))
        question = f"Dark dots in the {QUADRANTS[quadrant]} square?"
    elif task == "bits-block":  # row `line` of all four cells, top-left to bottom-right
        answer = "".join("1" if d else "0" for q in range(4)
                         for d in dots[block_row + q // 2][block_col + q % 2][line])
        question = "Read the red box." if rows == 1 else f"Read row {line + 1} of the red box."
    else:
        answer = "".join("1" if d else "0" for d in dots[r][c][line])
        question = f"{QUADRANTS[quadrant]} square?" if rows == 1 else \
            f"{QUADRANTS[quadrant]} square, row {line + 1}?"
    objects = [{"grid": [cols, grid_rows], "cell": cell, "dot": [dot_w, dot_h], "offset": [off_x, off_y],
                "dots_per_cell": [rows, side], "frame": [block_row, block_col], "quadrant": QUADRANTS[quadrant],
                "row": line + 1,
                "block_dots": ["".join("1" if d else "0" for line in dots[block_row + q // 2][block_col + q % 2]
                                       for d in line) for q in range(4)]}]
    return Sample(image, task, question, answer, objects)


def make_sample(task: str, rng: random.Random, width: int, height: int, *, image_size: int = 448,
                fine_grid: int = 8, fine_glyphs: int = 8, max_count: int = 6, max_objects: int = 1,
                bits_side: int = 6, bits_rows: int | None = None,
                bits_distractors: bool = True, video_frames: int = 4, text_length: int = 4) -> Sample:
    """Draw one sample of ``task`` on a ``width`` x ``height`` canvas.

    Args:
        task: one of `TASKS`.
        rng: the random source (a `random.Random`); the sample is a pure function of its state.
        width, height: image size in pixels (the fine task may round it up to whole cells, at least 2x2).
        image_size: the model's tile size; the fine task's cells are ``image_size // fine_grid`` pixels wide.
        fine_grid: letter cells per tile side (``image_size / patch_size`` puts one letter in each ViT patch).
        fine_glyphs: how many letters of `GLYPHS` the fine task draws from (2..10).
        max_count: the count task draws 1..max_count objects (at most 9: one per cell of a 3x3 grid).
        max_objects: the colour, shape and position tasks draw 1..max_objects objects of distinct shapes and
            colours (at most ``len(SHAPES)``) and ask about one of them.
        bits_side: the bits task's dots per row of a cell (its cells are those of the fine task).
        bits_rows: the bits task's rows of dots per cell (None: ``bits_side``, square dots; 1: a barcode).
        bits_distractors: the bits task draws dots in every cell (True) or only in the framed block.
        video_frames: the frames of a video task (`VIDEO_TASKS`), at least 2.
        text_length: the letters of the text task's word (its cells are those of the fine task; at most
            ``fine_grid``).
    """
    _check_options(1, task, "fixed", image_size, fine_grid, fine_glyphs, max_count, max_objects, bits_side,
                   bits_rows, video_frames, text_length)
    if task == "first-colour":
        return _first_colour_sample(rng, width, height, video_frames)
    if task == "text":
        return _text_sample(rng, width, height, image_size // fine_grid, list(GLYPHS)[:fine_glyphs], text_length)
    if task in BITS_TASKS:
        return _bits_sample(rng, width, height, image_size // fine_grid, bits_side,
                            bits_side if bits_rows is None else bits_rows, bits_distractors, task)
    if task == "fine":
        return _fine_sample(rng, width, height, image_size // fine_grid, list(GLYPHS)[:fine_glyphs])
    if task == "count":
        objects = _place_objects(rng, width, height, rng.randint(1, max_count))
        return Sample(_shapes_image(rng, width, height, objects), task, "How many shapes?", str(len(objects)),
                      objects)
    objects = _distinct_objects(rng, width, height, rng.randint(1, max_objects))
    target = rng.choice(objects)
    for o in objects:
        o["target"] = o is target
    image = _shapes_image(rng, width, height, objects)
    if task == "colour":
        return Sample(image, task, f"What colour is the {target['shape']}?", target["colour"], objects)
    if task == "shape":
        return Sample(image, task, f"What shape is the {target['colour']} one?", target["shape"], objects)
    return Sample(image, task, f"Where is the {target['colour']} {target['shape']}?", target["position"], objects)


def _first_colour_sample(rng: random.Random, width: int, height: int, frames: int) -> Sample:
    first, second = _distinct_objects(rng, width, height, 2)
    appears = rng.randrange(frames - 1)  # the first shape is seen from this frame on: never in the last one only
    joins = rng.randrange(appears + 1, frames)  # the second from this one, so the last frame always shows both
    background = _background(rng)
    drawn = []
    for index in range(frames):
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for o, start in ((first, appears), (second, joins)):
            if index >= start:
                _draw_shape(draw, o["shape"], o["cx"], o["cy"], o["r"], COLOURS[o["colour"]])
        drawn.append(image)
    first["frame"], second["frame"] = appears + 1, joins + 1  # 1-based, as the prompt's FrameN lines count
    return Sample(drawn[-1], "first-colour", "Which colour appears first?", first["colour"], [first, second],
                  frames=drawn)


def _image_size_for(rng: random.Random, sizes: str, image_size: int) -> tuple[int, int, str]:
    if sizes == "fixed":
        return image_size, image_size, "square"
    weights = [w for *_, w in MIXED_SIZES]
    kind, fw, fh, _ = rng.choices(MIXED_SIZES, weights=weights)[0]
    jitter = rng.uniform(0.85, 1.15)
    return max(16, round(fw * image_size * jitter)), max(16, round(fh * image_size * jitter)), kind


def _check_options(n, tasks, sizes, image_size, fine_grid, fine_glyphs, max_count, max_objects,
                   bits_side=6, bits_rows=None, video_frames=4, text_length=4) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks:
        raise ValueError("tasks is empty; pass some of " + ", ".join(TASKS))
    for task in tasks:
        _check_choice("task", task, TASKS + EXTRA_TASKS + VIDEO_TASKS)
    if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 2:
        raise ValueError(f"video_frames must be an integer >= 2 (a shape appears, then another), got {video_frames!r}")
    _check_choice("sizes", sizes, ("fixed", "mixed"))
    for key, value in (("n", n), ("image_size", image_size), ("fine_grid", fine_grid),
                       ("fine_glyphs", fine_glyphs), ("max_count", max_count),
                       ("max_objects", max_objects), ("bits_side", bits_side),
                       ("bits_rows", bits_side if bits_rows is None else bits_rows), ("text_length", text_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw on (>= 16)")
    if not 2 <= fine_glyphs <= len(GLYPHS):
        raise ValueError(f"fine_glyphs={fine_glyphs} must lie in [2, {len(GLYPHS)}]")
    if image_size // fine_grid < 7:
        raise ValueError(f"image_size {image_size} / fine_grid {fine_grid} gives {image_size // fine_grid}px cells; "
                         "a 5x5 letter with its frame needs at least 7px: lower fine_grid or raise image_size")
    for key, value in (("bits_side", bits_side), ("bits_rows", bits_rows)):
        if set(BITS_TASKS) & set(tasks) and value is not None and (image_size // fine_grid - 2) // value < 1:
            raise ValueError(f"{key}={value} dots do not fit a {image_size // fine_grid}px cell with its one-pixel "
                             f"margin; use at most {image_size // fine_grid - 2}")
    if "text" in tasks and text_length > fine_grid:
        raise ValueError(f"text_length={text_length} letters do not fit a row of {fine_grid} cells (fine_grid); "
                         f"use at most {fine_grid}")
    if max_count > 9:
        raise ValueError(f"max_count={max_count} must lie in [1, 9] (one object per cell of a 3x3 grid)")
    if max_objects > len(SHAPES):
        raise ValueError(f"max_objects={max_objects} must lie in [1, {len(SHAPES)}] (objects of distinct shapes)")
    return tasks


def iter_samples(n: int, *, tasks: Sequence[str] = TASKS, seed: int = 0, sizes: str = "fixed",
                 image_size: int = 448, fine_grid: int = 8, fine_glyphs: int = 8, max_count: int = 6,
                 max_objects: int = 1, bits_side: int = 6, bits_rows: int | None = None,
                 bits_distractors: bool = True, video_frames: int = 4, text_length: int = 4):
    """Iterate over ``(index, size_kind, Sample)`` for ``n`` samples, tasks in round-robin order.

    Sample ``i`` depends only on ``(seed, i)`` and the options, so any prefix of a dataset is the same dataset.
    The options are checked when this is called, before anything is drawn.
    """
    tasks = _check_options(n, tasks, sizes, image_size, fine_grid, fine_glyphs, max_count, max_objects, bits_side,
                           bits_rows, video_frames, text_length)
    options = dict(image_size=image_size, fine_grid=fine_grid, fine_glyphs=fine_glyphs, max_count=max_count,
                   max_objects=max_objects, bits_side=bits_side, bits_rows=bits_rows,
                   bits_distractors=bits_distractors, video_frames=video_frames, text_length=text_length)
    return _samples(n, tasks, seed, sizes, options)


def _samples(n, tasks, seed, sizes, options):
    for i in range(n):
        rng = random.Random(f"internvlx-synthetic:{seed}:{i}")
        width, height, kind = _image_size_for(rng, sizes, options["image_size"])
        yield i, kind, make_sample(tasks[i % len(tasks)], rng, width, height, **options)


def generate_dataset(out_dir: str | os.PathLike, n: int = 1000, *, tasks: Sequence[str] = TASKS, seed: int = 0,
                     sizes: str = "fixed", image_size: int = 448, fine_grid: int = 8, fine_glyphs: int = 8,
                     max_count: int = 6, max_objects: int = 1, bits_side: int = 6, bits_rows: int | None = None,
                     bits_distractors: bool = True, video_frames: int = 4, text_length: int = 4,
                     name: str = "synthetic_vqa",
                     repeat_time: float = 1, system_message: str | None | Sequence[str | None] = None,
                     overwrite: bool = False) -> Path:
    """Write ``n`` samples as PNG images + an InternVL-format JSONL + a meta JSON into ``out_dir``.

    Layout: ``out_dir/images/000000.png ...``, ``out_dir/{name}.jsonl`` (one record per line:
    ``{"id", "image": "images/000000.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": ...}], "task", "width", "height", "objects"}``, image paths relative to ``out_dir``)
    and ``out_dir/meta.json`` (``{name: {"root", "annotation", "data_augment": false, "repeat_time", "length"}}``
    with absolute ``root`` and ``annotation``: InternVL's scripts resolve relative ones against the current
    directory, so absolute paths are the only ones every loader reads the same way). The images and the JSONL are
    byte-identical for the same arguments wherever they are written; ``meta.json`` differs only by ``out_dir``.

    Args:
        out_dir: the folder to create; it must not exist (or be empty) unless ``overwrite=True``.
        n: number of samples; sample ``i`` is of task ``tasks[i % len(tasks)]``.
        tasks: which of `TASKS` (or `EXTRA_TASKS`) to draw; a task named twice is drawn twice as often.
        seed: the dataset seed; use different seeds for training and held-out sets.
        sizes: ``"fixed"`` (``image_size`` squares) or ``"mixed"`` (see `MIXED_SIZES`).
        image_size, fine_grid, fine_glyphs, max_count, max_objects, bits_side, bits_rows, bits_distractors,
            video_frames, text_length: see `make_sample`. Video tasks write their frames as
            ``videos/000000/frame_1.png ...`` and the meta entry gets ``min_num_frame = max_num_frame =
            video_frames``, so that InternVL's loaders (and ours) take every frame.
        name: the dataset's key in the meta JSON and the JSONL file name.
        repeat_time: written to the meta JSON: how many times a training loader should repeat this set per epoch.
        system_message: when not None, every conversation starts with ``{"from": "system", "value": ...}``. The
            InternVL2 chat templates otherwise insert their default system prompt (about 150 tokens with a tiny
            byte-level vocabulary), which would dwarf a tiny model's visual tokens; ``""`` keeps the system block
            empty. A list of choices gives each sample one of them, drawn from ``(seed, i)`` (so any prefix of the
            dataset is the same dataset), ``None`` meaning no system turn: ``["", None]`` trains a model both on an
            empty system block and on the template's default system message, i.e. on what a client that sends no
            system turn (lmms-eval's ``huggingface`` model, transformers' ``pipeline``, InternVL2's ``chat()``)
            renders.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        The path of ``meta.json``. The folder is written next to ``out_dir`` under a temporary name and renamed at
        the end, so an error leaves nothing half-written.
    """
    out_dir = Path(out_dir).absolute()
    if not name or any(ch in name for ch in "/\\") or name.startswith("."):
        raise ValueError(f"name={name!r} must be a plain file name (it becomes {{name}}.jsonl)")
    if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or not repeat_time > 0:
        raise ValueError(f"repeat_time must be a positive number, got {repeat_time!r}")
    system_choices = _system_choices(system_message)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another out_dir")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it or choose another out_dir")
    samples = iter_samples(n, tasks=tasks, seed=seed, sizes=sizes, image_size=image_size, fine_grid=fine_grid,
                           fine_glyphs=fine_glyphs, max_count=max_count, max_objects=max_objects, bits_side=bits_side,
                           bits_rows=bits_rows, bits_distractors=bits_distractors, video_frames=video_frames,
                           text_length=text_length)
    with staged_folder(out_dir) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as jsonl:
            for i, _, sample in samples:
                if sample.frames is not None:
                    rel = f"videos/{i:06d}"
                    (tmp / rel).mkdir(parents=True)
                    for index, frame in enumerate(sample.frames, 1):
                        frame.save(tmp / rel / f"frame_{index}.png", format="PNG")
                else:
                    rel = f"images/{i:06d}.png"
                    sample.image.save(tmp / rel, format="PNG")
                record = sample.record(f"{name}-{i:06d}", rel)
                system = system_choices[0] if len(system_choices) == 1 else \
                    random.Random(f"internvlx-synthetic-system:{seed}:{i}").choice(system_choices)
                if system is not None:
                    record["conversations"].insert(0, {"from": "system", "value": system})
                jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
        meta = {name: {"root": str(out_dir), "annotation": str(out_dir / f"{name}.jsonl"), "data_augment": False,
                       "repeat_time": repeat_time, "length": n}}
        if set(VIDEO_TASKS) & set((tasks,) if isinstance(tasks, str) else tasks):
            meta[name].update(min_num_frame=video_frames, max_num_frame=video_frames)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir / "meta.json"


def _system_choices(system_message) -> list[str | None]:
    if system_message is None or isinstance(system_message, str):
        return [system_message]
    choices = list(system_message) if isinstance(system_message, (list, tuple)) else None
    if not choices or not all(c is None or isinstance(c, str) for c in choices):
        raise TypeError(f"system_message must be a string, None or a non-empty list of them, got {system_message!r}")
    return choices


def combine_meta(meta_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """Join the meta JSON files of several datasets into one InternVL meta file at ``out_path``.

    Relative ``root`` / ``annotation`` entries are made absolute (against each meta file's folder), entries keep
    their ``repeat_time`` and ``length``, and two datasets with the same name are an error.
    """
    out_path = Path(out_path)
    combined: dict[str, Any] = {}
    for meta_path in meta_paths:
        meta_path = Path(meta_path)
        if not meta_path.is_file():
            raise FileNotFoundError(f"meta file {meta_path} not found; pass the meta.json that generate_dataset "
                                    "returned")
        for name, entry in json.loads(meta_path.read_text(encoding="utf-8")).items():
            if name in combined:
                raise ValueError(f"dataset name {name!r} appears twice (again in {meta_path}); generate the sets "
                                 "with different name=")
            entry = dict(entry)
            for key in ("root", "annotation"):
                entry[key] = str((meta_path.parent.absolute() / entry[key]))
            combined[name] = entry
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as tmp:
        tmp.write_text(json.dumps(combined, indent=2) + "\n", encoding="utf-8")
    return out_path


__all__ = ["BASIC_TASKS", "BITS_TASKS", "COLOURS", "EXTRA_TASKS", "GLYPHS", "MIXED_SIZES", "POSITIONS", "SHAPES",
           "TASKS", "VIDEO_TASKS", "Sample", "combine_meta", "generate_dataset", "iter_samples", "make_sample"]
