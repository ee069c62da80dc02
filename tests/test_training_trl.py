"""TRL: SFTTrainer trains a converted checkpoint on messages + images rows, with our collator and with TRL's own."""

from __future__ import annotations

import pytest
from PIL import Image

import training_helpers as th
from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator

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
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        # TRL turns checkpointing on by default under its old name, which transformers 5.23 warns about; the new name
        # says the same without the FutureWarning (off for the other run to save time)
        gradient_checkpointing=False, activation_checkpointing=collator == "internvlx",
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
