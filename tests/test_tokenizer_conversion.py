"""The converted tokenizers give the reference ids: the fixture prompts, and sentencepiece on many strings."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch

import golden
from conftest import require_fixture
from internvlx_hf.conversion import ConversionError
from internvlx_hf.conversion.tokenizer import convert_tokenizer, sentencepiece_to_tokenizers
from internvlx_hf.processing import get_chat_template
from internvlx_hf.processing.chat_templates import parse_chat_template

FIXTURES = ["internvl2_internlm2", "internvl2_qwen2", "internvlx_pvtc"]


def reference_ids(name: str) -> tuple[str, list[int]]:
    reference = golden.model_reference(name)
    return reference.prompt, reference.input_ids[0].tolist()


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_prompt_ids(name, tmp_path):
    """The full fixture prompt (1000+ tokens: special tokens, byte fallback, image tokens) encodes id for id,
    before and after a save/load round trip through AutoTokenizer."""
    from transformers import AutoTokenizer

    prompt, ids = reference_ids(name)
    converted = convert_tokenizer(require_fixture(name), chat_template=None)
    assert converted.tokenizer(prompt)["input_ids"] == ids
    converted.tokenizer.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    assert not (tmp_path / "tokenizer.model").exists()  # no sentencepiece / remote code needed to load it
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(prompt)["input_ids"] == ids
    assert len(reloaded) == len(converted.tokenizer)


def test_internlm2_special_tokens_and_template(tmp_path):
    from transformers import AutoTokenizer

    src = require_fixture("internvl2_internlm2")
    config = json.loads((src / "tokenizer_config.json").read_text())
    tokenizer = convert_tokenizer(src, chat_template=get_chat_template("internlm2-chat")).tokenizer
    for index, token in config["added_tokens_decoder"].items():
        assert tokenizer.convert_tokens_to_ids(token["content"]) == int(index)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "</s>", "<unk>")
    assert len(tokenizer) == 815
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.chat_template == get_chat_template("internlm2-chat", tokenizer)  # with its BOS, `<s>`
    assert parse_chat_template(reloaded.chat_template) == ("Hermes-2", "<s>")
    prompt = reloaded.apply_chat_template([{"role": "user", "content": "<image>\nhi"}], tokenize=False,
                                          add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\n<image>\nhi<|im_end|><|im_start|>assistant\n")
    # the documented quirks of the slow tokenizer
    assert reloaded.convert_ids_to_tokens(reloaded("<|im_start|>system")["input_ids"]) == [
        "<s>", "<|im_start|>", "▁s", "y", "st", "em"]
    assert reloaded.convert_ids_to_tokens(reloaded("</img>\n", add_special_tokens=False)["input_ids"]) == [
        "</img>", "▁", "<0x0A>"]


# ------------------------------------------------------------------------------------- against sentencepiece itself


def slow_reference_encode(sp, added: dict[str, int], text: str) -> list[int]:
    """What InternLM2Tokenizer (slow) does: split at added tokens, sentencepiece-encode every other chunk on its own
    (each gets the dummy prefix), prepend BOS. ``added`` maps each added token to its id (from the config: tokens
    beyond the sentencepiece vocabulary have no sentencepiece id)."""
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [sp.bos_id()]
    for chunk in re.split(pattern, text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            ids += sp.encode(chunk)
    return ids


def random_strings(added: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" .,;:!?'\"()[]{}<>|/\\-_+=*&^%$#@~`")
        + [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "▁", "▁▁"]
        + list("你好世界书生多模态大模型éèüßøñç") + ["😀", "🚀", "👍🏽", "\u200b", "\x00", "\x7f"]
        + ["the", " the", "ing", " image", "Please", " describe", "123", "2024", "3.14", "InternVL"]
    )
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 14)):
            parts.append(rng.choice(added) if rng.random() < 0.12 else rng.choice(pieces))
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("name", ["internvl2_internlm2", "internvlx_pvtc"])
def test_matches_sentencepiece_on_many_strings(name):
    spm = pytest.importorskip("sentencepiece")
    src = require_fixture(name)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    added = {token["content"]: int(index) for index, token in config["added_tokens_decoder"].items()}
    tokenizer = convert_tokenizer(src, chat_template=None).tokenizer
    edge_cases = ["", " ", "  ", "\n", " hello", "hello ", "  two  spaces  ", "<|im_end|> <|im_start|>", "<s>",
                  "a<s>b", "<|im_start|> system", "</img>\n", "x\n\n\ny", "1234567890", "▁", " ▁ ", "😀 emoji",
                  "中文 and English"]
    mismatches = []
    for text in edge_cases + random_strings(list(added), 600, seed=1234):
        expected = slow_reference_encode(sp, added, text)
        got = tokenizer(text)["input_ids"]
        if got != expected:
            mismatches.append((text, got, expected))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"


def test_non_legacy_llama_mode_prefixes_only_the_text_start():
    """LlamaTokenizer(legacy=False), e.g. Phi-3: one dummy prefix at the start, none after special tokens."""
    src = require_fixture("internvl2_internlm2")
    config = json.loads((src / "tokenizer_config.json").read_text())
    added = {int(i): t for i, t in config["added_tokens_decoder"].items()}
    backend = sentencepiece_to_tokenizers(src / "tokenizer.model", added, legacy=False)
    tokens = backend.encode("system<|im_start|>system").tokens
    assert tokens[:2] == ["<s>", "▁s"]
    assert tokens[tokens.index("<|im_start|>") + 1] == "s"


def test_added_token_id_gap_is_an_error(tmp_path):
    src = require_fixture("internvl2_internlm2")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(src / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["820"] = config["added_tokens_decoder"].pop("814")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="without gaps"):
        convert_tokenizer(tmp_path, chat_template=None)


def test_qwen2_passes_through_unchanged():
    src = require_fixture("internvl2_qwen2")
    prompt, ids = reference_ids("internvl2_qwen2")
    converted = convert_tokenizer(src, chat_template=None)
    assert "unchanged" in converted.kind
    assert converted.tokenizer(prompt)["input_ids"] == ids  # no BOS, as the reference
    assert converted.tokenizer.eos_token == "<|im_end|>"
    assert torch.tensor(ids)[0].item() == converted.tokenizer.convert_tokens_to_ids("<|im_start|>")
