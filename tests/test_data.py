"""internvlx_hf.data: the lazy dataset against the full check, rows skipped as they load, the lengths cache (also
across 2 DDP processes), `internvlx data check` / `stats`, and the tile budget's one precedence."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import training_helpers as th
from conftest import REPO_ROOT
from internvlx_hf.cli import main
from internvlx_hf.data import InternVLXDataset
from internvlx_hf.data import lengths as lengths_module
from internvlx_hf.provenance import read_provenance
from internvlx_hf.training import InternVLXDataCollator, parse_train_args, train


@pytest.fixture(scope="module")
def processor():
    return th.load(th.converted("internvl2_qwen2"))[1]


def _turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


def _mix(folder):
    """A meta JSON over three JSONL files: single images of several sizes (repeat 2), two-image rows with their own
    max_dynamic_patch (repeat 0.5), text-only multi-turn rows (repeat 1.5)."""
    images = folder / "images"
    images.mkdir(parents=True)
    sizes = [(64, 64), (200, 100), (100, 300), (480, 200)]
    for index, size in enumerate(sizes):
        th.draw(images / f"i{index}.png", list(th.COLOURS)[index], size)
    single = [{"image": f"i{i % 4}.png", "conversations": _turns(("human", f"Colour of square {i}?"),
                                                                  ("gpt", f"It is {list(th.COLOURS)[i % 4]}."))}
              for i in range(6)]
    double = [{"image": [f"i{i % 4}.png", f"i{(i + 1) % 4}.png"], "conversations": _turns(
        ("human", "Image-1: <image>\nImage-2: <image>\nSame colour?"), ("gpt", "No."),
        ("human", "Which is larger?"), ("gpt", f"Image-{1 + i % 2}."))} for i in range(4)]
    text = [{"conversations": _turns(("system", "Be brief."), ("human", f"Count to {i}."),
                                     ("gpt", " ".join(str(n) for n in range(1, i + 2))))} for i in range(5)]
    meta = {}
    for name, rows, extra in (("single", single, {"repeat_time": 2}),
                              ("double", double, {"repeat_time": 0.5, "max_dynamic_patch": 2}),
                              ("text", text, {"repeat_time": 1.5})):
        th.write_jsonl(folder / f"{name}.jsonl", rows)
        meta[name] = {"root": str(images), "annotation": str(folder / f"{name}.jsonl"), **extra}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "meta.json"


def _colours(folder, count=6, size=(200, 100), **entry):
    rows = th.colour_rows(folder / "images", count, size)
    th.write_jsonl(folder / "colours.jsonl", rows)
    (folder / "meta.json").write_text(json.dumps({"colours": {
        "root": str(folder / "images"), "annotation": str(folder / "colours.jsonl"), **entry}}))
    return folder / "meta.json"


def _batches_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_lazy_equals_the_full_check_sample_by_sample(processor, tmp_path):
    collator = InternVLXDataCollator(processor)
    for data, used in ((_colours(tmp_path / "colours", repeat_time=2), 6), (_mix(tmp_path / "mix"), 13)):
        checked = InternVLXDataset(str(data), processor, progress=False, check=True)
        lazy = InternVLXDataset(str(data), processor, progress=False, cache_dir=tmp_path / "cache")
        assert len(lazy) == len(checked)
        assert lazy.lengths == checked.lengths  # exact lengths, computed apart from the check
        for index in range(len(checked)):
            a, b = checked[index], lazy[index]
            assert (a["source"], a["messages"], a["max_tiles"]) == (b["source"], b["messages"], b["max_tiles"])
            assert [image.tobytes() for image in a["images"]] == [image.tobytes() for image in b["images"]]
            _batches_equal(collator([a]), collator([b]))  # ids, labels, pixel values, tiles
        rows = sum(d.rows for d in lazy.summary.datasets)  # repeat_time 0.5 uses 2 of the 4 two-image rows
        assert lazy.load_report() == {"rows": rows, "rows_read": used, "truncated": 0, "skipped": {}}
    assert [d.samples for d in lazy.summary.datasets] == [12, 2, 7]
    assert "  total                            15         21" in str(lazy.summary)

    # Two DataLoader workers (the dataset pickled or forked into them) give the batches of the full check, and the
    # rows they read are counted in the main process (the status array is in shared memory).
    lazy = InternVLXDataset(str(data), processor, progress=False)
    loader = torch.utils.data.DataLoader(lazy, batch_size=3, num_workers=2, collate_fn=collator)
    expected = [collator([checked[i] for i in range(start, min(start + 3, len(checked)))])
                for start in range(0, len(checked), 3)]
    for got, want in zip(loader, expected, strict=True):
        _batches_equal(got, want)
    assert lazy.load_report()["rows_read"] == 13
    # Where workers are spawned, the dataset goes to them pickled: no open file, the same items.
    copy_ = pickle.loads(pickle.dumps(lazy))
    assert all(reader._fd is None for reader in copy_._readers)
    _batches_equal(collator([copy_[4]]), collator([checked[4]]))


def test_a_corrupt_row_in_a_large_file_is_skipped_and_counted_when_it_loads(processor, tmp_path, caplog):
    rows = [{"conversations": _turns(("human", f"What is {i} + 1?"), ("gpt", str(i + 1)))} for i in range(3000)]
    rows[1499] = '{"conversations": [{"from": "human", "value": "cut'  # line 1500
    path = th.write_jsonl(tmp_path / "big.jsonl", rows)
    caplog.set_level(logging.WARNING)
    dataset = InternVLXDataset(str(path), processor, progress=False)
    assert len(dataset) == 3000 and dataset.load_report()["rows_read"] == 0  # nothing read at build time
    assert dataset[1499]["source"] == f"{path}:1501"  # the next sample takes its place
    assert dataset.skipped_at_load == {"invalid JSON": 1}
    assert f"skipping {path}:1500: invalid JSON (" in caplog.text and "(invalid JSON; 1 skipped while loading" \
        in caplog.text
    assert dataset[1499]["source"] == f"{path}:1501"  # remembered: no second attempt, no second warning
    assert caplog.text.count("skipping") == 1

    # Found by a DataLoader worker: counted in the main process all the same.
    fresh = InternVLXDataset(str(path), processor, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(fresh, range(1490, 1510)), batch_size=4,
                                         num_workers=2, collate_fn=list)
    sources = [row["source"] for batch in loader for row in batch]
    assert f"{path}:1500" not in sources and sources.count(f"{path}:1501") == 2
    assert fresh.load_report() == {"rows": 3000, "rows_read": 20, "truncated": 0, "skipped": {"invalid JSON": 1}}


def test_a_run_records_the_rows_skipped_while_loading(tmp_path, capsys):
    meta = _colours(tmp_path, count=4, size=(64, 64))
    rows = [json.loads(line) for line in (tmp_path / "colours.jsonl").read_text().splitlines()]
    th.write_jsonl(tmp_path / "colours.jsonl", [*rows[:2], {**rows[2], "image": "missing.png"}, rows[3]])
    result = train(*parse_train_args(dict(
        model=str(th.converted("internvl2_qwen2")), data=str(meta), output_dir=str(tmp_path / "out"), max_steps=3,
        save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        per_device_train_batch_size=2, learning_rate=1e-3)))
    record = read_provenance(tmp_path / "out")["training"][-1]
    assert record["data_loaded"] == {"rows": 4, "rows_read": 4, "truncated": 0, "skipped": {"image not found": 1}}
    printed = capsys.readouterr().out
    assert "Rows read during training: 4 of 4, 0 truncated, skipped 1 (image not found: 1; see the warnings)" in printed
    assert result.dataset.skipped_at_load == {"image not found": 1}


def test_lengths_come_from_the_row_or_the_cache_which_follows_file_and_settings(processor, tmp_path):
    cache = tmp_path / "cache"
    path = th.write_jsonl(tmp_path / "images" / "d.jsonl", th.colour_rows(tmp_path / "images", 4, (200, 100)))

    def build(proc=processor, **options):
        dataset = InternVLXDataset(str(path), proc, progress=False, cache_dir=cache, **options)
        return dataset, dataset.lengths

    first, lengths = build()
    assert first.lengths_origin == ["built"] and len(list(cache.iterdir())) == 1
    checked = InternVLXDataset(str(path), processor, progress=False, check=True)
    assert lengths == checked.lengths
    second, again = build()
    assert second.lengths_origin == ["cache"] and again == lengths

    capped = copy.deepcopy(processor)
    capped.image_processor.max_tiles = 1
    assert build(capped)[0].lengths_origin == ["built"]  # other tile settings
    assert build(max_length=600)[0].lengths_origin == ["built"]  # other max_length
    assert build(lengths="approximate")[0].lengths_origin == ["built"]
    assert build(capped)[0].lengths_origin == ["cache"]
    assert len(list(cache.iterdir())) == 4

    with open(path, "a") as handle:  # the file changes: its size and modification time
        handle.write(json.dumps({**th.colour_rows(tmp_path / "images", 1, (200, 100))[0], "length": 777}) + "\n")
    changed, lengths = build()
    assert changed.lengths_origin == ["built"] and lengths[:4] == checked.lengths and lengths[4] == 777
    off = InternVLXDataset(str(path), processor, progress=False, cache_dir=False)
    assert off.lengths == lengths and off.lengths_origin == ["built (not cached)"]


def test_approximate_lengths_count_text_and_the_tile_budget(processor, tmp_path):
    rows = th.colour_rows(tmp_path / "images", 2, (200, 100))
    rows.append({"conversations": _turns(("human", "x" * 40), ("gpt", "y" * 20))})
    path = th.write_jsonl(tmp_path / "images" / "d.jsonl", rows)
    dataset = InternVLXDataset(str(path), processor, progress=False, lengths="approximate", cache_dir=False)

    def estimate(text, images):  # text / 4, 8 per message, per image (12 tiles + thumbnail) x 256 + <img></img>
        return -(-len(text) // 4) + 8 * 2 + images * ((12 + 1) * 256 + 2)

    question = "<image>\nWhat colour is the square?"
    assert dataset.lengths == [estimate(question + "It is red.", 1), estimate(question + "It is green.", 1),
                               estimate("x" * 40 + "y" * 20, 0)]


def test_lengths_are_built_once_by_the_main_process_under_ddp(tmp_path):
    script = tmp_path / "run.py"
    script.write_text("""
import json, sys
import torch.distributed as dist
from internvlx_hf.training import end_distributed, parse_train_args, train
result = train(*parse_train_args(json.loads(sys.argv[1])), print_fn=None)
json.dump(result.dataset.lengths_origin, open(sys.argv[2] + f"/rank{dist.get_rank()}.json", "w"))
del result
end_distributed()
""")
    options = dict(model=str(th.converted("internvl2_qwen2")), data=str(_colours(tmp_path, count=8)),
                   output_dir=str(tmp_path / "out"), max_steps=1, save_strategy="no", use_cpu=True,
                   ddp_backend="gloo", report_to="none", disable_tqdm=True, seed=0, per_device_train_batch_size=2,
                   group_by_length=True, lengths_cache_dir=str(tmp_path / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               json.dumps(options), str(tmp_path)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    origins = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert origins == [["built"], ["cache"]]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_data_check_prints_the_full_check_summary(processor, tmp_path, capsys):
    for colour in ("red", "blue"):
        th.draw(tmp_path / f"{colour}.png", colour)
    rows = [
        {"image": "red.png", "conversations": _turns(("human", "What colour?"), ("gpt", "Red."))},
        {"image": "red.png", "conversations": _turns(("human", "Describe it."), ("gpt", "It is red. " * 80))},
        {"image": "missing.png", "conversations": _turns(("human", "What colour?"), ("gpt", "Red."))},
        '{"image": "red.png", "conversations": [',
        {"image": ["red.png", "blue.png"], "conversations": _turns(("human", "<image> vs <image>?"), ("gpt", "No."))},
    ]
    path = th.write_jsonl(tmp_path / "rows.jsonl", rows)
    model = str(th.converted("internvl2_qwen2"))
    cache = tmp_path / "cache"
    assert main(["data", "check", str(path), "--model", model, "--max_length", "600", "--no-progress",
                 "--lengths_cache_dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    checked = InternVLXDataset(str(path), processor, max_length=600, progress=False, check=True, cache_dir=False)
    assert printed == (f"Tiles: the processor's max_tiles 12 for every dataset\n{checked.summary}\nLengths written to "
                       f"{cache} (1 file(s)): `internvlx train --group_by_length` with the same settings reads them "
                       "instead of computing them.\n")
    # as the scan before every run printed it (the table of the old tests)
    assert printed.splitlines()[2:4] == [
        "  dataset                   samples   images    tiles     tokens truncated  skipped",
        f"  rows                            2        2        2 {sum(checked.lengths):>10,}         1        3"]
    # the two-image row: its cut moves before the second image, and its reply comes after both
    assert "  skipped (image not found: 1, invalid JSON: 1, too long: 1), e.g." in printed

    assert main(["data", "stats", str(path), "--model", model, "--max_length", "600", "--no-progress", "--json",
                 "--strict", "--lengths_cache_dir", str(cache)]) == 1  # --strict: rows were skipped
    report = json.loads(capsys.readouterr().out)
    assert report["datasets"] == checked.summary.to_dict()
    assert (report["rows"], report["samples"], report["skipped"], report["truncated"]) == (
        5, 2, {"image not found": 1, "invalid JSON": 1, "too long": 1}, 1)
    assert report["stats"]["tokens_per_sample"]["max"] == 600 == max(checked.lengths)
    assert report["stats"]["tiles_per_image"] == {"min": 1, "p50": 1, "p90": 1, "p99": 1, "max": 1}

    # the check shares its rows out to processes: same summary from 2 as from 1
    monkey_chunk = lengths_module._CHUNK_ROWS
    lengths_module._CHUNK_ROWS = 2
    try:
        parallel = InternVLXDataset(str(path), processor, max_length=600, progress=False, check=True, num_proc=2)
    finally:
        lengths_module._CHUNK_ROWS = monkey_chunk
    assert str(parallel.summary) == str(checked.summary)
    assert np.array_equal(parallel.measured.lengths, checked.measured.lengths)


def test_max_tiles_wins_over_max_dynamic_patch_and_the_saved_processor_keeps_the_sources(tmp_path, capsys):
    """--max_tiles is every dataset's budget in training, else a dataset's max_dynamic_patch; the saved processor keeps
    the source checkpoint's max_tiles (the trained model tiles at inference as the source did), and the line says so
    (issue 80: a trial run's `--max_tiles 2` once became the model's tile budget without a word); the provenance
    record names training's budget."""
    model = th.converted("internvl2_qwen2")
    source_tiles = json.loads((model / "processor_config.json").read_text())["image_processor"]["max_tiles"]
    meta = _colours(tmp_path, count=4, size=(200, 100), max_dynamic_patch=6)  # 2x1 grid + thumbnail under 6
    options = dict(model=str(model), data=str(meta), max_steps=1, save_strategy="no",
                   use_cpu=True, report_to="none", disable_tqdm=True, seed=0, per_device_train_batch_size=2)
    result = train(*parse_train_args(options, output_dir=str(tmp_path / "one"), max_tiles=1))
    printed = capsys.readouterr().out
    assert ("Tiles: --max_tiles 1 for every dataset (it overrides max_dynamic_patch of colours 6); the saved "
            f"processor keeps the source's max_tiles {source_tiles} (training tiles at up to 1; --save_max_tiles "
            "saves that instead)") in printed
    assert result.trainer.data_collator([result.dataset[0]])["num_patches"].tolist() == [1]
    saved = json.loads((tmp_path / "one" / "processor_config.json").read_text())["image_processor"]
    assert saved["max_tiles"] == source_tiles and read_provenance(tmp_path / "one")["training"][-1]["max_tiles"] == 1

    result = train(*parse_train_args(options, output_dir=str(tmp_path / "own")))
    printed = capsys.readouterr().out
    assert ("Tiles: each dataset's max_dynamic_patch (colours 6) (--max_tiles N sets one budget for all); the saved "
            f"processor keeps the source's max_tiles {source_tiles} (training tiles at up to 6") in printed
    assert result.trainer.data_collator([result.dataset[0]])["num_patches"].tolist() == [3]
    assert "On a CPU: up to 6 tiles an image (+ the thumbnail), 1,792 image tokens a sample, each adding" in printed

    result = train(*parse_train_args(options, output_dir=str(tmp_path / "saved"), save_max_tiles=True))
    assert "the saved processor gets max_tiles 6 (--save_max_tiles" in capsys.readouterr().out
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]
    assert saved["max_tiles"] == 6


def test_data_check_says_what_training_would_save_as_it_saves_nothing(tmp_path, capsys):
    """`data check` reports the tile budget as training applies it, but writes no processor: its line says what a
    training run would save (it said "the saved processor gets", issue 50)."""
    meta = _colours(tmp_path, count=2, size=(64, 64), max_dynamic_patch=6)
    model = str(th.converted("internvl2_qwen2"))
    source_tiles = json.loads((th.converted("internvl2_qwen2") / "processor_config.json").read_text())[
        "image_processor"]["max_tiles"]
    for extra, line in [(["--max_tiles", "2"], "Tiles: --max_tiles 2 for every dataset (it overrides max_dynamic_patch "
                                               "of colours 6); training would save the processor with the source's "
                                               f"max_tiles {source_tiles} (training tiles at up to 2; "
                                               "--save_max_tiles saves that instead)"),
                        ([], "Tiles: each dataset's max_dynamic_patch (colours 6) (--max_tiles N sets one budget for "
                             "all); training would save the processor with the source's max_tiles "
                             f"{source_tiles} (training tiles at up to 6; --save_max_tiles saves that instead)")]:
        assert main(["data", "check", str(meta), "--model", model, "--no-progress", "--lengths_cache_dir",
                     str(tmp_path / "cache"), *extra]) == 0
        assert capsys.readouterr().out.splitlines()[0] == line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "colours.jsonl", "images", "meta.json"]


def test_no_usable_training_samples_is_one_readable_line(tmp_path, capsys):
    meta = _colours(tmp_path, count=2, size=(64, 64))
    rows = [json.loads(line) for line in (tmp_path / "colours.jsonl").read_text().splitlines()]
    th.write_jsonl(tmp_path / "colours.jsonl", [{**row, "image": "missing.png"} for row in rows])
    base = ["train", "--model", str(th.converted("internvl2_qwen2")), "--data", str(meta), "--max_steps", "1",
            "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
    for extra, message in (
            ([], f"no usable training samples in {tmp_path / 'colours.jsonl'}: every one of the 2 sample(s) was "
                 "skipped while loading (image not found: 2); the warnings name each row's file:line and the fix "
                 "(`internvlx data check` lists them all)"),
            (["--check_data"], f"no usable training samples in {tmp_path / 'colours.jsonl'}: all 2 row(s) were "
                               "skipped (image not found: 2); the warnings above name each row's file:line and the "
                               "fix")):
        assert main([*base, "--output_dir", str(tmp_path / f"out{len(extra)}"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == f"internvlx train: error: {message}", err
