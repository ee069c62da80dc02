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
