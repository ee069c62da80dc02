"""InternVLXDataCollator: label masks from template token boundaries, padding, packing, truncation, broken rows."""

from __future__ import annotations

import logging

import pytest
import torch

import training_helpers as th
from tiny import enable_checkpointing
from internvlx_hf.processing import CHAT_TEMPLATES
from internvlx_hf.training import IGNORE_INDEX, InternVLXDataCollator

# Each template with the tokenizer of the InternVL2 family that uses it (InternVL2.5 reuses Qwen2's tokenizer).
TEMPLATE_TOKENIZERS = {
    "Hermes-2": "internvl2_qwen2",
    "internlm2-chat": "internvl2_internlm2",
    "phi3-chat": "internvl2_phi3",
    "internvl2_5": "internvl2_qwen2",
}
END_OF_TURN = {"Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>",
               "internvl2_5": "<|im_end|>"}


def test_every_template_is_covered():
    assert set(TEMPLATE_TOKENIZERS) == set(CHAT_TEMPLATES)


def _label_blocks(labels: list[int]) -> list[list[int]]:
    blocks, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                blocks.append(current)
            current = []
        else:
            current.append(label)
    return blocks + ([current] if current else [])


@pytest.mark.parametrize("template", sorted(TEMPLATE_TOKENIZERS))
def test_label_mask_multi_turn_multi_image(template, tmp_path):
    _, processor = th.load(th.converted(TEMPLATE_TOKENIZERS[template]))
    processor.chat_template = CHAT_TEMPLATES[template]
    small = th.draw(tmp_path / "a.png", "red")                 # 1 tile
    wide = th.draw(tmp_path / "b.png", "blue", (200, 100))     # 2x1 grid + thumbnail with 2 tiles per image
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with <image>: colours?"}]},
        {"role": "assistant", "content": "Red, then blue."},
        {"role": "user", "content": "And the sizes?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Small and wide."}]},
    ]
    processor.image_processor.max_tiles = 4
    collator = InternVLXDataCollator(processor)  # two images share 4 tiles: 2 each
    batch = collator([{"messages": messages, "images": [str(small), str(wide)]}])

    # The ids are exactly those of the inference path: the template's text through the processor.
    text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                   image_tags_in_text=True)
    reference = processor(text=[text], images=[str(small), str(wide)], max_tiles=2, return_tensors="pt")
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    assert batch["num_patches"].tolist() == [1, 3]
    assert batch["attention_mask"].tolist() == [[1] * batch["input_ids"].shape[1]]

    # Labels: exactly the two replies with their end-of-turn token; nothing of the system/user turns, headers,
    # BOS or the image blocks.
    labels = batch["labels"][0].tolist()
    ids = batch["input_ids"][0].tolist()
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))
    blocks = _label_blocks(labels)
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
    assert [block[-1] for block in blocks] == [end, end]
    assert [processor.tokenizer.decode(block[:-1]) for block in blocks] == ["Red, then blue.", "Small and wide."]
    image_ids = set(processor.image_token_ids)
    assert sum(token in image_ids for token in ids) == 2 * 2 + (1 + 3) * processor.image_seq_length
    assert all(label == IGNORE_INDEX for label, token in zip(labels, ids) if token in image_ids)


def _rows(tmp_path):
    rows = th.colour_rows(tmp_path, 2)
    for row in rows:
        row["image"] = str(tmp_path / row["image"])
    rows.append({"messages": [{"role": "user", "content": "Say hello."},
                              {"role": "assistant", "content": "Hello there, friend."}]})
    return rows


def test_padding_is_right_and_packing_restarts_positions(tmp_path):
    _, processor = th.load(th.converted("internvl2_qwen2"))
    rows = _rows(tmp_path)
    padded = InternVLXDataCollator(processor, pad_to_multiple_of=8)(rows)
    packed = InternVLXDataCollator(processor, packing=True)(rows)
    lengths = padded["attention_mask"].sum(1).tolist()
    width = padded["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(lengths) > width - 8
    pad_id = processor.tokenizer.pad_token_id
    for row, length in enumerate(lengths):
        assert padded["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert padded["input_ids"][row, length:].tolist() == [pad_id] * (width - length)
        assert padded["labels"][row, length:].tolist() == [IGNORE_INDEX] * (width - length)
    assert set(packed) == {"input_ids", "labels", "position_ids", "use_cache", "pixel_values", "num_patches"}
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert packed["input_ids"][0].tolist() == [t for row, n in enumerate(lengths)
                                               for t in padded["input_ids"][row, :n].tolist()]
    assert packed["labels"][0].tolist() == [label for row, n in enumerate(lengths)
                                            for label in padded["labels"][row, :n].tolist()]
    assert padded["num_patches"].tolist() == packed["num_patches"].tolist() == [1, 1]
    # A text-only batch has no pixel_values.
    assert "pixel_values" not in InternVLXDataCollator(processor)(rows[2:])


@pytest.mark.parametrize("fixture, options", [
    ("internvl2_qwen2", {}),
    ("internvl2_internlm2", {"projector": "pvtc", "lvtc": "k=2,T=2"}),
], ids=["plain", "lvtc"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(fixture, options, tmp_path):
    model, processor = th.load(th.converted(fixture, **options))
    model.train()
    rows = _rows(tmp_path)[1:]  # one image row, one text-only row
    padded = InternVLXDataCollator(processor)(rows)
    packed = InternVLXDataCollator(processor, packing=True)(rows)
    results = []
    for batch in (padded, packed):
        if batch is packed and options:  # LVTC: the packed batch also runs with gradient checkpointing
            enable_checkpointing(model)
        model.zero_grad()
        out = model(**batch)
        # LVTC runs its late layers on 4x the visual tokens but returns logits in the input's (short) layout.
        assert out.logits.shape[:2] == batch["input_ids"].shape
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
    (loss_padded, grads_padded), (loss_packed, grads_packed) = results
    torch.testing.assert_close(loss_packed, loss_padded, rtol=0, atol=1e-5)
    assert grads_padded.keys() == grads_packed.keys()
    for name in grads_padded:
        # float32 rounding (summation order) relative to each gradient's size: a converted LVTC model's HR projector
        # starts at zero, and hr_scale=rms (the converter's default) multiplies the gradient into its output layer by
        # rms(LR state) / sqrt(1e-6), about 1000x here; its packed/padded difference stays 6e-7 of its largest entry
        scale = max(1.0, float(grads_padded[name].abs().max()))
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    if options:  # every LVTC projector learns
        assert any(name.startswith("model.lvtc_hr_projector") for name in grads_padded)
        assert any(name.startswith("model.lvtc_lr_projectors.0") for name in grads_padded)


def _blocks_text(processor, labels):
    return [processor.tokenizer.decode(block) for block in _label_blocks(labels)]


def test_over_long_samples_keep_their_head_and_the_replies_in_it(tmp_path, caplog):
    model, processor = th.load(th.converted("internvl2_qwen2"))
    first = str(th.draw(tmp_path / "a.png", "green"))
    second = str(th.draw(tmp_path / "b.png", "blue"))
    messages = [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "And this one? <image>"},
        {"role": "assistant", "content": "Blue, a square drawn on a white background."},
    ]
    row = {"messages": messages, "images": [first, second], "source": "long.jsonl:7"}
    full = InternVLXDataCollator(processor)([row])
    ids, labels = full["input_ids"][0].tolist(), full["labels"][0].tolist()
    img_start, img_end = processor.start_image_token_id, processor.end_image_token_id
    second_start = [i for i, t in enumerate(ids) if t == img_start][1]
    second_end = [i for i, t in enumerate(ids) if t == img_end][1] + 1
    first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert full["num_patches"].tolist() == [1, 1] and second_end - second_start == 256 + 2
    assert _blocks_text(processor, labels) == ["Green.<|im_end|>", "Blue, a square drawn on a white background."
                                                                   "<|im_end|>"]

    # Cut inside the last reply: the head and the reply's first tokens, labels as they were.
    cut = len(ids) - 5
    batch = InternVLXDataCollator(processor, max_length=cut)([row])
    assert batch["input_ids"][0].tolist() == ids[:cut] and batch["labels"][0].tolist() == labels[:cut]
    assert batch["num_patches"].tolist() == [1, 1] and torch.equal(batch["pixel_values"], full["pixel_values"])

    # Cut inside the second image's block: the cut moves before the block, the second image is left out, and the
    # first reply is still learned.
    for max_length in (second_start + 1, second_start + 200, second_end - 1):
        batch = InternVLXDataCollator(processor, max_length=max_length)([row])
        assert batch["input_ids"][0].tolist() == ids[:second_start], max_length
        assert batch["labels"][0].tolist() == labels[:second_start]
        assert _blocks_text(processor, batch["labels"][0].tolist()) == ["Green.<|im_end|>"]
        assert batch["num_patches"].tolist() == [1]
        torch.testing.assert_close(batch["pixel_values"], full["pixel_values"][:1], rtol=0, atol=0)
    # A cut right after the block keeps both images.
    batch = InternVLXDataCollator(processor, max_length=second_end)([row])
    assert batch["input_ids"][0].tolist() == ids[:second_end] and batch["num_patches"].tolist() == [1, 1]
    # The model trains on a batch whose second image was cut away.
    model.train()
    cut_batch = InternVLXDataCollator(processor, max_length=second_start + 1)([row])
    assert torch.isfinite(model(**cut_batch).loss)

    # Cut inside the first reply: the part of it before the cut is learned.
    batch = InternVLXDataCollator(processor, max_length=first_label + 1)([row])
    assert batch["labels"][0].tolist() == labels[:first_label + 1]
    assert sum(label != IGNORE_INDEX for label in batch["labels"][0].tolist()) == 1

    # No reply token before the cut: dropped, with the reason.
    caplog.set_level(logging.WARNING)
    for max_length, cut in ((first_label, first_label), (5, 5)):
        collator = InternVLXDataCollator(processor, max_length=max_length)
        with pytest.raises(ValueError, match="every row of this batch of 1 was dropped"):
            collator([row])
        assert collator.skipped == {"too long": 1}
        assert f"long.jsonl:7: {len(ids)} tokens > max_length {max_length}, and no reply token lies within the " \
               f"first {cut} tokens; raise --max_length" in caplog.text
    image_block = [i for i, t in enumerate(ids) if t == img_start][0]
    collator = InternVLXDataCollator(processor, max_length=image_block + 10)
    other = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    batch = collator([row, other])  # a batch keeps its other rows
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch and collator.skipped == {"too long": 1}
    assert f"no reply token lies within the first {image_block} tokens (the cut moves to {image_block}, before an " \
           "image block)" in caplog.text


def test_broken_rows_are_dropped_with_reasons(tmp_path, caplog):
    _, processor = th.load(th.converted("internvl2_qwen2"))
    image = str(th.draw(tmp_path / "a.png", "red"))
    good = {"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red."}],
            "images": [image]}
    rows = [
        good,
        {**good, "images": [str(tmp_path / "missing.png")], "source": "d.jsonl:2"},
        {**good, "images": [image, image], "source": "d.jsonl:3"},
        {"messages": [{"role": "user", "content": "Only a question?"}], "source": "d.jsonl:4"},
        {"messages": [{"role": "robot", "content": "x"}], "source": "d.jsonl:5"},
    ]
    caplog.set_level(logging.WARNING)
    collator = InternVLXDataCollator(processor)
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 1 and batch["num_patches"].tolist() == [1]
    assert collator.skipped == {"undecodable image": 1, "image count mismatch": 1, "no assistant reply": 1,
                                "unknown role": 1}
    assert "d.jsonl:3: the conversation has 1 <image> tag(s) but 2 image(s)" in caplog.text
    assert "d.jsonl:2: image 0 ('" in caplog.text and "missing.png'): no such file" in caplog.text


def test_a_token_across_a_reply_boundary_is_refused(tmp_path, caplog):
    _, processor = th.load(th.converted("internvl2_qwen2"))
    # A vocabulary entry that spans the end of the assistant header ("...assistant\n") and the reply's first word:
    # string splitting or per-turn token counts would put this token's label on the wrong side.
    processor.tokenizer.add_tokens(["t\nIt"])
    row = {"messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "It is red."}],
           "source": "d.jsonl:9"}
    caplog.set_level(logging.WARNING)
    collator = InternVLXDataCollator(processor)
    with pytest.raises(ValueError, match="was dropped"):
        collator([row])
    assert collator.skipped == {"reply boundary inside a token": 1}
    assert "d.jsonl:9: token 't\\nIt' spans a reply boundary of the rendered template" in caplog.text


# Where our label masks differ from InternVL's preprocess_* on the same InternVL rows (see the fine-tuning docs):
# values are stripped under every template (InternVL strips under internlm2-chat only), and a `gpt` turn before the
# first `human` turn is trained under internvl2_5 (as InternVL2.5's preprocessing does) and dropped under the
# InternVL2 templates (as theirs do).
@pytest.mark.parametrize("template", sorted(TEMPLATE_TOKENIZERS))
def test_internvl_rows_are_stripped_under_every_template(template, tmp_path):
    _, processor = th.load(th.converted(TEMPLATE_TOKENIZERS[template]))
    processor.chat_template = CHAT_TEMPLATES[template]
    image = str(th.draw(tmp_path / "a.png", "red"))
    padded = {"image": image, "conversations": [
        {"from": "system", "value": "  Be brief.\n"}, {"from": "human", "value": "\n What colour?  "},
        {"from": "gpt", "value": "\nRed. \n"}]}
    clean = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "<image>\nWhat colour?"},
                          {"role": "assistant", "content": "Red."}], "images": [image]}
    collator = InternVLXDataCollator(processor)
    batch, reference = collator([padded]), collator([clean])
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
    assert batch["labels"].tolist() == reference["labels"].tolist()
    blocks = _label_blocks(batch["labels"][0].tolist())
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
    assert [(processor.tokenizer.decode(block[:-1]), block[-1]) for block in blocks] == [("Red.", end)]


@pytest.mark.parametrize("template", sorted(TEMPLATE_TOKENIZERS))
def test_a_leading_gpt_turn_is_trained_under_internvl2_5_only(template, tmp_path):
    _, processor = th.load(th.converted(TEMPLATE_TOKENIZERS[template]))
    processor.chat_template = CHAT_TEMPLATES[template]
    row = {"image": str(th.draw(tmp_path / "a.png", "red")), "conversations": [
        {"from": "gpt", "value": "Hello, ask me about the image."}, {"from": "human", "value": "What colour?"},
        {"from": "gpt", "value": "Red."}]}
    batch = InternVLXDataCollator(processor)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[template])
    replies = [(processor.tokenizer.decode(block[:-1]), block[-1]) for block in _label_blocks(labels)]
    text = processor.tokenizer.decode(ids)
    if template == "internvl2_5":
        assert replies == [("Hello, ask me about the image.", end), ("Red.", end)]
        # The image goes to the first human turn, after the leading reply.
        assert text.index("Hello, ask me") < text.index("<img>") < text.index("What colour?")
    else:
        assert replies == [("Red.", end)] and "Hello" not in text
    assert batch["num_patches"].tolist() == [1]
