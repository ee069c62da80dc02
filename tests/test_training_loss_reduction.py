"""InternVL's `loss_reduction` (token / sample / square): the collator's per-token weights and the Trainer's loss,
checked against the definition on samples with different numbers of labelled tokens, padded, packed and with
gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

import training_helpers as th
from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator, InternVLXDataset, InternVLXTrainer

# InternVL's len2weight: the weight of each labelled token of a sample with n of them.
WEIGHT = {"token": lambda n: 1.0, "sample": lambda n: 1.0 / n, "square": lambda n: 1.0 / math.sqrt(n)}


def _rows(tmp_path):
    """Three samples with 1 image, none, and 2 turns: different numbers of labelled tokens."""
    th.draw(tmp_path / "a.png", "red")
    return [
        {"image": "a.png", "conversations": [{"from": "human", "value": "What colour?"},
                                             {"from": "gpt", "value": "Red."}]},
        {"conversations": [{"from": "human", "value": "Say something long."},
                           {"from": "gpt", "value": "Here is a rather long answer with many words in it."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."},
                           {"from": "human", "value": "Count to five."}, {"from": "gpt", "value": "1, 2, 3, 4, 5."}]},
    ]


@pytest.fixture(scope="module")
def qwen2():
    return th.converted("internvl2_qwen2")


@pytest.fixture
def dataset(qwen2, tmp_path):
    _, processor = th.load(qwen2)
    path = th.write_jsonl(tmp_path / "d.jsonl", _rows(tmp_path))
    return InternVLXDataset(str(path), processor, progress=False)


def _label_counts(dataset):
    collator = InternVLXDataCollator(dataset.processor)
    return [int(collator([dataset[i]])["labels"].ne(IGNORE_INDEX).sum()) for i in range(len(dataset))]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_collator_weighs_each_sample_by_its_labelled_tokens(dataset, packing):
    items = [dataset[i] for i in range(len(dataset))]
    counts = _label_counts(dataset)
    assert len(set(counts)) == 3
    plain = InternVLXDataCollator(dataset.processor, packing=packing)(items)
    assert "loss_weight" not in plain  # token: the Trainer's own loss, nothing added
    for mode in ("sample", "square"):
        batch = InternVLXDataCollator(dataset.processor, packing=packing, loss_reduction=mode)(items)
        assert batch["labels"].tolist() == plain["labels"].tolist()
        weights, labels = batch["loss_weight"], batch["labels"]
        assert weights.dtype == torch.float32 and weights.shape == labels.shape
        assert torch.all(weights[labels == IGNORE_INDEX] == 0)
        if packing:  # each packed sample is a sample: its labelled tokens share its weight
            lengths = [int(InternVLXDataCollator(dataset.processor)([item])["input_ids"].shape[1]) for item in items]
            segments = torch.split(torch.arange(labels.shape[1]), lengths)
        else:
            segments = [None] * len(items)
        for row, (count, segment) in enumerate(zip(counts, segments)):
            w = weights[0, segment] if packing else weights[row]
            lab = labels[0, segment] if packing else labels[row]
            expected = torch.tensor(WEIGHT[mode](count), dtype=torch.float32)
            assert torch.all(w[lab != IGNORE_INDEX] == expected) and int((lab != IGNORE_INDEX).sum()) == count
    with pytest.raises(ValueError, match=r"loss_reduction must be one of \['token', 'sample', 'square'\], got 'mean'"):
        InternVLXDataCollator(dataset.processor, loss_reduction="mean")


def _definition(qwen2, dataset, mode):
    """sum_s w(n_s) * n_s * L_s / sum_s w(n_s) * n_s, with L_s the model's own mean loss on sample s alone."""
    model, processor = th.load(qwen2)
    collator = InternVLXDataCollator(processor)
    numerator = denominator = 0.0
    with torch.no_grad():
        for i, count in enumerate(_label_counts(dataset)):
            loss = model(**collator([dataset[i]])).loss.item()
            numerator += WEIGHT[mode](count) * count * loss
            denominator += WEIGHT[mode](count) * count
    return numerator / denominator


def _train_one_step(qwen2, dataset, tmp_path, mode, packing, batch_size, accumulation):
    model, processor = th.load(qwen2)
    args = th.training_args(tmp_path / f"{mode}-{packing}-{batch_size}", max_steps=1, optim="sgd",
                            learning_rate=0.5, per_device_train_batch_size=batch_size,
                            gradient_accumulation_steps=accumulation)
    trainer = InternVLXTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                               data_collator=InternVLXDataCollator(processor, packing=packing, loss_reduction=mode))
    trainer.train()
    return th.losses(trainer)[0], th.snapshot(model)


@pytest.mark.parametrize("mode", ["token", "sample", "square"])
def test_the_trainer_loss_is_the_definition_padded_packed_and_accumulated(qwen2, dataset, tmp_path, mode):
    expected = _definition(qwen2, dataset, mode)
    # The three reductions really differ on these samples.
    assert len({round(_definition(qwen2, dataset, m), 4) for m in WEIGHT}) == 3
    one_batch, weights = _train_one_step(qwen2, dataset, tmp_path, mode, False, 3, 1)
    assert one_batch == pytest.approx(expected, abs=1e-5)
    # Packed: each packed sample is a sample.
    packed, packed_weights = _train_one_step(qwen2, dataset, tmp_path, mode, True, 3, 1)
    assert packed == pytest.approx(expected, abs=1e-5)
    # Gradient accumulation over three batches of one: the weights are normalised over the whole step, so the
    # loss and the update are those of the single batch.
    accumulated, accumulated_weights = _train_one_step(qwen2, dataset, tmp_path, mode, False, 1, 3)
    assert accumulated == pytest.approx(expected, abs=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(accumulated_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(packed_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_weights_reach_the_model_only_through_the_trainer(dataset):
    """Any other trainer would pass loss_weight to the model's forward, where it would vanish in **kwargs."""
    model, processor = th.load(th.converted("internvl2_qwen2"))
    batch = InternVLXDataCollator(processor, loss_reduction="sample")([dataset[0]])
    with pytest.raises(ValueError, match=r"loss_weight \(from InternVLXDataCollator\(loss_reduction='sample' / "
                                         r"'square'\)\) is applied by internvlx_hf.training.InternVLXTrainer"):
        model(**batch)
