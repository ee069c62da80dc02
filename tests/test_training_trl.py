"""TRL: SFTTrainer trains a converted checkpoint on messages + images rows, with our collator and with TRL's own."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import training_helpers as th
from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator
from internvlx_hf.training.arguments import checkpointing_renames

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _rows(folder):
    rows = th.colour_rows(folder, 4)
    return datasets.Dataset.from_list([{
        "images": [Image.open(folder / row["image"])],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question["value"]}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer["value"]}]}],
    } for row in rows for question, answer in [row["conversations"]]])


@pytest.mark.parametrize("collator", ["internvlx", "trl-default"])
def test_sft_trainer_trains_a_converted_checkpoint(collator, tmp_path):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = _rows(tmp_path)
    # TRL turns checkpointing on by default under its old name, which transformers 5.23 warns about; the new name
    # says the same without the FutureWarning (off for the other run to save time). Before 5.23 only the old exists.
    checkpointing = collator == "internvlx"
    checkpointing = ({"gradient_checkpointing": checkpointing} if checkpointing_renames()
                     else {"gradient_checkpointing": False, "activation_checkpointing": checkpointing})
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, **checkpointing,
    )
    data_collator = InternVLXDataCollator(processor) if collator == "internvlx" else None
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                             data_collator=data_collator)
    batch = trainer.data_collator([rows[0], rows[1]])
    assert batch["pixel_values"].shape == (2, 3, 448, 448)
    labelled = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
    if collator == "internvlx":
        # only "It is red.<|im_end|>" / "It is green.<|im_end|>" are learned
        replies = [processor.tokenizer(f"It is {c}.<|im_end|>", add_special_tokens=False)["input_ids"]
                   for c in ("red", "green")]
        assert labelled == [len(r) for r in replies]
    else:
        assert type(trainer.data_collator).__name__ == "DataCollatorForVisionLanguageModeling"
        assert labelled == batch["attention_mask"].sum(1).tolist()  # TRL labels every token (labels=input_ids)
    trainer.train()
    losses = th.losses(trainer)
    assert len(losses) == 2 and losses[-1] < losses[0]
    # TRL's token metrics are reported (TRL >= 1.x computes them in its own fused LM head, older releases from the
    # logits, which the model's forward returns in full unless it is called with skip_logits=True)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(0.0 <= entry["mean_token_accuracy"] <= 1.0 and entry["entropy"] > 0.0 for entry in logged)


def _fused_head():
    add_fused_lm_head = getattr(trl.trainer.utils, "add_fused_lm_head", None)
    if add_fused_lm_head is None:
        pytest.skip(f"TRL {trl.__version__} has no fused LM head (trl.trainer.utils.add_fused_lm_head, in 1.16.0; "
                    "its SFTTrainer reads the logits)")
    return add_fused_lm_head


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_trl_fused_lm_head_does_not_learn_image_placeholders(wrap, tmp_path):
    """TRL's fused LM head replaces the model's forward and reads the labels as given; with TRL's default collator
    (labels = input_ids) the model still leaves `<img>`, `<IMG_CONTEXT>` and `</img>` out of the loss, as its own
    loss does, with and without a PEFT adapter around it."""
    add_fused_lm_head = _fused_head()
    model, processor = th.load(th.converted("internvl2_qwen2"))
    model.eval()
    rows = _rows(tmp_path)
    collator = trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling(processor)
    batch = collator([rows[0]])
    assert torch.equal(batch["labels"], batch["input_ids"])  # TRL labels every token, placeholders included
    placeholders = torch.isin(batch["labels"], torch.tensor(model.placeholder_label_ids()))
    assert int(placeholders.sum()) == 258  # <img>, 256 x <IMG_CONTEXT>, </img>
    replies_only = batch["labels"].masked_fill(placeholders, IGNORE_INDEX)
    with torch.no_grad():
        expected = model(**{**batch, "labels": replies_only}).loss
    add_fused_lm_head(model)
    if wrap == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True)
        own = model(**batch)  # the model's forward with its full logits
        lean = model(**batch, skip_logits=True)
    assert int(fused.label_mask.sum()) == int((replies_only[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(own.loss, expected)
    torch.testing.assert_close(lean.loss, expected)
    # what the fused head computed before the model masked the placeholders for it: every label a target
    every_label = torch.nn.functional.cross_entropy(own.logits[0, :-1].float(), batch["labels"][0, 1:])
    print(f"fused {float(fused.loss):.4f}, every label a target {float(every_label):.4f}")
    assert abs(float(fused.loss) - 7.0577) < 1e-3 and abs(float(every_label) - float(fused.loss)) > 0.1


@pytest.mark.parametrize("call", ["training", "num_items_in_batch"])
def test_a_token_count_that_includes_placeholder_labels_is_named(call, tmp_path, caplog):
    """transformers' Trainer and TRL count the loss's tokens (``num_items_in_batch``) from the batch's labels before
    the model sees them (TRL's fused head divides by that count itself): a count that includes placeholders cannot be
    corrected in the model, so in training, or given a count, it says so once, with the fix."""
    from transformers.utils import logging

    model, processor = th.load(th.converted("internvl2_qwen2"))
    rows = _rows(tmp_path)
    batch = trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling(processor)([rows[0]])
    logger = logging.get_logger("internvlx_hf")
    logger.warning_once.cache_clear()
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING"), torch.no_grad():
            model.eval()
            model(**batch)  # evaluation without a count: nothing to say
            assert "num_items_in_batch" not in caplog.text
            if call == "training":
                model.train()
                model(**batch)
            else:
                model(**batch, num_items_in_batch=torch.tensor(300))
    finally:
        logger.removeHandler(caplog.handler)
    assert "counts them too, so the loss is divided by more tokens than it has" in caplog.text
    assert "data_collator=InternVLXDataCollator(processor)" in caplog.text
