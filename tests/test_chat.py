"""InternVL2-compatible `chat()` / `batch_chat()` on a tiny model with the fixture Qwen2 tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXImageProcessor, InternVLXProcessor
from internvlx_hf.processing import get_chat_template

from conftest import require_fixture


@pytest.fixture(scope="module")
def reference():
    return json.loads(require_fixture("internvl2_qwen2", "reference.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(reference):
    tok = AutoTokenizer.from_pretrained(require_fixture("internvl2_qwen2"))
    tok.chat_template = get_chat_template(reference["template"])
    return tok


@pytest.fixture(scope="module")
def model(reference):
    """448px tiles (256 tokens each, as the fixture prompt), random weights, the fixture's vocabulary."""
    config = InternVLXConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": reference["vocab_size"]},
        image_token_id=reference["img_context_token_id"], projector_type="pvtc", pvtc_num_heads=4,
        lvtc={"expand_layer": 1}, template=reference["template"],
    )
    torch.manual_seed(0)
    return InternVLXForConditionalGeneration(config).eval()


def test_chat_prompt_is_the_reference_prompt(model, tokenizer, reference):
    question = reference["question_as_sent"]
    tiles = reference["preprocess"]["num_patches"]
    assert model._chat_prompt(tokenizer, question, None, [tiles]) == reference["prompt"]


def test_chat_answers_and_keeps_history(model, tokenizer, reference):
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    config = dict(max_new_tokens=5, do_sample=False)
    answer, history = model.chat(tokenizer, pixel_values, reference["question"], config, return_history=True)
    assert isinstance(answer, str)
    assert history == [(reference["question_as_sent"], answer)]
    # the follow-up turn carries the first exchange, as InternVL2's template does
    prompt = model._chat_prompt(tokenizer, "And now?", history, [2])
    assert f"<|im_start|>assistant\n{answer}<|im_end|><|im_start|>user\nAnd now?<|im_end|>" in prompt
    follow_up = model.chat(tokenizer, pixel_values, "And now?", config, history=history)
    assert isinstance(follow_up, str)


def test_chat_accepts_a_processor_like_a_tokenizer(model, tokenizer, reference):
    processor = InternVLXProcessor(InternVLXImageProcessor(), tokenizer, image_seq_length=256)
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    config = dict(max_new_tokens=4, do_sample=False)
    assert model.chat(processor, pixel_values, "Hi?", config) == model.chat(tokenizer, pixel_values, "Hi?", config)


def test_batch_chat_equals_chat_per_question(model, tokenizer):
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(1, 3, 448, 448, generator=g), torch.randn(3, 3, 448, 448, generator=g)]
    questions = ["What is this?", "Describe the picture in detail, please."]
    config = dict(max_new_tokens=6, do_sample=False)
    batch = model.batch_chat(tokenizer, torch.cat(images), questions, config, num_patches_list=[1, 3])
    alone = [model.chat(tokenizer, image, question, config) for image, question in zip(images, questions)]
    assert batch == alone


def test_chat_leaves_the_callers_generation_config_alone(model, tokenizer):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=2, do_sample=False)
    model.chat(tokenizer, torch.zeros(1, 3, 448, 448), "Hi", config)
    assert config.eos_token_id is None and config.pad_token_id is None


def test_chat_rejects_tag_and_image_count_mismatch(model, tokenizer):
    with pytest.raises(ValueError, match=r"prompt has 2 <image> tags but 1 images were given"):
        model.chat(tokenizer, torch.zeros(1, 3, 448, 448), "<image> and <image>?", dict(max_new_tokens=1))


def test_chat_without_a_template_says_how_to_get_one(model, tokenizer):
    bare = AutoTokenizer.from_pretrained(require_fixture("internvl2_qwen2"))
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        model.chat(bare, torch.zeros(1, 3, 448, 448), "Hi", dict(max_new_tokens=1))


def test_chat_stops_at_the_phi3_chat_separator():
    """phi3-chat ends turns with `<|end|>`, not `<|im_end|>`: chat() takes the separator from the template. The model
    is built so that its next token depends on the current one only (layers add nothing; rows of the LM head pick
    the successor): prompt end -> "dog" -> `<|end|>` -> "the" -> ... Stopping at `<|end|>` answers "dog"."""
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(require_fixture("internvl2_phi3"))
    tokenizer.chat_template = get_chat_template("phi3-chat")
    end, dog, the = (tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "▁dog", "▁the"))
    assert tokenizer.convert_ids_to_tokens([dog, the]) == ["▁dog", "▁the"] and end == 807
    config = InternVLXConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        text_config={"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id},
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), template="phi3-chat",
    )
    torch.manual_seed(0)
    model = InternVLXForConditionalGeneration(config).eval()
    prompt = model._chat_prompt(tokenizer, "Hi?", None, [])
    prompt_end = tokenizer(prompt)["input_ids"][-1]
    assert tokenizer.convert_ids_to_tokens(prompt_end) == "<0x0A>"  # "<|assistant|>\n" ends the prompt
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.get_input_embeddings().weight, model.lm_head.weight
        embeddings.zero_()
        head.zero_()
        for dim, (current, successor) in enumerate([(prompt_end, dog), (dog, end), (end, the), (the, the)]):
            embeddings[current, dim] = 1.0
            head[successor, dim] = 1.0
    answer = model.chat(tokenizer, None, "Hi?", dict(max_new_tokens=6, do_sample=False))
    assert answer == "dog"
    # without the separator as eos the same model runs on past <|end|> (skipped when decoding) into "the"
    config = dict(max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    unstopped = model.chat(tokenizer, None, "Hi?", config)
    assert unstopped.startswith("dog") and "the" in unstopped
