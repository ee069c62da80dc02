"""The lengths cache of `--group_by_length` (internvlx_hf.data.lengths): a damaged file is computed again with one
warning, the key changes with every input the lengths depend on (one case per input: drop it from the key and its
case fails), image files that changed since are noticed, and `internvlx data check` writes the lengths that the
next `internvlx train --group_by_length` with the same settings reads."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import tokenizers

import training_helpers as th
from internvlx_hf.cli import main
from internvlx_hf.data import InternVLXDataset
from internvlx_hf.data import lengths as lengths_module
from internvlx_hf.data.sources import DataSource
from internvlx_hf.processing import CHAT_TEMPLATES, TilingMode
from internvlx_hf.training import parse_train_args, train


@pytest.fixture(scope="module")
def processor():
    return th.load(th.converted("internvl2_qwen2"))[1]


def _video_rows(count):
    return [{"video": "clip", "conversations": [{"from": "human", "value": f"<video>\nWhat moves in clip {i}?"},
                                                {"from": "gpt", "value": "A red square."}]} for i in range(count)]


class Data:
    """A JSONL file of image rows (200x100 images) and video rows (a frame folder) under a meta JSON entry."""

    def __init__(self, folder):
        self.folder = folder
        rows = th.colour_rows(folder / "images", 4, (200, 100)) + _video_rows(2)
        rows.append({"image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                {"from": "gpt", "value": "Red."}]})
        th.colour_rows(folder / "images2", 4, (100, 300))  # the same names, another shape
        (folder / "images" / "clip").mkdir()
        for index in range(3):
            th.draw(folder / "images" / "clip" / f"frame{index}.png", "red")
        self.jsonl = th.write_jsonl(folder / "d.jsonl", rows)
        self.entry = {"root": str(folder / "images"), "annotation": str(self.jsonl), "max_dynamic_patch": 6,
                      "min_num_frame": 2, "max_num_frame": 4, "sampling_method": "rand"}

    def build(self, processor, entry=None, cache=True, **options):
        meta = self.folder / "meta.json"
        meta.write_text(json.dumps({"d": {**self.entry, **(entry or {})}}))
        dataset = InternVLXDataset(str(meta), processor, progress=False,
                                   cache_dir=self.folder / "cache" if cache else False, **options)
        dataset.lengths  # noqa: B018 - computed or read here
        return dataset


def _add_token(processor):
    processor = copy.deepcopy(processor)
    processor.tokenizer.add_tokens(["square"])
    return processor


def _with_template(template):
    def change(processor):
        processor = copy.deepcopy(processor)
        processor.chat_template = template(processor)
        return processor
    return change


def _setting(name, value, of_image_processor=True):
    def change(processor):
        processor = copy.deepcopy(processor)
        setattr(processor.image_processor if of_image_processor else processor, name, value)
        return processor
    return change


def _bos_template(processor):  # a template that writes the tokenizer's bos_token first
    return "{{ bos_token }}" + processor.chat_template


def _other_bos(processor):
    processor = copy.deepcopy(processor)
    processor.tokenizer.bos_token = "<|im_start|>"
    return processor


# name: (the cache_settings key it covers, what changes, whether the lengths change with it)
#   what changes: {"entry": meta keys, "processor": f(processor), "options": dataset options, "files": f(data),
#                  "before": f(processor) applied to both runs, "patch": (module, attribute, value)}
CASES = {
    "annotation file": (None, {"files": lambda d: d.jsonl.open("a").write(json.dumps(
        th.colour_rows(d.folder / "images", 1, (200, 100))[0]) + "\n")}, True),
    "root": ("root", {"entry": {"root": "{folder}/images2"}}, True),
    "max_dynamic_patch": ("max_dynamic_patch", {"entry": {"max_dynamic_patch": 1}}, True),
    "min_num_frame": ("video_sampling", {"entry": {"min_num_frame": 3}}, False),
    "max_num_frame": ("video_sampling", {"entry": {"max_num_frame": 8}}, True),
    "sampling_method": ("video_sampling", {"entry": {"sampling_method": "middle"}}, False),
    "template": ("template", {"processor": _with_template(lambda p: CHAT_TEMPLATES["phi3-chat"])}, True),
    "tokenizer": ("tokenizer", {"processor": _add_token}, True),
    "special tokens": ("template_kwargs", {"before": _with_template(_bos_template), "processor": _other_bos}, True),
    "image_seq_length": ("image_seq_length",
                         {"processor": _setting("image_seq_length", 64, of_image_processor=False)}, True),
    "use_thumbnail": ("image_processor", {"processor": _setting("use_thumbnail", False)}, True),
    "tiling": ("image_processor", {"processor": _setting("tiling", TilingMode.NONE)}, True),
    "max_length": ("max_length", {"options": {"max_length": 300}}, True),
    "mode": ("mode", {"options": {"lengths": "approximate"}}, True),
    "tokenizers release": ("libraries", {"patch": (tokenizers, "__version__", "0.0.0")}, False),
    "cache version": ("version", {"patch": (lengths_module, "CACHE_VERSION", 999)}, False),
    "an image replaced": (None, {"files": lambda d: th.draw(d.folder / "images" / "square0.png", "red", (100, 300))},
                          True),
    "an image touched": (None, {"files": lambda d: os.utime(d.folder / "images" / "square1.png",
                                                            ns=(1, 10**18))}, False),
    "an image appears": (None, {"files": lambda d: th.draw(d.folder / "images" / "missing.png", "red")}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_of_any_input_computes_the_lengths_again(processor, tmp_path, monkeypatch, case):
    _, change, changes_lengths = CASES[case]
    data = Data(tmp_path)
    before = change.get("before", lambda p: p)(processor)
    first = data.build(before)
    assert first.lengths_origin == ["built"]
    assert data.build(before).lengths_origin == ["cache"]  # unchanged: read back (so the case below can fail)

    if "files" in change:
        change["files"](data)
    if "patch" in change:
        monkeypatch.setattr(*change["patch"])
    entry = {key: value.format(folder=tmp_path) if isinstance(value, str) else value
             for key, value in change.get("entry", {}).items()}
    after = change.get("processor", lambda p: p)(before)
    options = change.get("options", {})
    changed = data.build(after, entry, **options)
    assert changed.lengths_origin == ["built"], f"{case}: the old lengths were read back"
    assert changed.lengths == data.build(after, entry, cache=False, **options).lengths
    assert (changed.lengths != first.lengths) is changes_lengths
    assert data.build(after, entry, **options).lengths_origin == ["cache"]


def test_every_setting_of_the_key_has_its_case(processor, tmp_path):
    """A new input of the key needs a case above; a new field of `DataSource` must say whether lengths depend on it."""
    dataset = Data(tmp_path).build(processor)
    assert set(lengths_module.cache_settings(dataset, 0, "exact")) == {
        covered for covered, _, _ in CASES.values() if covered} | {"version"}
    in_key = {"annotation", "rows", "root", "max_dynamic_patch", "video_sampling"}  # identity or settings
    not_lengths = {"name", "repeat_time", "hub_id", "metric"}  # file name stem / applied after / not used
    assert {f.name for f in dataclasses.fields(DataSource)} == in_key | not_lengths


def _damage(path, kind, lengths):
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not a lengths cache\n" * 10)
    elif kind == "an .npy array":
        with open(path, "wb") as handle:
            np.save(handle, lengths)
    else:
        arrays = {"lengths": lengths, "image_files": np.zeros(0, np.uint8), "image_stats": np.zeros((0, 2), np.int64)}
        if kind == "float lengths":
            arrays["lengths"] = lengths.astype(np.float64)
        elif kind == "too few lengths":
            arrays["lengths"] = lengths[:-1]
        elif kind == "negative lengths":
            arrays["lengths"] = -lengths
        elif kind == "no file list":
            del arrays["image_files"]
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "an .npy array", "float lengths",
                                  "too few lengths", "negative lengths", "no file list"])
def test_a_damaged_cache_file_is_computed_again_with_one_warning(processor, tmp_path, caplog, kind):
    data = Data(tmp_path)
    first = data.build(processor)
    path = first.lengths_files[0]
    _damage(tmp_path / "cache" / os.path.basename(path), kind, np.asarray(first._row_lengths, dtype=np.int32))
    with caplog.at_level(logging.WARNING):
        again = data.build(processor)
    assert again.lengths_origin == ["built"] and again.lengths == first.lengths
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"lengths cache {path} is damaged ("), warnings
    assert warnings[0].endswith("); computing the lengths again") and "\n" not in warnings[0]
    assert data.build(processor).lengths_origin == ["cache"]  # written anew


def test_data_check_writes_the_lengths_the_next_group_by_length_run_reads(processor, tmp_path, capsys):
    """Rows with their own length, truncated, unusable (missing image, no reply, image tokens in the text) and
    video rows: the check's lengths are those the run would compute, and the run reads them instead."""
    data = Data(tmp_path)
    rows = [json.loads(line) for line in data.jsonl.read_text().splitlines()]
    rows[1]["length"] = 4321
    rows[2]["conversations"][1]["value"] = "It is green. " * 150
    rows.append({"conversations": [{"from": "human", "value": "Hello?"}]})
    rows.append({"conversations": [{"from": "human", "value": "What is <img>?"}, {"from": "gpt", "value": "A tag."}]})
    th.write_jsonl(data.jsonl, rows)
    (tmp_path / "meta.json").write_text(json.dumps({"d": data.entry}))
    model, cache = th.converted("internvl2_qwen2"), tmp_path / "cache"
    settings = ["--max_length", "1300", "--max_tiles", "2"]
    assert main(["data", "check", str(tmp_path / "meta.json"), "--model", str(model), *settings,
                 "--lengths_cache_dir", str(cache), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"Lengths written to {cache} (1 file(s)): `internvlx train --group_by_length` with the same settings " \
           "reads them instead of computing them." in printed
    (written,) = cache.iterdir()

    result = train(*parse_train_args(dict(
        model=str(model), data=str(tmp_path / "meta.json"), output_dir=str(tmp_path / "out"), max_steps=1,
        save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=0, per_device_train_batch_size=2,
        group_by_length=True, lengths_cache_dir=str(cache), max_length=1300, max_tiles=2)), print_fn=None)
    assert result.dataset.lengths_origin == ["cache"] and result.dataset.lengths_files == [str(written)]
    processor = copy.deepcopy(processor)
    processor.image_processor.max_tiles = 2
    computed = InternVLXDataset(str(tmp_path / "meta.json"), processor, max_length=1300, progress=False,
                                cache_dir=False)
    computed.sources[0].max_dynamic_patch = None  # what --max_tiles does to the meta's max_dynamic_patch
    assert result.dataset.lengths == computed.lengths
    lengths = result.dataset.lengths
    assert lengths[1] == 4321 and lengths[2] == 1300  # its own; truncated
    # a missing image counts 0; rows refused by the encoding still have a length (they only place a row in a batch)
    assert lengths[6] == 0 and lengths[7] > 0 and lengths[8] > 0
