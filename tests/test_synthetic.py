"""The synthetic visual-QA generator: determinism, InternVL format, answers that follow from the pixels."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from internvlx_hf.processing import get_tile_grid
from internvlx_hf.training.synthetic_vqa import (
    BASIC_TASKS,
    COLOURS,
    EXTRA_TASKS,
    FRAME_COLOUR,
    GLYPHS,
    INK,
    POSITIONS,
    QUADRANTS,
    TASKS,
    VIDEO_TASKS,
    combine_meta,
    generate_dataset,
    iter_samples,
    make_sample,
)

TILE = 112


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(meta_path: Path) -> tuple[dict, list[dict], Path]:
    meta = json.loads(meta_path.read_text())
    (name, entry), = meta.items()
    records = [json.loads(line) for line in Path(entry["annotation"]).read_text().splitlines()]
    return entry, records, Path(entry["root"])


@pytest.fixture(scope="module")
def mixed_set(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("gen") / "mixed", n=60, seed=3, sizes="mixed", image_size=TILE)


def test_same_seed_gives_byte_identical_files(tmp_path, mixed_set):
    again = generate_dataset(tmp_path / "again", n=60, seed=3, sizes="mixed", image_size=TILE)
    first, second = _tree_digest(mixed_set.parent), _tree_digest(again.parent)
    assert len(first) == 60 + 2  # images + JSONL + meta
    assert {k: v for k, v in first.items() if k != "meta.json"} == {k: v for k, v in second.items() if k != "meta.json"}
    # the meta file differs only by the folder it points at
    assert mixed_set.read_text().replace(str(mixed_set.parent), "DIR") == again.read_text().replace(str(again.parent),
                                                                                                   "DIR")
    other = generate_dataset(tmp_path / "other", n=60, seed=4, sizes="mixed", image_size=TILE)
    differing = [k for k, v in _tree_digest(other.parent).items() if first.get(k) != v]
    assert len(differing) >= 55  # a new seed redraws (nearly) everything


def test_prefix_of_a_dataset_is_the_smaller_dataset():
    long = [(s.question, s.answer, s.image.tobytes()) for _, _, s in iter_samples(10, seed=7, image_size=TILE)]
    short = [(s.question, s.answer, s.image.tobytes()) for _, _, s in iter_samples(4, seed=7, image_size=TILE)]
    assert long[:4] == short


def test_internvl_format(mixed_set):
    entry, records, root = _load(mixed_set)
    assert entry == {"root": str(mixed_set.parent), "annotation": str(mixed_set.parent / "synthetic_vqa.jsonl"),
                     "data_augment": False, "repeat_time": 1, "length": 60}
    assert len(records) == 60
    assert len({r["id"] for r in records}) == 60
    assert [r["task"] for r in records[:10]] == list(TASKS) * 2  # round robin
    for r in records:
        images = r["image"] if isinstance(r["image"], list) else [r["image"]]
        for rel in images:
            with Image.open(root / rel) as im:
                assert im.mode == "RGB" and im.size == (r["width"], r["height"])
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n")
        assert sum(turn["value"].count("<image>") for turn in r["conversations"]) == len(images)
        assert gpt["value"] and " " not in gpt["value"]  # one word or number: exact match is meaningful


def _pixel(image: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    return image.getpixel((int(x), int(y)))


def _read_framed_letter(image: Image.Image) -> str:
    """Find the red frame in the pixels and read the 5x5 letter inside it (no use of the records)."""
    data = image.tobytes()
    red = [i for i in range(image.width * image.height) if tuple(data[3 * i: 3 * i + 3]) == FRAME_COLOUR]
    xs, ys = [i % image.width for i in red], [i // image.width for i in red]
    left, top, right = min(xs), min(ys), max(xs)
    cell = right - left + 1
    scale = max(1, (cell - 2) // 5)
    offset = (cell - 5 * scale) // 2
    bitmap = tuple(
        "".join("#" if sum(image.getpixel((left + offset + bx * scale, top + offset + by * scale))) < 200 else "."
                for bx in range(5))
        for by in range(5)
    )
    matches = [letter for letter, glyph in GLYPHS.items() if glyph == bitmap]
    assert len(matches) == 1, bitmap
    return matches[0]


@pytest.mark.parametrize("options", [dict(), dict(sizes="fixed", max_objects=4, max_count=9, fine_glyphs=10)])
def test_answers_follow_from_the_drawn_image(mixed_set, tmp_path, options):
    meta = generate_dataset(tmp_path / "set", n=60, seed=5, image_size=TILE, **options) if options else mixed_set
    _, records, root = _load(meta)
    seen = set()
    for r in records:
        image = Image.open(root / r["image"]).convert("RGB")
        answer = r["conversations"][1]["value"]
        question = r["conversations"][0]["value"]
        objects = r["objects"]
        seen.add(r["task"])
        if r["task"] == "fine":
            assert _read_framed_letter(image) == answer
            (grid,) = objects
            row, col = grid["frame"]
            assert grid["letters"][row][col] == answer
            continue
        for o in objects:  # every recorded object is where the record says, in its colour
            assert _pixel(image, o["cx"], o["cy"]) == COLOURS[o["colour"]]
        if r["task"] == "count":
            assert answer == str(len(objects))
            continue
        (target,) = [o for o in objects if o["target"]]
        # the question names the target unambiguously: its shape and colour are unique in the image
        assert sum(o["shape"] == target["shape"] for o in objects) == 1
        assert sum(o["colour"] == target["colour"] for o in objects) == 1
        if r["task"] == "colour":
            assert question.endswith(f" {target['shape']}?")
            colour_here = _pixel(image, target["cx"], target["cy"])
            assert answer == next(name for name, rgb in COLOURS.items() if rgb == colour_here)
        elif r["task"] == "shape":
            assert f" {target['colour']} " in question
            assert answer == target["shape"]
        else:
            assert question.endswith(f" {target['colour']} {target['shape']}?")
            col, row = int(target["cx"] * 3 // r["width"]), int(target["cy"] * 3 // r["height"])
            assert answer == POSITIONS[row][col]
    assert seen == set(TASKS)
    if options:  # several objects per image: the question has to pick one
        assert max(len(r["objects"]) for r in records if r["task"] in ("colour", "shape", "position")) > 1


def test_mixed_sizes_cover_aspect_ratios_and_change_the_tiling(mixed_set):
    _, records, _ = _load(mixed_set)
    sizes = [(r["width"], r["height"]) for r in records]
    ratios = {round(w / h, 1) for w, h in sizes}
    assert any(w / h >= 3 for w, h in sizes) and any(h / w >= 2.5 for w, h in sizes)  # banners and tall pages
    assert any(w < TILE and h < TILE for w, h in sizes)  # small images
    assert len(ratios) >= 6

    def tiles(mode):
        grids = [get_tile_grid(w, h, mode, 1, 6, TILE) for w, h in sizes]
        return sum(c * r + (c * r > 1) for c, r in grids)  # + thumbnail

    ratio, area, edge = tiles("ratio"), tiles("area"), tiles("edge")
    assert area < edge < ratio


def test_fixed_sizes_are_single_tiles():
    for _, kind, sample in iter_samples(10, seed=1, image_size=TILE):
        assert (kind, sample.image.size) == ("square", (TILE, TILE))


def test_fine_task_puts_one_letter_per_patch():
    sample = make_sample("fine", random.Random(0), TILE, TILE, image_size=TILE, fine_grid=8, fine_glyphs=4)
    (grid,) = sample.objects
    assert grid["grid"] == [8, 8] and grid["cell"] == 14 and grid["origin"] == [0, 0]
    assert set("".join(grid["letters"])) <= set(list(GLYPHS)[:4])


def _read_dots(image: Image.Image, cell_row: int, cell_col: int, info: dict) -> str:
    """The cell's dots read back from the pixels (the centre pixel of each dot: ink or not)."""
    (dot_w, dot_h), (off_x, off_y), (rows, side) = info["dot"], info["offset"], info["dots_per_cell"]
    pixels = image.load()
    return "".join(
        "1" if pixels[cell_col * info["cell"] + off_x + x * dot_w + dot_w // 2,
                      cell_row * info["cell"] + off_y + y * dot_h + dot_h // 2] == INK else "0"
        for y in range(rows) for x in range(side))


@pytest.mark.parametrize("side, rows, distractors", [(12, 1, False), (12, 1, True), (6, 6, True), (6, 2, False)])
def test_bits_answers_follow_from_the_pixels(side, rows, distractors):
    seen = set()
    for seed in range(12):
        for task in ("bits", "bits-count", "bits-block"):
            sample = make_sample(task, random.Random(seed), TILE, TILE, image_size=TILE, fine_grid=8,
                                 bits_side=side, bits_rows=rows, bits_distractors=distractors)
            (info,) = sample.objects
            block_row, block_col = info["frame"]
            # The framed block is one pixel-shuffle window: even row and column.
            assert block_row % 2 == 0 and block_col % 2 == 0 and info["dots_per_cell"] == [rows, side]
            pixels = sample.image.load()
            x0, y0 = block_col * 14, block_row * 14
            assert pixels[x0, y0] == FRAME_COLOUR and pixels[x0 + 27, y0 + 27] == FRAME_COLOUR
            assert pixels[x0 + 1, y0 + 1] != FRAME_COLOUR and pixels[x0 + 14, y0] == FRAME_COLOUR  # 1 px, 2 cells
            cells = [_read_dots(sample.image, block_row + q // 2, block_col + q % 2, info) for q in range(4)]
            assert cells == info["block_dots"]
            q = QUADRANTS.index(info["quadrant"])
            if task == "bits":
                line = info["row"] - 1
                assert sample.answer == cells[q][line * side:(line + 1) * side]
                assert sample.question.startswith(f"{info['quadrant']} square")
                assert ("row" in sample.question) == (rows > 1)
            elif task == "bits-block":  # the HR-path study's task (experiments/lvtc-hr-path): 4 cells' row
                line = info["row"] - 1
                assert sample.answer == "".join(cells[k][line * side:(line + 1) * side] for k in range(4))
                assert sample.question == ("Read the red box." if rows == 1 else f"Read row {line + 1} of the red box.")
            else:
                assert sample.answer == str(cells[q].count("1"))
            outside = [_read_dots(sample.image, r, c, info) for r in range(8) for c in range(8)
                       if not (0 <= r - block_row < 2 and 0 <= c - block_col < 2)]
            assert any("1" in dots for dots in outside) == distractors
            seen.add((info["quadrant"], sample.answer if task == "bits" else None))
    assert len({quadrant for quadrant, _ in seen}) == 4


def test_bits_task_is_asked_for_by_name_only(tmp_path):
    assert "bits" not in TASKS and "bits-count" not in TASKS
    meta = generate_dataset(tmp_path / "b", n=6, tasks=("bits", "bits-count"), image_size=TILE, fine_grid=8,
                            bits_side=12, bits_rows=1)
    _, records, _ = _load(meta)
    assert [r["task"] for r in records] == ["bits", "bits-count"] * 3
    assert all(set(r["conversations"][1]["value"]) <= set("01") and len(r["conversations"][1]["value"]) == 12
               for r in records if r["task"] == "bits")


def _read_text(image: Image.Image, cell: int) -> tuple[str, int, int]:
    """The letters found in the pixels (no use of the records), cell by cell in reading order, with the row and first
    column of the cells that hold them."""
    scale = max(1, (cell - 2) // 5)
    offset = (cell - 5 * scale) // 2
    pixels = image.load()
    found = []
    for row in range(image.height // cell):
        for col in range(image.width // cell):
            left, top = col * cell + offset, row * cell + offset
            bitmap = tuple("".join("#" if pixels[left + bx * scale, top + by * scale] == INK else "."
                                   for bx in range(5)) for by in range(5))
            if "#" in "".join(bitmap):
                (letter,) = [name for name, glyph in GLYPHS.items() if glyph == bitmap]
                found.append((row, col, letter))
    rows, cols = {r for r, _, _ in found}, [c for _, c, _ in found]
    assert len(rows) == 1 and cols == list(range(cols[0], cols[0] + len(cols)))  # one row, side by side
    data = image.tobytes()
    assert sum(tuple(data[i:i + 3]) == INK for i in range(0, len(data), 3)) == sum(  # and no ink anywhere else
        "".join(GLYPHS[letter]).count("#") * scale * scale for _, _, letter in found)
    return "".join(letter for _, _, letter in found), rows.pop(), cols[0]


@pytest.mark.parametrize("length, glyphs", [(4, 8), (3, 4), (8, 10)])
def test_text_answers_follow_from_the_pixels(length, glyphs):
    starts, rows = set(), set()
    for _, _, sample in iter_samples(40, tasks=("text",), seed=length, image_size=TILE, fine_grid=8,
                                     fine_glyphs=glyphs, text_length=length):
        word, row, start = _read_text(sample.image, 14)
        assert (sample.task, sample.question, sample.answer) == ("text", "What does the text say?", word)
        assert len(word) == length and set(word) <= set(list(GLYPHS)[:glyphs])
        (info,) = sample.objects
        assert (info["word"], info["row"], info["start"], info["cell"]) == (word, row, start, 14)
        starts.add(start)
        rows.add(row)
    # the word moves: it starts in the left and the right half of a 2x2 window, on upper and lower rows of windows
    assert {s % 2 for s in starts} == ({0} if length == 8 else {0, 1}) and {r % 2 for r in rows} == {0, 1}


def test_text_task_is_asked_for_by_name_only(tmp_path):
    assert "text" in EXTRA_TASKS and "text" not in TASKS
    meta = generate_dataset(tmp_path / "t", n=4, tasks=("colour", "text"), image_size=TILE, fine_grid=8,
                            text_length=3)
    _, records, _ = _load(meta)
    assert [r["task"] for r in records] == ["colour", "text"] * 2
    assert all(len(r["conversations"][1]["value"]) == 3 for r in records if r["task"] == "text")


def test_glyphs_are_far_apart():
    for a, b in itertools.combinations(GLYPHS.values(), 2):
        assert sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) >= 5


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(tasks=("colour", "size")), ValueError, "task='size'"),
        (dict(tasks=()), ValueError, "tasks is empty"),
        (dict(sizes="huge"), ValueError, "sizes='huge'"),
        (dict(n=0), ValueError, "n must be a positive integer"),
        (dict(image_size=8), ValueError, "image_size=8"),
        (dict(fine_glyphs=11), ValueError, "fine_glyphs=11"),
        (dict(fine_grid=32), ValueError, "fine_grid 32"),
        (dict(max_count=10), ValueError, "max_count=10"),
        (dict(name="a/b"), ValueError, "name='a/b'"),
        (dict(repeat_time=0), ValueError, "repeat_time must be a positive number"),
        (dict(max_objects=5), ValueError, "max_objects=5"),
        (dict(tasks=("bits",), bits_side=13), ValueError, "bits_side=13 dots do not fit a 14px cell"),
        (dict(tasks=("bits",), bits_rows=0), ValueError, "bits_rows must be a positive integer"),
        (dict(tasks=VIDEO_TASKS, video_frames=1), ValueError, "video_frames must be an integer >= 2"),
        (dict(tasks=("text",), text_length=9, fine_grid=8), ValueError, "text_length=9 letters do not fit a row of 8"),
        (dict(tasks=("text",), text_length=0), ValueError, "text_length must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, words):
    args = dict(n=5, image_size=TILE)
    args.update(kwargs)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        generate_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no half-written temporary folder either


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(out, n=2, image_size=TILE)
    assert (out / "keep.txt").exists()
    meta = generate_dataset(out, n=2, image_size=TILE, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["images", "meta.json", "synthetic_vqa.jsonl"]
    assert meta == out / "meta.json"


def test_task_weights_and_combined_meta(tmp_path):
    basic = generate_dataset(tmp_path / "basic", n=8, tasks=BASIC_TASKS + ("count",), image_size=TILE, name="basic")
    fine = generate_dataset(tmp_path / "fine", n=3, tasks=["fine"], seed=1, image_size=TILE, name="fine",
                            repeat_time=4)
    _, records, _ = _load(basic)
    assert [r["task"] for r in records] == ["colour", "shape", "position", "count", "count"] + \
        ["colour", "shape", "position"]
    combined = combine_meta([basic, fine], tmp_path / "all" / "meta.json")
    meta = json.loads(combined.read_text())
    assert meta == {
        "basic": {"root": str(tmp_path / "basic"), "annotation": str(tmp_path / "basic" / "basic.jsonl"),
                  "data_augment": False, "repeat_time": 1, "length": 8},
        "fine": {"root": str(tmp_path / "fine"), "annotation": str(tmp_path / "fine" / "fine.jsonl"),
                 "data_augment": False, "repeat_time": 4, "length": 3},
    }
    for entry in meta.values():  # every image resolves from the combined file
        for line in Path(entry["annotation"]).read_text().splitlines():
            assert (Path(entry["root"]) / json.loads(line)["image"]).is_file()
    with pytest.raises(ValueError, match="'basic' appears twice"):
        combine_meta([basic, basic], tmp_path / "twice.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        combine_meta([tmp_path / "missing.json"], tmp_path / "x.json")
    assert not (tmp_path / "twice.json").exists() and not (tmp_path / "x.json").exists()


def test_system_message_turn(tmp_path):
    meta = generate_dataset(tmp_path / "sys", n=2, image_size=TILE, system_message="")
    _, records, _ = _load(meta)
    for r in records:
        assert [t["from"] for t in r["conversations"]] == ["system", "human", "gpt"]
        assert r["conversations"][0]["value"] == ""
    with pytest.raises(TypeError, match="system_message must be a string"):
        generate_dataset(tmp_path / "bad", n=2, image_size=TILE, system_message=1)


def test_system_message_choices_are_drawn_per_sample(tmp_path):
    """["", None]: each conversation gets an empty system block or none (the template's default system message),
    drawn from (seed, index), so a shorter set is a prefix of a longer one and the rest of the sample is unchanged."""

    def systems(meta):
        _, records, _ = _load(meta)
        return [r["conversations"][0]["value"] if r["conversations"][0]["from"] == "system" else None
                for r in records], records

    both, records = systems(generate_dataset(tmp_path / "both", n=40, image_size=TILE, system_message=["", None]))
    assert (both.count(""), both.count(None)) == (21, 19)
    prefix, _ = systems(generate_dataset(tmp_path / "prefix", n=10, image_size=TILE, system_message=["", None]))
    assert prefix == both[:10]
    _, plain = systems(generate_dataset(tmp_path / "plain", n=40, image_size=TILE))
    assert [r["conversations"][-2:] for r in records] == [r["conversations"] for r in plain]
    for bad in ([], ["", 1], {"": None}):
        with pytest.raises(TypeError, match="system_message must be a string, None or a non-empty list"):
            generate_dataset(tmp_path / "bad", n=2, image_size=TILE, system_message=bad)
    assert not (tmp_path / "bad").exists()


def _colours_in(image: Image.Image) -> set[str]:
    """The `COLOURS` whose exact value some pixel has (shapes are drawn without anti-aliasing)."""
    present = {rgb for _, rgb in image.getcolors(maxcolors=1 << 16)}
    return {name for name, rgb in COLOURS.items() if rgb in present}


@pytest.mark.parametrize("frames", [2, 4, 6])
def test_first_colour_clips_answer_from_the_order_of_their_frames(tmp_path, frames):
    """A video task: frames of one background; the first shape appears, later a second one joins it. The answer is
    the colour seen first, and the last frame shows both, so a single frame does not tell it."""
    meta = generate_dataset(tmp_path / "clips", n=24, tasks=VIDEO_TASKS, seed=5, image_size=TILE,
                            video_frames=frames, system_message="")
    entry, records, root = _load(meta)
    # InternVL's loaders take every frame of a folder holding no more than max_num_frame
    assert (entry["min_num_frame"], entry["max_num_frame"]) == (frames, frames)
    answers = set()
    for i, record in enumerate(records):
        assert record["video"] == f"videos/{i:06d}" and "image" not in record and record["frames"] == frames
        assert record["conversations"][1] == {"from": "human", "value": "<video>\nWhich colour appears first?"}
        files = sorted((root / record["video"]).iterdir())
        assert [f.name for f in files] == [f"frame_{k}.png" for k in range(1, frames + 1)]
        seen = [_colours_in(Image.open(f).convert("RGB")) for f in files]
        first, second = record["objects"]
        assert seen[-1] == {first["colour"], second["colour"]} and first["colour"] != second["colour"]
        # empty frames, then the first shape alone, then both; the recorded frames are where each appears
        assert seen == [set()] * (first["frame"] - 1) + [{first["colour"]}] * (second["frame"] - first["frame"]) \
            + [{first["colour"], second["colour"]}] * (frames - second["frame"] + 1)
        answer = record["conversations"][2]["value"]
        assert answer == first["colour"] == next(iter(next(s for s in seen if s)))
        answers.add(answer)
    assert len(answers) >= 4  # the answer is not a constant
    # the same clip from make_sample, and an image task still draws one image
    again = next(sample for _, _, sample in iter_samples(1, tasks=VIDEO_TASKS, seed=5, image_size=TILE,
                                                          video_frames=frames))
    assert [f.tobytes() for f in again.frames] == [Image.open(f).convert("RGB").tobytes()
                                                   for f in sorted((root / "videos/000000").iterdir())]
    assert make_sample("colour", random.Random(0), TILE, TILE, image_size=TILE).frames is None


def test_video_rows_train_through_the_video_path(tmp_path):
    """The clips are InternVL video rows: the training reader expands them into their frames, one tile each."""
    from internvlx_hf.data.formats import sample_from_row
    from internvlx_hf.data.videos import VideoSampling, expand_video, read_sample_frames

    meta = generate_dataset(tmp_path / "clips", n=2, tasks=VIDEO_TASKS, seed=1, image_size=TILE, video_frames=4,
                            system_message="")
    entry, records, root = _load(meta)
    sample = sample_from_row(records[0], root=root)
    sample.video_sampling = VideoSampling(entry["min_num_frame"], entry["max_num_frame"])
    expanded = expand_video(sample, read_sample_frames(sample, random.Random(0)))
    assert expanded.max_tiles == 4 and len(expanded.images) == 4
    assert [m["role"] for m in expanded.messages] == ["system", "user", "assistant"]
    assert expanded.messages[1]["content"] == "".join(f"Frame-{k}: <image>\n" for k in range(1, 5)) \
        + "Which colour appears first?"
