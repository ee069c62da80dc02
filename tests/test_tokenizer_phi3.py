"""Converted sentencepiece `LlamaTokenizer`s (InternVL2-4B's Phi-3, legacy=False, and legacy=True) against the real
slow tokenizer of transformers 4.37.2: ids, pairs and decoding recorded by ``scripts/make_tokenizer_cases.py`` in
``tests/fixtures/tokenizer_cases/``, the fixture README's worked examples, offsets, and the pad token a source
without one gets."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import pytest

import golden
from conftest import remote_code_imports, run_isolated_python
from internvlx_hf.conversion import ConversionError, convert
from internvlx_hf.conversion.tokenizer import convert_tokenizer
from internvlx_hf.processing import get_chat_template

CASES = golden.fixture_path("tokenizer_cases")  # tests/fixtures/tokenizer_cases (the full fixtures do not have it)
LLAMA_VARIANTS = ["phi3", "phi3_strip", "phi3_legacy", "phi3_legacy_strip"]

# The fixture README's 20 worked examples ("Tokenizer rules"): transformers 4.37.2 LlamaTokenizer, legacy=False.
WORKED_EXAMPLES = [
    ("Hi there", [1, 571, 750, 262, 267]),
    ("<|system|>\nHi", [1, 741, 806, 13, 789, 750]),
    ("<|user|>\nWhat is this?", [1, 741, 810, 13, 781, 748, 286, 285, 261, 480, 772]),
    ("<|system|>", [1, 741, 806]),
    ("<img>Hi", [1, 811, 789, 750]),
    ("<|endoftext|>Hi", [1, 800, 789, 750]),
    ("<s>Hi", [1, 1, 789, 750]),
    ("<unk>Hi", [1, 0, 789, 750]),
    ("</s>Hi", [1, 741, 63, 50, 746, 65, 789, 750]),
    ("Hi<|end|> there", [1, 571, 750, 807, 262, 267]),
    ("Hi <|end|>\nthere", [1, 571, 750, 741, 807, 13, 744, 260, 267]),
    ("<|end|><|assistant|>\n", [1, 741, 807, 801, 13]),
    ("<|system|> Hi", [1, 741, 806, 571, 750]),
    (" Hi", [1, 741, 571, 750]),
    ("\nHi", [1, 741, 13, 789, 750]),
    ("a▁b", [1, 259, 270]),
    ("", [1]),
    ("in 2024.", [1, 291, 741, 775, 769, 775, 777, 761]),
    ("x<|system|>y", [1, 741, 768, 806, 764]),
    ("<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?",
     [1, 811, 813, 813, 812, 13, 781, 748, 286, 285, 261, 480, 772]),
]
DECODE_EXAMPLE_IDS = [1, 741, 806, 13, 789, 750, 807, 810, 13, 811, 813, 812, 13, 765, 260, 273, 286, 807, 800]


@lru_cache(maxsize=None)
def cases(variant: str) -> dict:
    return json.loads((CASES / f"{variant}.json").read_text(encoding="utf-8"))


def source_folder(variant: str, parent: Path) -> Path:
    """A tokenizer folder as the recorded slow tokenizer was loaded from: the fixture's tokenizer.model and the
    variant's tokenizer_config.json."""
    data = cases(variant)
    model = golden.fixture_path(data["source"], "tokenizer.model")
    assert hashlib.sha256(model.read_bytes()).hexdigest() == data["tokenizer_model_sha256"], model
    folder = parent / variant
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(data["tokenizer_config"]), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> the converted tokenizer (in memory), built once."""
    parent = tmp_path_factory.mktemp("sources")
    made = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = convert_tokenizer(source_folder(variant, parent), chat_template=None).tokenizer
        return made[variant]

    return get


def mismatches(tokenizer, data: dict) -> dict[str, list]:
    """Every recorded case the tokenizer does not reproduce, by kind. Pairs with an empty second text are left to
    `test_empty_text_pair_is_ignored_by_fast_tokenizers`."""
    out = {"encode": [], "pairs": [], "decode": [], "decode_skip": []}
    decodes = [case[1:4] for case in data["encode"] if len(case) == 4] + data["decode"]
    for case in data["encode"]:
        if tokenizer(case[0])["input_ids"] != case[1]:
            out["encode"].append(case[:2])
    for text, pair, ids in data["pairs"]:
        if pair and tokenizer(text, pair)["input_ids"] != ids:
            out["pairs"].append((text, pair, ids))
    for ids, text, skipped in decodes:
        if tokenizer.decode(ids) != text:
            out["decode"].append((ids, text))
        if tokenizer.decode(ids, skip_special_tokens=True) != skipped:
            out["decode_skip"].append((ids, skipped))
    return out


# --------------------------------------------------------------------------------------------- the reference rules


def test_recorded_cases_are_the_reference():
    """The cases were recorded with transformers 4.37.2's slow LlamaTokenizer, which reproduced the fixture's prompt
    ids and worked examples before anything was written (the generator checks both)."""
    data = cases("phi3")
    assert data["reference"] == "transformers.LlamaTokenizer (slow, legacy=False) 4.37.2"
    assert data["checks"] == {"worked_examples": 20, "decode_example": True, "prompt_ids": True}
    assert cases("internlm2")["checks"] == {"prompt_ids": True}
    recorded = {case[0]: case[1] for case in data["encode"]}
    assert all(recorded[text] == ids for text, ids in WORKED_EXAMPLES)
    sizes = {variant: len(cases(variant)["encode"]) for variant in LLAMA_VARIANTS + ["internlm2"]}
    assert min(sizes.values()) > 1000, sizes
    assert sum(f.stat().st_size for f in CASES.glob("*.json")) <= 1_000_000


@pytest.mark.parametrize("text, ids", WORKED_EXAMPLES, ids=[repr(text) for text, _ in WORKED_EXAMPLES])
def test_worked_examples(converted, text, ids):
    assert converted("phi3")(text)["input_ids"] == ids


def test_decoding_example(converted):
    """The fixture README's decoding example: runs of text and added tokens joined by spaces (4.37's decode()
    default spaces_between_special_tokens=True), Phi-3 chat tokens kept by skip_special_tokens."""
    tokenizer = converted("phi3")
    text = "<|system|>\nHi<|end|><|user|>\n<img><IMG_CONTEXT></img>\nThe cat<|end|><|endoftext|>"
    assert tokenizer(text)["input_ids"] == DECODE_EXAMPLE_IDS
    assert tokenizer.decode(DECODE_EXAMPLE_IDS) == (
        "<s>  <|system|> \nHi <|end|> <|user|> \n <img> <IMG_CONTEXT> </img> \nThe cat <|end|> <|endoftext|>")
    assert tokenizer.decode(DECODE_EXAMPLE_IDS, skip_special_tokens=True) == (
        "<|system|> \nHi <|end|> <|user|> \n\nThe cat <|end|>")
    assert tokenizer.decode(DECODE_EXAMPLE_IDS, spaces_between_special_tokens=False) == (
        "<s> <|system|>\nHi<|end|><|user|>\n<img><IMG_CONTEXT></img>\nThe cat<|end|><|endoftext|>")
    assert tokenizer.batch_decode([DECODE_EXAMPLE_IDS[:6], DECODE_EXAMPLE_IDS[13:17]], skip_special_tokens=True) == [
        "<|system|> \nHi", "The cat"]


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_recorded_cases(converted, variant):
    """Every recorded text (hand-picked edge cases and seeded random strings), pair and id list: the same ids and
    the same decode() with and without skip_special_tokens as the slow tokenizer."""
    data = cases(variant)
    found = mismatches(converted(variant), data)
    assert {kind: len(items) for kind, items in found.items()} == dict.fromkeys(found, 0), {
        kind: items[:3] for kind, items in found.items() if items}


def test_internlm2_sentencepiece_model_in_a_legacy_llama_tokenizer():
    """The InternLM2 fixture's model and added tokens, recorded through LlamaTokenizer(legacy=True) (same ids as the
    fixture's InternLM2Tokenizer on its prompt): the converted InternLM2 tokenizer gives them on every string."""
    tokenizer = convert_tokenizer(golden.fixture_path("internvl2_internlm2"), chat_template=None).tokenizer
    data = cases("internlm2")
    wrong = [case for case in data["encode"] if tokenizer(case[0])["input_ids"] != case[1]]
    wrong += [case for case in data["pairs"] if case[1] and tokenizer(case[0], case[1])["input_ids"] != case[2]]
    assert not wrong, wrong[:3]


def test_empty_text_pair_is_ignored_by_fast_tokenizers(converted):
    """A documented difference of transformers' fast tokenizers (any of them, not this conversion): `tokenizer(a,
    "")` treats the empty second text as no pair, the slow tokenizer adds the pair's <s> for it."""
    tokenizer = converted("phi3")
    empty = [(text, ids) for text, pair, ids in cases("phi3")["pairs"] if not pair]
    assert empty
    for text, ids in empty:
        assert ids[-1] == 1 and tokenizer(text, "")["input_ids"] == ids[:-1] == tokenizer(text)["input_ids"]


def test_information_separators_next_to_stripping_tokens(converted):
    """A documented difference: Python's str.strip (the slow tokenizer's lstrip/rstrip) also removes the ASCII
    information separators U+001C..U+001F, `tokenizers` does not. Only a token with lstrip/rstrip next to one of these
    control characters is affected (the slow ids below were read from transformers 4.37.2, variant phi3_strip)."""
    tokenizer = converted("phi3_strip")  # <|end|> rstrip, <|user|> lstrip+rstrip, <|placeholder1|> lstrip
    for text, slow, ours in [("<|end|>\x1cHi", [1, 741, 807, 789, 750], [1, 741, 807, 31, 789, 750]),
                             ("Hi\x1c<|user|>", [1, 571, 750, 810], [1, 571, 750, 31, 810]),
                             ("Hi\x1f<|placeholder1|>", [1, 571, 750, 802], [1, 571, 750, 34, 802])]:
        assert tokenizer(text)["input_ids"] == ours and [i for i in ours if i not in (31, 34)] == slow
    for text, slow in [("<|end|>\x85Hi", [1, 741, 807, 789, 750]), ("<|end|>\u3000Hi", [1, 741, 807, 789, 750])]:
        assert tokenizer(text)["input_ids"] == slow  # Unicode whitespace is stripped by both


# ------------------------------------------------------------------------------ the saved tokenizer, anywhere


RELOAD_SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer

result = {}
for variant, folder, cases_file in json.loads(sys.argv[1]):
    data = json.load(open(cases_file, encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    decodes = [case[1:4] for case in data["encode"]] + data["decode"]
    result[variant] = {
        "class": type(tokenizer).__name__,
        "encode": sum(tokenizer(case[0])["input_ids"] != case[1] for case in data["encode"]),
        "batch": int(tokenizer([case[0] for case in data["encode"]])["input_ids"] != [c[1] for c in data["encode"]]),
        "pairs": sum(tokenizer(a, b)["input_ids"] != ids for a, b, ids in data["pairs"] if b),
        "decode": sum(tokenizer.decode(ids) != text for ids, text, _ in decodes),
        "decode_skip": sum(tokenizer.decode(ids, skip_special_tokens=True) != text for ids, _, text in decodes),
        "cases": len(data["encode"]) + len(decodes),
    }
print("RESULT" + json.dumps(result))
"""


def test_saved_tokenizer_loads_and_matches_without_internvlx_hf(converted, tmp_path):
    """save_pretrained writes tokenizer.json + the tokenizer's remote code (no tokenizer.model, no sentencepiece
    needed); AutoTokenizer(trust_remote_code=True) in a process without internvlx_hf gives the reference ids and
    decodes on every recorded case, one by one and as one batch."""
    jobs = []
    for variant in LLAMA_VARIANTS:
        folder = tmp_path / variant
        converted(variant).save_pretrained(str(folder))
        assert sorted(p.name for p in folder.iterdir()) == [
            "tokenization_internvlx.py", "tokenizer.json", "tokenizer_config.json"]
        jobs.append((variant, str(folder), str(CASES / f"{variant}.json")))
    third_party = remote_code_imports(tmp_path / "phi3" / "tokenization_internvlx.py") - set(
        sys.stdlib_module_names)
    assert third_party == {"transformers"}
    proc = run_isolated_python("import sys\nsys.argv = ['', " + repr(json.dumps(jobs)) + "]\n" + RELOAD_SCRIPT,
                               tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([row for row in proc.stdout.splitlines() if "RESULT{" in row][-1].split("RESULT", 1)[1])
    for variant in LLAMA_VARIANTS:
        counts = result[variant]
        assert counts.pop("class") == "InternVLXLlamaTokenizerFast"
        assert counts.pop("cases") > 2000
        assert counts == {"encode": 0, "batch": 0, "pairs": 0, "decode": 0, "decode_skip": 0}, (variant, counts)


def test_bare_tokenizer_json_is_right_where_it_can_be(converted, tmp_path):
    """Read by `tokenizers` alone (e.g. a Rust server), the saved tokenizer.json is right for texts that start with
    ordinary text; the "▁" in front of a text that starts with an added token needs the tokenizer class."""
    from tokenizers import Tokenizer

    converted("phi3").save_pretrained(str(tmp_path))
    bare = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert bare.encode("Hi there").ids == [1, 571, 750, 262, 267]
    assert bare.encode("x<|system|>y").ids == [1, 741, 768, 806, 764]
    assert bare.encode("<img>Hi").ids == [1, 811, 789, 750]
    assert bare.encode("<|system|>\nHi").ids == [1, 806, 13, 789, 750]  # the reference: 1, 741, 806, ...


# ------------------------------------------------------------------------------------------------------ offsets


def test_offsets_refer_to_the_callers_text(converted):
    """The "▁" the tokenizer puts in front of a text spans no character: offsets, char_to_token and token_to_chars
    point into the text as given (the project's training encoding labels replies by these offsets)."""
    tokenizer = converted("phi3")
    texts = [case[0] for case in cases("phi3")["encode"][:400] if case[0]]
    batch = tokenizer(texts, return_offsets_mapping=True)
    for row, text in enumerate(texts):
        tokens = batch.tokens(row)
        first_text = next((j for j, t in enumerate(tokens) if j > 0 and t not in tokenizer.added_tokens_encoder),
                          None)
        for j, ((start, end), token) in enumerate(zip(batch["offset_mapping"][row], tokens)):
            assert 0 <= start <= end <= len(text)
            if token in tokenizer.added_tokens_encoder:
                assert j == 0 or text[start:end] == token
            elif not token.startswith("<0x"):
                surface, covered = token.replace("▁", " "), text[start:end].replace("▁", " ")
                assert covered == surface or (j == first_text and start == 0 and " " + covered == surface), (
                    text, j, token, (start, end))
    encoding = tokenizer(["<|system|>\nHi there", "Hi <img>x"], return_offsets_mapping=True, padding=True)
    assert encoding["offset_mapping"][0] == [(0, 0), (0, 0), (0, 10), (10, 11), (11, 12), (12, 13), (13, 17),
                                             (17, 19)]
    assert encoding["offset_mapping"][1][:6] == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 8), (8, 9)]
    assert encoding.char_to_token(0, 13) == 6 and encoding.token_to_chars(0, 6) == (13, 17)
    assert encoding.char_to_token(1, 0) == 1 and encoding.char_to_token(1, 3) == 4
    pair = tokenizer("Hi", " there", return_offsets_mapping=True)
    assert pair.tokens() == ["<s>", "▁H", "i", "<s>", "▁", "▁the", "re"]
    assert pair["offset_mapping"] == [(0, 0), (0, 1), (1, 2), (0, 0), (0, 0), (0, 4), (4, 6)]
    assert pair.char_to_token(1, sequence_index=1) == 5


def test_pre_tokenized_words(converted):
    """is_split_into_words: as the slow tokenizer, every word is tokenized on its own (with its own "▁" in front)."""
    tokenizer = converted("phi3")
    words = ["Hi", "<|end|>", " there", "<img>x"]
    expected = [1] + [i for word in words for i in tokenizer(word)["input_ids"][1:]]
    encoding = tokenizer(words, is_split_into_words=True, return_offsets_mapping=True)
    assert encoding["input_ids"] == expected
    assert encoding["offset_mapping"][:4] == [(0, 0), (0, 1), (1, 2), (0, 0)]  # "▁H" "i" | "▁" before <|end|>
    assert encoding.word_ids()[:5] == [None, 0, 0, 1, 1]


# ------------------------------------------------------------------------------------------- pad token (issue 8)


def _without_pad(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference*", "rope_*"))
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    config.update(config_changes)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    special = json.loads((dst / "special_tokens_map.json").read_text())
    special.pop("pad_token", None)
    (dst / "special_tokens_map.json").write_text(json.dumps(special))
    return dst


def test_source_without_pad_token_gets_one_that_the_model_never_emits(tmp_path):
    """InternVL2's Llama-based sources may have no pad token. Conversion picks the tokenizer eos when the chat
    template never writes it (<|endoftext|> for phi3-chat, </s> for internlm2-chat: what InternVL2's own
    checkpoints pad with), else the unknown token; never the template's end-of-turn token."""
    phi3 = _without_pad(golden.fixture_path("internvl2_phi3"), tmp_path / "phi3")
    converted = convert_tokenizer(phi3, get_chat_template("phi3-chat"))
    assert converted.tokenizer.pad_token == "<|endoftext|>" and "pad token <|endoftext|>" in converted.kind
    internlm2 = _without_pad(golden.fixture_path("internvl2_internlm2"), tmp_path / "internlm2")
    assert convert_tokenizer(internlm2, get_chat_template("internlm2-chat")).tokenizer.pad_token == "</s>"
    # an eos that the template writes (here the phi3-chat separator) would hide the end of every reply from the loss
    ends_turns = _without_pad(golden.fixture_path("internvl2_phi3"), tmp_path / "eos_end", eos_token="<|end|>")
    assert convert_tokenizer(ends_turns, get_chat_template("phi3-chat")).tokenizer.pad_token == "<unk>"


def test_pad_token_choice_errors_when_every_candidate_is_in_the_template(tmp_path):
    qwen2 = _without_pad(golden.fixture_path("internvl2_qwen2"), tmp_path / "qwen2")
    with pytest.raises(ConversionError, match="no pad token.*set \"pad_token\""):
        convert_tokenizer(qwen2, get_chat_template("internlm2-chat"))  # eos <|im_end|> ends turns; no unk/bos


def test_converted_checkpoint_without_source_pad_token_pads_a_batch(tmp_path):
    """processor(text=[a, b], images=..., padding=True) on a checkpoint converted from a source without pad token:
    the shorter prompt is padded on the left with the chosen pad id and masked out."""
    from PIL import Image

    from internvlx_hf import InternVLXProcessor

    src = _without_pad(golden.fixture_path("internvl2_phi3"), tmp_path / "src")
    report = convert(src, tmp_path / "dst", progress=False)
    assert "pad token <|endoftext|>" in report.tokenizer
    assert json.loads((tmp_path / "dst" / "generation_config.json").read_text())["pad_token_id"] == 800
    processor = InternVLXProcessor.from_pretrained(tmp_path / "dst", trust_remote_code=True)  # tokenizer class
    image = Image.open(golden.fixture_path("images", "img6.jpg"))
    prompts = ["<|user|>\n<image>\nWhat is this?<|end|><|assistant|>\n",
               "<|user|>\n<image>\nDescribe the image in detail, please.<|end|><|assistant|>\n"]
    batch = processor(text=prompts, images=[image, image], padding=True, max_tiles=1, return_tensors="pt")
    alone = [processor(text=p, images=[image], max_tiles=1, return_tensors="pt")["input_ids"][0] for p in prompts]
    width = max(len(ids) for ids in alone)
    assert batch["input_ids"].shape == (2, width) and len(alone[0]) < width
    pad = width - len(alone[0])
    assert batch["input_ids"][0, :pad].tolist() == [800] * pad and batch["attention_mask"][0, :pad].sum() == 0
    assert batch["input_ids"][0, pad:].tolist() == alone[0].tolist() and batch["input_ids"][1].tolist() == alone[
        1].tolist()
