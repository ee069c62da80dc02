"""A plain `transformers.Trainer` (and TRL's `SFTTrainer`) with default arguments trains on `InternVLXDataset` +
`InternVLXDataCollator`: the default ``remove_unused_columns=True`` once dropped every row's keys before the collator
("got keys []")."""

from __future__ import annotations

import pytest
from transformers import Trainer, TrainingArguments

import training_helpers as th
from internvlx_hf.data import InternVLXDataset
from internvlx_hf.training import InternVLXDataCollator


def _dataset(tmp_path, processor):
    rows = th.colour_rows(tmp_path / "images", 4)
    for row in rows:
        row["image"] = str(tmp_path / "images" / row["image"])
    return InternVLXDataset(rows, processor, progress=False, cache_dir=False)


def test_plain_trainer_with_default_arguments_trains(tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    before = th.snapshot(model)
    trainer = Trainer(model, TrainingArguments(str(tmp_path / "out")), train_dataset=_dataset(tmp_path, processor),
                      data_collator=InternVLXDataCollator(processor))
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert trainer.state.global_step == 3  # 4 rows, batch 8, 3 epochs
    after = dict(model.named_parameters())
    assert any(not after[name].detach().equal(value) for name, value in before.items())


def test_sft_trainer_with_default_arguments_trains(tmp_path):
    """TRL's `SFTTrainer` takes `datasets.Dataset` rows (messages + images) only; with its default `SFTConfig` (which
    keeps those vision columns) it trains with our collator. ``use_cpu=True`` only because SFTConfig defaults to
    bf16, which transformers refuses on a machine without a GPU otherwise."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = th.colour_rows(tmp_path / "images", 4)
    dataset = datasets.Dataset.from_list([{
        "images": [Image.open(tmp_path / "images" / row["image"])],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["value"]}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer["value"]}]}],
    } for row in rows for question, answer in [row["conversations"]]])
    before = th.snapshot(model)
    trainer = trl.SFTTrainer(model, trl.SFTConfig(str(tmp_path / "out"), use_cpu=True), train_dataset=dataset,
                             processing_class=processor, data_collator=InternVLXDataCollator(processor))
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert trainer.state.global_step == 3
    after = dict(model.named_parameters())
    assert any(not after[name].detach().equal(value) for name, value in before.items())


def test_rows_emptied_by_remove_unused_columns_are_named(tmp_path, caplog):
    """A list of `dict` rows given to a plain Trainer loses every key in `RemoveColumnsCollator` (only what
    model.forward names is kept): the collator's warning says which argument to change instead of "got keys []"."""
    import logging

    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = th.colour_rows(tmp_path / "images", 2)
    for row in rows:
        row["image"] = str(tmp_path / "images" / row["image"])
    trainer = Trainer(model, TrainingArguments(str(tmp_path / "out")), train_dataset=rows,
                      data_collator=InternVLXDataCollator(processor))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match=r"every row of this batch of 2 was dropped"):
        trainer.train()
    dropped = [record.getMessage() for record in caplog.records if "dropping" in record.getMessage()]
    assert len(dropped) == 2
    assert dropped[0] == (
        "dropping batch row 0: a row with no keys: a Trainer with remove_unused_columns=True dropped the "
        "`messages`/`conversations` columns before the collator; give the Trainer "
        "TrainingArguments(remove_unused_columns=False), or an InternVLXDataset built on the data (bad format; 1 "
        "dropped by the collator so far)")
