"""Training data: InternVL meta JSON / JSONL, TRL rows, datasets.Dataset; lazy images, exact lengths, broken rows."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import training_helpers as th
from internvlx_hf.training import (
    IGNORE_INDEX,
    InternVLXDataCollator,
    InternVLXDataset,
    InternVLXTrainer,
    SampleError,
    read_meta,
)
from internvlx_hf.data import sample_from_row


@pytest.fixture(scope="module")
def processor():
    return th.load(th.converted("internvl2_qwen2"))[1]


def _dataset_folder(folder, name, count, size):
    rows = th.colour_rows(folder / name, count, size)
    th.write_jsonl(folder / f"{name}.jsonl", rows)
    return rows


def test_meta_json_repeat_time_and_max_dynamic_patch(processor, tmp_path):
    _dataset_folder(tmp_path, "wide", 4, (200, 100))  # ratio tiling: 2x1 grid + thumbnail = 3 tiles
    _dataset_folder(tmp_path, "capped", 4, (200, 100))
    meta = {
        "wide": {"root": "wide", "annotation": "wide.jsonl", "data_augment": False, "repeat_time": 2},
        "capped": {"root": "capped", "annotation": "capped.jsonl", "data_augment": False, "repeat_time": 0.5,
                   "max_dynamic_patch": 1, "length": 4},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))  # paths relative to the meta file's folder

    dataset = InternVLXDataset(str(tmp_path / "meta.json"), processor, progress=False, check=True)
    assert len(dataset) == 4 * 2 + 2
    wide, capped = dataset.summary.datasets
    assert (wide.name, wide.rows, wide.samples, wide.images, wide.tiles) == ("wide", 4, 8, 8, 24)
    assert (capped.name, capped.rows, capped.samples, capped.images, capped.tiles) == ("capped", 4, 2, 2, 2)
    assert wide.tokens + capped.tokens == sum(dataset.lengths)
    assert wide.files == [str(tmp_path / "wide.jsonl")]
    assert "  wide                            8        8       24" in str(dataset.summary)

    items = [dataset[i] for i in range(len(dataset))]
    assert [item["source"] for item in items[8:]] == [f"{tmp_path / 'capped.jsonl'}:{n}" for n in (1, 2)]
    assert [item["max_tiles"] for item in items] == [None] * 8 + [1, 1]
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for item in items for image in item["images"])
    # The scan's lengths (from image headers) are exactly what the collator builds from decoded pixels.
    collator = InternVLXDataCollator(processor)
    batches = [collator([item]) for item in items]
    assert [batch["input_ids"].shape[1] for batch in batches] == dataset.lengths
    assert [batch["num_patches"].tolist() for batch in batches] == [[3]] * 8 + [[1]] * 2


def test_rows_are_normalised_as_internvl_and_trl_do(tmp_path):
    single = sample_from_row({"image": "a.jpg", "conversations": [
        {"from": "human", "value": "  What is it?\n"}, {"from": "gpt", "value": "A cat. "}]}, root=tmp_path)
    assert single.messages == [{"role": "user", "content": "<image>\nWhat is it?"},
                               {"role": "assistant", "content": "A cat."}]
    assert single.images == [str(tmp_path / "a.jpg")]
    multi = sample_from_row({"image": ["a.jpg", "/abs/b.jpg"], "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"}, {"from": "gpt", "value": "No."}]},
        root=tmp_path)
    assert multi.messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Image-1: <image>\nImage-2: <image>\nSame?"},
                              {"role": "assistant", "content": "No."}]
    assert multi.images == [str(tmp_path / "a.jpg"), "/abs/b.jpg"]
    text = sample_from_row({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]})
    assert text.images == [] and text.messages[0]["content"] == "Hi"
    trl = sample_from_row({"messages": [{"role": "user", "content": "Describe."},
                                        {"role": "assistant", "content": "Red."}], "images": ["x.png", "y.png"]})
    assert trl.messages[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Describe."}]
    with pytest.raises(SampleError, match="turn 'from' must be one of") as error:
        sample_from_row({"conversations": [{"from": "bot", "value": "x"}]})
    assert error.value.reason == "unknown role"


def test_broken_samples_are_skipped_with_file_and_line(processor, tmp_path, caplog):
    th.draw(tmp_path / "good.png", "red")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    pixels = torch.randint(0, 256, (64 * 64 * 3,), generator=torch.Generator().manual_seed(0))
    noisy = Image.frombytes("RGB", (64, 64), bytes(pixels.tolist()))  # noise: PNG cannot compress it away
    noisy.save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # a valid header, half the pixel data

    def row(image, question="What colour?", answer="Red."):
        return {"image": image, "conversations": [{"from": "human", "value": question},
                                                  {"from": "gpt", "value": answer}]}

    path = th.write_jsonl(tmp_path / "bad.jsonl", [
        row("good.png"),
        row("missing.png"),
        row("garbage.png"),
        '{"image": "good.png", "conversations": [',
        row("good.png", question="<image> vs <image>?"),
        {"image": "good.png", "conversations": [{"from": "human", "value": "Hello?"}]},
        row("cut.png"),
        row("good.png", answer="Still red."),
    ])
    caplog.set_level(logging.WARNING)
    dataset = InternVLXDataset(str(path), processor, progress=False, check=True)
    assert len(dataset) == 3  # lines 1, 7 (its header is fine: pixels are not decoded while scanning) and 8
    assert dict(dataset.summary.skipped) == {"image not found": 1, "unreadable image": 1, "invalid JSON": 1,
                                             "image count mismatch": 1, "no assistant reply": 1}
    for line, text in ((2, "missing.png' not found"), (3, "garbage.png' is not a readable image"),
                       (4, "invalid JSON"), (5, "the conversation has 2 <image> tag(s) but 1 image(s)"),
                       (6, "the conversation has no assistant reply to learn from")):
        assert f"{path}:{line}: " in caplog.text and text in caplog.text
    assert "skipped (image not found: 1, " in str(dataset.summary)

    # Line 7 fails when its pixels are decoded: it is skipped and the next sample takes its place.
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["source"] for item in items] == [f"{path}:1", f"{path}:8", f"{path}:8"]
    assert dataset.skipped_at_load == {"undecodable image": 1}
    assert f"skipping {path}:7: image 0 ('{tmp_path / 'cut.png'}')" in caplog.text
    assert dataset[1]["source"] == f"{path}:8"  # remembered: no second attempt
    assert dataset.skipped_at_load == {"undecodable image": 1}


def test_datasets_dataset_rows(processor, tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.open(th.draw(tmp_path / f"{c}.png", c)) for c in ("red", "blue")]
    rows = datasets.Dataset.from_dict({
        "images": [[images[0]], [images[1]]],
        "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": colour}]}]
                     for colour in ("Red.", "Blue.")],
    })
    assert isinstance(rows.features["images"].feature, datasets.Image)
    dataset = InternVLXDataset(rows, processor, progress=False, check=True)
    assert (dataset.summary.samples, dataset.summary.datasets[0].tiles) == (2, 2)
    assert [s.hub_id for s in dataset.sources] == [None]  # built in memory: no Hub id to record
    item = dataset[1]
    assert item["source"] == "dataset[1]" and item["images"][0].size == (64, 64)
    batch = InternVLXDataCollator(processor)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, max(dataset.lengths))
    lazy = InternVLXDataset(rows, processor, progress=False, cache_dir=tmp_path / "cache")  # the default: lazy
    assert lazy[1]["source"] == "dataset[1]" and lazy[1]["images"][0].size == (64, 64)
    assert lazy.lengths == dataset.lengths and lazy.lengths_origin == ["built"]  # cached by the dataset's fingerprint
    assert InternVLXDataset(rows, processor, progress=False, cache_dir=tmp_path / "cache").lengths_origin is None
    again = InternVLXDataset(rows, processor, progress=False, cache_dir=tmp_path / "cache")
    assert again.lengths == dataset.lengths and again.lengths_origin == ["cache"]
    rows.info.dataset_name = "HuggingFaceM4/ChartQA"  # what a dataset loaded from the Hub carries
    assert InternVLXDataset(rows, processor, progress=False, check=True).sources[0].hub_id == "HuggingFaceM4/ChartQA"
    hub = InternVLXDataset(rows, processor, progress=False, cache_dir=tmp_path / "hub-cache")
    assert hub.lengths == dataset.lengths and Path(hub.lengths_files[0]).name.startswith("HuggingFaceM4_ChartQA-")


def test_group_by_length_samples_from_the_scan_lengths(processor, tmp_path):
    rows = th.colour_rows(tmp_path, 6)
    rows[3]["conversations"][1]["value"] = "It is a red square drawn on a white background, with nothing else."
    dataset = InternVLXDataset(str(th.write_jsonl(tmp_path / "d.jsonl", rows)), processor, progress=False,
                               cache_dir=tmp_path / "cache")
    model, _ = th.load(th.converted("internvl2_qwen2"))
    args = th.training_args(tmp_path / "out", train_sampling_strategy="group_by_length")
    trainer = InternVLXTrainer(model=model, args=args, train_dataset=dataset,
                               data_collator=InternVLXDataCollator(processor), processing_class=processor)
    sampler = trainer._get_train_sampler()
    assert type(sampler).__name__ == "LengthGroupedSampler" and sampler.lengths == dataset.lengths
    assert dataset.lengths[next(iter(sampler))] == max(dataset.lengths) == dataset.lengths[3]
    assert args.remove_unused_columns is False  # the collator needs the raw columns


def test_bad_data_paths_and_meta_files(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="training data '.*nope.json' not found"):
        read_meta(tmp_path / "nope.json")
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"root": ".", "annotation": "a.jsonl", "repeat_time": 1}}))
    with pytest.raises(FileNotFoundError, match="dataset 'a': annotation file '.*a.jsonl' not found"):
        read_meta(tmp_path / "meta.json")
    th.write_jsonl(tmp_path / "a.jsonl", [])
    (tmp_path / "meta.json").write_text(json.dumps({"a": {"annotation": "a.jsonl", "repeat_time": 0}}))
    with pytest.raises(ValueError, match="dataset 'a': repeat_time must be a number > 0, got 0"):
        read_meta(tmp_path / "meta.json")
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="a meta file is a JSON object"):
        read_meta(tmp_path / "meta.json")
    with pytest.raises(ValueError, match="no usable training samples in .*a.jsonl: it has no rows"):
        InternVLXDataset(str(tmp_path / "a.jsonl"), processor, progress=False)


def test_misplaced_system_turns_and_template_refusals_are_skipped_rows(processor, tmp_path, caplog):
    def turn(role, value):
        return {"from": role, "value": value}

    path = th.write_jsonl(tmp_path / "system.jsonl", [
        {"conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hello.")]},
        {"conversations": [turn("human", "Hi"), turn("system", "Be brief."), turn("gpt", "Hello.")]},
        {"conversations": [turn("system", "Be brief."), turn("system", "Be kind."), turn("human", "Hi"),
                           turn("gpt", "Hello.")]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "system", "content": "Now be brief."}]},
        {"messages": [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What happens?"}]},
                      {"role": "assistant", "content": "A cat jumps."}]},
        {"conversations": [turn("human", "Bye"), turn("gpt", "Goodbye.")]},
    ])
    caplog.set_level(logging.WARNING)
    dataset = InternVLXDataset(str(path), processor, progress=False, check=True)
    assert [dataset[i]["source"] for i in range(len(dataset))] == [f"{path}:1", f"{path}:6"]
    assert dict(dataset.summary.skipped) == {"misplaced system turn": 3, "refused by the chat template": 1}
    for line, turns in ((2, "1 at turn(s) [2]"), (3, "2 at turn(s) [1, 2]"), (4, "1 at turn(s) [3]")):
        assert (f"skipping {path}:{line}: a system turn must be the first turn, and only one is allowed; this row has "
                f"{turns}. Merge them into one first turn (misplaced system turn;") in caplog.text
    assert (f"skipping {path}:5: the chat template refused the conversation: InternVL templates support only text, "
            "image and video content, got audio (refused by the chat template;") in caplog.text

    # The collator drops such rows the same way and keeps the rest of the batch.
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    collator = InternVLXDataCollator(processor)
    batch = collator([{**row, "source": f"rows:{i}"} for i, row in enumerate(rows)])
    assert batch["input_ids"].shape[0] == 2
    assert collator.skipped == {"misplaced system turn": 3, "refused by the chat template": 1}
    assert "dropping rows:2: a system turn must be the first turn" in caplog.text


def test_over_long_samples_are_truncated_and_counted(processor, tmp_path):
    for colour in ("red", "blue"):
        th.draw(tmp_path / f"{colour}.png", colour)

    def turn(role, value):
        return {"from": role, "value": value}

    two_images = {"image": ["red.png", "blue.png"], "conversations": [
        turn("human", "<image>\nWhat colour?"), turn("gpt", "Red."),
        turn("human", "<image>\nAnd this one?"), turn("gpt", "Blue.")]}
    rows = [
        {"image": "red.png", "conversations": [turn("human", "What colour?"), turn("gpt", "Red.")]},
        {"image": "red.png", "conversations": [turn("human", "Describe it."), turn("gpt", "It is red. " * 80)]},
        two_images,
        {"image": ["red.png", "blue.png"], "conversations": [
            turn("human", "<image><image>\nSame colour?"), turn("gpt", "No.")]},
    ]
    path = th.write_jsonl(tmp_path / "long.jsonl", rows)
    full = InternVLXDataCollator(processor)([{**two_images, "image": [str(tmp_path / i) for i in two_images["image"]]}])
    ids = full["input_ids"][0].tolist()
    second_image = [i for i, t in enumerate(ids) if t == processor.start_image_token_id][1]
    max_length = second_image + 10  # inside the second image's block (256 + 2 tokens)

    dataset = InternVLXDataset(str(path), processor, max_length=max_length, progress=False, check=True)
    stats = dataset.summary.datasets[0]
    assert [dataset[i]["source"] for i in range(len(dataset))] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert (stats.samples, stats.truncated, stats.images, stats.tiles) == (3, 2, 3, 3)
    assert dict(stats.skipped) == {"too long": 1}
    assert dataset.lengths[1:] == [max_length, second_image]
    # The scan's lengths are what the collator builds, the second image of line 3 left out.
    collator = InternVLXDataCollator(processor, max_length=max_length)
    batches = [collator([dataset[i]]) for i in range(len(dataset))]
    assert [batch["input_ids"].shape[1] for batch in batches] == dataset.lengths
    assert [batch["num_patches"].tolist() for batch in batches] == [[1], [1], [1]]
    assert batches[2]["labels"][0].ne(IGNORE_INDEX).sum() == len(processor.tokenizer("Red.<|im_end|>").input_ids)
    text = str(dataset.summary)
    assert "  dataset                   samples   images    tiles     tokens truncated  skipped" in text
    assert f"  long                            3        3        3 {sum(dataset.lengths):>10,}         2        1" \
        in text
    labelled = int(batches[1]["labels"].ne(IGNORE_INDEX).sum())
    assert (f"  truncated: 2 sample(s) cut to max_length {max_length} (the head is kept, with the replies that fit), "
            f"e.g.\n    {path}:2: {labelled} reply token(s) kept\n    {path}:3: 4 reply token(s) kept") in text
    assert dataset.summary.to_dict()[0]["truncated"] == 2


def test_a_folder_as_image_and_a_row_without_a_question_say_so(processor, tmp_path, capsys):
    th.draw(tmp_path / "good.png", "red")
    (tmp_path / "shapes").mkdir()

    def row(image, *turns):
        return {"image": image, "conversations": [{"from": who, "value": text} for who, text in turns]}

    path = th.write_jsonl(tmp_path / "rows.jsonl", [
        row("good.png", ("human", "What colour?"), ("gpt", "Red.")),
        row("shapes", ("human", "What colour?"), ("gpt", "Red.")),
        row("good.png", ("gpt", "Red.")),
        {"messages": [{"role": "assistant", "content": "Red."}], "images": ["good.png"]},
    ])
    dataset = InternVLXDataset(str(path), processor, progress=True, check=True)
    assert len(dataset) == 1
    assert dict(dataset.summary.skipped) == {"image is a folder": 1, "no human turn": 1, "no user turn": 1}
    assert dataset.summary.examples == [
        f"{path}:2: image {str(tmp_path / 'shapes')!r} is a folder, not an image file; give the path of the image "
        "file",
        f"{path}:3: the conversation has no human turn to learn a reply to (a leading gpt turn is dropped, as "
        "InternVL does); start it with a human turn",
        f"{path}:4: the row has 1 image(s) but no user message to put them in; start the conversation with a user "
        "message",
    ]
    # The warnings are written above the scan's progress bar (tqdm.write), not glued to the end of the bar.
    err = capsys.readouterr().err
    starts = [match.start() for match in re.finditer("skipping ", err)]
    assert len(starts) == 3 and all(err[start - 1] in "\r\n" for start in starts), err
    # The processor (inference, training's pixel loading) says the same of a folder.
    with pytest.raises(IsADirectoryError, match=r"^image 0 \('.*shapes'\): a folder, not an image file\. Pass the "
                                                r"path of an image file\.$"):
        processor.image_processor(images=[str(tmp_path / "shapes")])
