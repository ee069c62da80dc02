"""InternVLXProcessor: prompt expansion, padding, chat templates, decoding, save/load (also as remote code)."""

import hashlib
import json
import sys
import textwrap

import pytest
import torch
import golden
from conftest import remote_code_imports, require_fixture, run_isolated_python
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from internvlx_hf.processing import (
    CHAT_TEMPLATES,
    InternVLXImageProcessor,
    InternVLXProcessor,
    get_chat_template,
)
from internvlx_hf.processing.chat_templates import turn_end_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
PAD, IM_START, IM_END, IMG, END_IMG, CTX = range(256, 262)


def byte_tokenizer():
    """A tiny byte-level tokenizer: token id == byte value for text, specials are 256..261 in SPECIALS order."""
    from transformers import PreTrainedTokenizerFast

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_to_char, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            byte_to_char[byte] = chr(byte)
        else:
            byte_to_char[byte] = chr(256 + extra)
            extra += 1
    backend = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def image_tokens(tiles: int, seq: int) -> list[int]:
    return [IMG] + [CTX] * (tiles * seq) + [END_IMG]


def make_processor(image_seq_length=2, **image_options):
    return InternVLXProcessor(
        InternVLXImageProcessor(**image_options), byte_tokenizer(), image_seq_length=image_seq_length
    )


def solid(width, height, value=128):
    return Image.new("RGB", (width, height), (value, value, value))


WIDE = solid(896, 448)  # ratio grid 2x1 -> 3 tiles with the thumbnail
SQUARE = solid(448, 448)  # 1x1 -> 1 tile
PAGE = solid(900, 1200)  # 3x4 at max 12 -> 13 tiles; 2x3 at max 6 -> 7 tiles


# --- prompt expansion ------------------------------------------------------------------------------------------


def test_one_image_is_expanded_in_place():
    processor = make_processor()
    out = processor(text="<image>\nhi", images=WIDE, return_tensors="pt")
    assert out["input_ids"].tolist() == [image_tokens(3, 2) + ids("\nhi")]
    assert out["attention_mask"].tolist() == [[1] * (8 + 3)]
    assert out["num_patches"].tolist() == [3] and out["tile_grid"].tolist() == [[2, 1]]
    assert out["pixel_values"].shape == (3, 3, 448, 448)
    assert processor.image_token == "<IMG_CONTEXT>" and processor.image_token_id == CTX
    assert sorted(out.keys()) == ["attention_mask", "input_ids", "num_patches", "pixel_values", "tile_grid"]


def test_two_images_in_one_prompt_keep_their_order():
    processor = make_processor(image_seq_length=3)
    out = processor(text="A <image> B <image>", images=[SQUARE, WIDE], return_tensors="pt")
    expected = ids("A ") + image_tokens(1, 3) + ids(" B ") + image_tokens(3, 3)
    assert out["input_ids"].tolist() == [expected]
    assert out["num_patches"].tolist() == [1, 3]
    wide_alone = processor.image_processor(WIDE, return_tensors="pt")["pixel_values"]
    assert torch.equal(out["pixel_values"][1:], wide_alone)


def test_batch_with_different_tile_counts_is_left_padded():
    processor = make_processor(image_seq_length=1)
    prompts = ["<image>x", "y<image><image>z"]
    flat = processor(text=prompts, images=[PAGE, SQUARE, WIDE], padding=True, return_tensors="pt")
    nested = processor(text=prompts, images=[[PAGE], [SQUARE, WIDE]], padding=True, return_tensors="pt")
    first = image_tokens(13, 1) + ids("x")  # 16 tokens
    second = ids("y") + image_tokens(1, 1) + image_tokens(3, 1) + ids("z")  # 10 tokens
    assert flat["input_ids"].tolist() == [first, [PAD] * 6 + second]
    assert flat["attention_mask"].tolist() == [[1] * 16, [0] * 6 + [1] * 10]
    assert flat["num_patches"].tolist() == [13, 1, 3]
    assert flat["tile_grid"].tolist() == [[3, 4], [1, 1], [2, 1]]
    assert flat["pixel_values"].shape == (17, 3, 448, 448)
    for key in flat:
        assert torch.equal(flat[key], nested[key]), key


def test_a_batch_is_left_padded_by_default():
    """`processor(text=[p1, p2], images=[a, b], return_tensors="pt")` as docs/processing.md shows it: no
    `padding=True` needed; `padding=False` keeps each prompt's length (lists only)."""
    processor = make_processor(image_seq_length=1)
    prompts = ["<image>x", "y<image><image>z"]
    default = processor(text=prompts, images=[PAGE, SQUARE, WIDE], return_tensors="pt")
    explicit = processor(text=prompts, images=[PAGE, SQUARE, WIDE], padding=True, return_tensors="pt")
    assert default.keys() == explicit.keys()
    for key in default:
        assert torch.equal(default[key], explicit[key]), key
    assert default["attention_mask"].tolist() == [[1] * 16, [0] * 6 + [1] * 10]
    unpadded = processor(text=prompts, images=[PAGE, SQUARE, WIDE], padding=False)
    assert [len(row) for row in unpadded["input_ids"]] == [16, 10]
    assert processor(text="<image>x", images=PAGE)["input_ids"] == [image_tokens(13, 1) + ids("x")]  # one prompt


def test_padding_side_can_be_overridden():
    processor = make_processor(image_seq_length=1)
    assert processor.tokenizer.padding_side == "left"
    right = processor(text=["<image>", "ab"], images=[SQUARE], padding=True, padding_side="right", return_tensors="pt")
    assert right["input_ids"].tolist() == [image_tokens(1, 1), ids("ab") + [PAD]]
    processor.tokenizer.padding_side = "right"
    again = processor(text=["<image>", "ab"], images=[SQUARE], padding=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], right["input_ids"])


def test_image_options_can_be_overridden_per_call():
    processor = make_processor(image_seq_length=1)
    assert processor(text="<image>", images=PAGE)["input_ids"] == [image_tokens(13, 1)]
    assert processor(text="<image>", images=PAGE, max_tiles=6)["input_ids"] == [image_tokens(7, 1)]
    assert processor(text="<image>", images=PAGE, tiling="none")["input_ids"] == [image_tokens(1, 1)]
    # edge: ceil(900/448) * ceil(1200/448) = 9 -> a 2x3 grid + thumbnail
    edge = processor(text="<image>", images=PAGE, tiling="edge", return_tensors="pt")
    assert edge["num_patches"].tolist() == [7] and edge["tile_grid"].tolist() == [[2, 3]]
    assert processor(text="<image>", images=PAGE, images_kwargs={"max_tiles": 2})["num_patches"] == [3]
    assert processor.image_processor.max_tiles == 12


def test_text_only_and_images_only():
    processor = make_processor()
    assert processor(text="plain")["input_ids"] == [ids("plain")]
    only_images = processor(images=[WIDE, SQUARE], return_tensors="pt")
    assert only_images["num_patches"].tolist() == [3, 1] and "input_ids" not in only_images


def test_image_count_mismatch_errors_give_both_counts():
    processor = make_processor()
    with pytest.raises(ValueError, match=r"The text has 2 `<image>` tag\(s\) \(per prompt: \[1, 1\]\) but 1 image"):
        processor(text=["<image>a", "<image>b"], images=[SQUARE])
    with pytest.raises(ValueError, match=r"The text has 0 `<image>` tag\(s\) \(per prompt: \[0\]\) but 1 image"):
        processor(text="no tag", images=SQUARE)
    with pytest.raises(ValueError, match=r"The text has 1 `<image>` tag\(s\) but no images were passed"):
        processor(text="<image>")
    with pytest.raises(ValueError, match=r"\(\[2, 0\] images for 2 prompt\(s\)\) but the prompts have \[1, 1\] `<image>`"):
        processor(text=["<image>a", "<image>b"], images=[[SQUARE, SQUARE], []])


def test_truncation_that_cuts_image_tokens_is_an_error():
    processor = make_processor()
    with pytest.raises(ValueError, match="truncation"):
        processor(text="<image>", images=WIDE, truncation=True, max_length=4)


def test_tokenizer_without_image_tokens_is_rejected():
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match=r"lacks the image tokens \['<img>', '</img>', '<IMG_CONTEXT>'\]"):
        InternVLXProcessor(InternVLXImageProcessor(), PreTrainedTokenizerFast(tokenizer_object=backend))


def test_num_visual_tokens():
    processor = InternVLXProcessor(InternVLXImageProcessor(max_tiles=6), byte_tokenizer())
    sizes = [(1000, 747), (80, 20), (345, 372), (900, 300)]
    assert processor.num_visual_tokens(sizes) == [7 * 256, 5 * 256, 1 * 256, 4 * 256]
    assert processor.num_visual_tokens(sizes, tiling="area") == [5 * 256, 256, 256, 3 * 256]
    assert processor.num_visual_tokens(sizes, tiling="edge") == [7 * 256, 256, 256, 4 * 256]
    assert processor.num_visual_tokens([(1000, 747)], max_tiles=12, image_seq_length=64) == [13 * 64]


# --- reference parity (Qwen2 fixture) --------------------------------------------------------------------------


def qwen2_processor():
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast.from_pretrained(require_fixture("internvl2_qwen2"))
    return InternVLXProcessor(InternVLXImageProcessor(), tokenizer, chat_template=get_chat_template("Hermes-2"))


@pytest.mark.fixtures
def test_qwen2_reference_prompt_ids_and_pixels():
    golden_ref = golden.model_reference("internvl2_qwen2")
    reference = golden_ref.meta
    processor = qwen2_processor()
    image = require_fixture("images", "img6.jpg")
    out = processor(text=reference["prompt_with_image_tag"], images=image, max_tiles=6, return_tensors="pt")
    assert torch.equal(out["input_ids"], golden_ref.input_ids)
    assert torch.equal(out["attention_mask"], golden_ref.attention_mask)
    golden_ref.pixels.assert_equal(out["pixel_values"])
    assert hashlib.sha256(out["pixel_values"].numpy().tobytes()).hexdigest() == reference["preprocess"][
        "pixel_values_sha256"
    ]
    assert out["num_patches"].tolist() == [3] and out["tile_grid"].tolist() == [[2, 1]]
    assert int((out["input_ids"] == processor.image_token_id).sum()) == reference["num_image_context_tokens"]
    assert processor.image_token_id == reference["img_context_token_id"]

    # The same through apply_chat_template(tokenize=True), the image given in the message.
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": reference["question"]}],
        }
    ]
    chat = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"max_tiles": 6},
    )
    assert torch.equal(chat["input_ids"], golden_ref.input_ids)
    assert torch.equal(chat["pixel_values"], out["pixel_values"])


# --- chat templates ---------------------------------------------------------------------------------------------


@pytest.mark.fixtures
@pytest.mark.parametrize("fixture", ["internvl2_qwen2", "internvl2_internlm2", "internvlx_pvtc"])
def test_chat_templates_reproduce_reference_prompts(fixture):
    reference = json.loads(require_fixture(fixture, "reference.json").read_text())
    template = get_chat_template(reference["template"])
    processor = InternVLXProcessor(InternVLXImageProcessor(), byte_tokenizer(), chat_template=template)
    as_items = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": reference["question"]}]}]
    as_string = [{"role": "user", "content": reference["question_as_sent"]}]
    for messages in (as_items, as_string):
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt == reference["prompt_with_image_tag"]
    # The model's chat() renders string contents through the tokenizer's own apply_chat_template.
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    assert tokenizer.apply_chat_template(as_string, add_generation_prompt=True, tokenize=False) == reference[
        "prompt_with_image_tag"
    ]
    assert reference["system_message"] in reference["prompt_with_image_tag"]
    # The processor's expansion gives the exact string the reference tokenized (the byte tokenizer is lossless).
    tiling = "edge" if "RVTC edge" in reference["preprocess"]["function"] else "ratio"
    image = require_fixture(fixture, reference["image"]["file"])
    out = processor(text=reference["prompt_with_image_tag"], images=image, max_tiles=6, tiling=tiling)
    assert out["num_patches"] == [reference["preprocess"]["num_patches"]]
    assert processor.tokenizer.decode(out["input_ids"][0]) == reference["prompt"]


def test_chatml_template_system_history_and_multiple_images():
    template = get_chat_template("internlm2-chat")
    assert template == get_chat_template("Hermes-2")
    processor = InternVLXProcessor(InternVLXImageProcessor(), byte_tokenizer(), chat_template=template)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And these?"}]},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\n<image>\n<image>\nAnd these?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": "q"}]) == (
        "<|im_start|>system\n<|im_end|><|im_start|>user\nq<|im_end|>"
    )


def test_default_template_and_other_internvl_templates():
    processor = make_processor()
    assert processor.chat_template == CHAT_TEMPLATES["internlm2-chat"]
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    system = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    system_2_5 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    expected = {
        "Hermes-2": f"<|im_start|>system\n{system}<|im_end|><|im_start|>user\nq1<|im_end|>"
        "<|im_start|>assistant\na1<|im_end|><|im_start|>user\nq2<|im_end|><|im_start|>assistant\n",
        "phi3-chat": f"<|system|>\n{system}<|end|><|user|>\nq1<|end|><|assistant|>\na1<|end|>"
        "<|user|>\nq2<|end|><|assistant|>\n",
        "internvl2_5": f"<|im_start|>system\n{system_2_5}<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n",
    }
    for name, prompt in expected.items():
        template = get_chat_template(name)
        rendered = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
        assert rendered == prompt, name
    # The end-of-turn marker that conversion, the processor's decoding and `internvlx chat` stop at.
    ends = {name: turn_end_text(processor.apply_chat_template, chat_template=get_chat_template(name))
            for name in CHAT_TEMPLATES}
    assert ends == {"Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>",
                    "internvl2_5": "<|im_end|>"}
    assert turn_end_text(processor.apply_chat_template, chat_template="{{ messages[0]['content'] }}") == ""
    assert sorted(CHAT_TEMPLATES) == ["Hermes-2", "internlm2-chat", "internvl2_5", "phi3-chat"]
    with pytest.raises(ValueError, match=r"Unknown InternVL chat template 'vicuna'; known templates: 'Hermes-2'"):
        get_chat_template("vicuna")
    with pytest.raises(Exception, match="support only text, image and video content, got audio"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])


# --- decoding ---------------------------------------------------------------------------------------------------


def test_decoding_strips_the_prompt_and_the_end_of_turn():
    processor = make_processor()
    prompt = processor.apply_chat_template([{"role": "user", "content": "<image>\nhi"}], add_generation_prompt=True)
    encoded = processor(text=[prompt, prompt], images=[SQUARE, SQUARE], padding=True, return_tensors="pt")
    replies = [ids("a cat") + [IM_END, PAD], ids("two") + [IM_END, IM_END, PAD, PAD]]
    generated = torch.cat([encoded["input_ids"], torch.tensor(replies)], dim=1)
    assert processor.batch_decode(generated, skip_special_tokens=True) == ["a cat", "two"]
    assert processor.batch_decode(generated) == ["a cat", "two"]
    assert processor.post_process_image_text_to_text(generated) == ["a cat", "two"]
    assert processor.decode(generated[0]) == "a cat"
    # Only the new tokens (no prompt) are handled too.
    assert processor.batch_decode([ids("ok") + [IM_END]]) == ["ok"]
    assert processor.post_process_image_text_to_text(torch.tensor(ids("ok"))) == ["ok"]


# --- save / load --------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    processor = InternVLXProcessor(
        InternVLXImageProcessor(tiling="edge", max_tiles=6),
        byte_tokenizer(),
        chat_template=get_chat_template("phi3-chat"),
        image_seq_length=4,
    )
    processor.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert {"processing_internvlx.py", "image_processing_internvlx.py", "chat_templates.py"} <= files
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json"} <= files
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_internvlx.InternVLXProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_internvlx.InternVLXImageProcessor"
    )
    assert config["image_seq_length"] == 4 and config["image_processor"]["tiling"] == "edge"

    loaded = InternVLXProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == 4 and loaded.image_processor.max_tiles == 6
    assert loaded.chat_template == get_chat_template("phi3-chat")
    assert loaded.tokenizer.padding_side == "left"
    inputs = dict(text=["<image>a", "b<image>"], images=[PAGE, WIDE], padding=True, return_tensors="pt")
    expected, got = processor(**inputs), loaded(**inputs)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_remote_code_round_trip_in_a_fresh_interpreter(tmp_path):
    processor = InternVLXProcessor(
        InternVLXImageProcessor(tiling="area", max_tiles=6), byte_tokenizer(), image_seq_length=2
    )
    checkpoint = tmp_path / "checkpoint"
    processor.save_pretrained(checkpoint)
    image_path = tmp_path / "page.png"
    PAGE.save(image_path)
    inputs = dict(text=["<image>a", "b"], images=[str(image_path)], padding=True, return_tensors="pt")
    expected = processor(**inputs)
    code = textwrap.dedent(
        f"""
        import hashlib, json
        from transformers import AutoProcessor
        # from its module: `from transformers import AutoImageProcessor` is a placeholder demanding torchvision on
        # transformers 5.16-5.17 (docs/testing.md, "transformers releases")
        from transformers.models.auto.image_processing_auto import AutoImageProcessor
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        out = processor(**{inputs!r})
        print(json.dumps({{
            "processor": type(processor).__module__ + "." + type(processor).__name__,
            "image_processor": type(image_processor).__name__,
            "tiling": processor.image_processor.tiling.value,
            "input_ids": out["input_ids"].tolist(),
            "attention_mask": out["attention_mask"].tolist(),
            "num_patches": out["num_patches"].tolist(),
            "tile_grid": out["tile_grid"].tolist(),
            "pixels": hashlib.sha256(out["pixel_values"].numpy().tobytes()).hexdigest(),
            "prompt": processor.apply_chat_template([{{"role": "user", "content": "q"}}], add_generation_prompt=True),
        }}))
        """
    )
    result = run_isolated_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["processor"].startswith("transformers_modules.") and got["processor"].endswith(".InternVLXProcessor")
    assert got["image_processor"] == "InternVLXImageProcessor" and got["tiling"] == "area"
    assert got["input_ids"] == expected["input_ids"].tolist()
    assert got["attention_mask"] == expected["attention_mask"].tolist()
    assert got["num_patches"] == expected["num_patches"].tolist() == [7]  # area: ceil(900*1200/448^2) = 6 -> 2x3
    assert got["tile_grid"] == expected["tile_grid"].tolist() == [[2, 3]]
    assert got["pixels"] == hashlib.sha256(expected["pixel_values"].numpy().tobytes()).hexdigest()
    prompt = processor.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True)
    assert got["prompt"] == prompt


def test_checkpoint_code_imports_only_stdlib_torch_transformers_and_siblings(tmp_path):
    make_processor().save_pretrained(tmp_path)
    for name in ("processing_internvlx", "image_processing_internvlx", "chat_templates"):
        imports = remote_code_imports(tmp_path / f"{name}.py")
        allowed = {".", "torch", "transformers"} | ({"PIL"} if name == "image_processing_internvlx" else set())
        outside = {module for module in imports - allowed if module not in sys.stdlib_module_names}
        assert not outside, f"{name}.py imports {sorted(outside)}"
    assert "." in remote_code_imports(tmp_path / "processing_internvlx.py")  # siblings, single-dot relative


def test_auto_processor_for_the_installed_package(tmp_path):
    import internvlx_hf  # noqa: F401  (importing the package registers the classes with the Auto API)
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    assert InternVLXProcessor in PROCESSOR_MAPPING._extra_content.values()
    processor = make_processor()
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is InternVLXProcessor
    assert loaded(text="<image>", images=SQUARE)["input_ids"] == [image_tokens(1, 2)]


def test_from_pretrained_takes_a_given_tokenizer(tmp_path):
    """`from_pretrained(folder, tokenizer=...)` uses the tokenizer it is given, also where the folder has none (vLLM
    passes the tokenizer its `--tokenizer` names)."""
    make_processor(max_tiles=3).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    tokenizer = byte_tokenizer()
    loaded = InternVLXProcessor.from_pretrained(tmp_path, tokenizer=tokenizer)
    assert loaded.tokenizer is tokenizer and loaded.image_processor.max_tiles == 3
