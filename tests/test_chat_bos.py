"""The chat templates write the BOS that transformers' processor adds for the sentencepiece families (issue 57).

vLLM's chat routes render the template and tokenize it without special tokens; InternVL2's templates wrote no `<s>`,
so InternLM2 and Phi-3 prompts lost their first token there. A template made for its tokenizer starts with the text
that gives that `<s>` (`<s>` for InternLM2, `<s> ` for Phi-3's legacy=False tokenizer, nothing for Qwen2) unless
`write_bos` is false, as the processor renders it; every route gives the ids the reference model was trained on:
the processor (text, `apply_chat_template`), the tokenizer's `apply_chat_template`, and the template's text tokenized
without special tokens. Folders saved before get the prefix when the processor loads, with one log line.
"""

from __future__ import annotations

import logging

import pytest

from conftest import require_fixture
from internvlx_hf.conversion import convert
from internvlx_hf.processing import CHAT_TEMPLATES, InternVLXProcessor
from internvlx_hf.processing.chat_templates import bos_prefix, for_tokenizer, parse_chat_template

pytestmark = pytest.mark.fixtures

#: fixture -> (template name, the BOS text its template starts with)
FAMILIES = {"internvl2_internlm2": ("internlm2-chat", "<s>"), "internvl2_phi3": ("phi3-chat", "<s> "),
            "internvl2_qwen2": ("Hermes-2", "")}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam."},
     {"role": "user", "content": [{"type": "text", "text": " Another one, about rain?"}]}],
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bos")
    made = {}
    for fixture in FAMILIES:
        convert(require_fixture(fixture), root / fixture, progress=False)
        made[fixture] = root / fixture
    return made


@pytest.mark.parametrize("fixture", FAMILIES)
def test_every_route_gives_the_references_ids(folders, fixture):
    """The processor renders the reference's text (`write_bos=False`) and tokenizes it with the special tokens; the
    tokenizer renders the template with its BOS text, which vLLM's chat route tokenizes without them: the same ids."""
    name, prefix = FAMILIES[fixture]
    processor = InternVLXProcessor.from_pretrained(folders[fixture])
    tokenizer = processor.tokenizer
    assert parse_chat_template(processor.chat_template) == (name if name != "internlm2-chat" else "Hermes-2", prefix)
    assert (folders[fixture] / "chat_template.jinja").read_text() == processor.chat_template == tokenizer.chat_template
    for messages in CONVERSATIONS:
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert rendered == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                         chat_template=CHAT_TEMPLATES[name])  # the reference's text
        expected = tokenizer(rendered, add_special_tokens=True)["input_ids"]  # what the reference tokenized
        assert (expected[0] == tokenizer.bos_token_id) is bool(prefix)
        chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat == prefix + rendered
        assert tokenizer(chat, add_special_tokens=False)["input_ids"] == expected  # vLLM's chat routes
        assert processor(text=rendered)["input_ids"][0] == expected  # and vLLM's completions, LLM.generate
        assert processor(text=chat)["input_ids"][0] == expected  # no second BOS after a written one
        assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"][0] == expected
        assert list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) == expected
    if prefix:  # an explicit add_special_tokens is the caller's: a second BOS when asked for
        assert processor(text=chat, add_special_tokens=True)["input_ids"][0][:2] == [tokenizer.bos_token_id] * 2


def test_phi3_needs_the_space_after_its_bos(folders):
    """Phi-3's tokenizer (legacy=False) puts a '▁' before `<|system|>` at a text start, and none after a written
    `<s>`: the template writes `<s> ` for the reference's `<s> ▁ <|system|>`."""
    tokenizer = InternVLXProcessor.from_pretrained(folders["internvl2_phi3"]).tokenizer
    text = "<|system|>\nBe brief.<|end|><|user|>\nHi<|end|><|assistant|>\n"
    expected = tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(expected[:3]) == ["<s>", "▁", "<|system|>"]
    assert tokenizer("<s>" + text, add_special_tokens=False)["input_ids"] == [expected[0]] + expected[2:]
    assert tokenizer("<s> " + text, add_special_tokens=False)["input_ids"] == expected


@pytest.mark.parametrize("fixture", ["internvl2_internlm2", "internvl2_phi3"])
def test_an_older_template_is_fixed_at_load_with_one_line(folders, fixture, tmp_path, caplog):
    name, prefix = FAMILIES[fixture]
    folder = folders[fixture]
    saved = (folder / "chat_template.jinja").read_text()
    try:
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATES[name])  # as earlier versions wrote it
        logging.Logger.warning_once.cache_clear()  # (another test may have said it in this process)
        with caplog.at_level(logging.WARNING):
            first = InternVLXProcessor.from_pretrained(folder)
            second = InternVLXProcessor.from_pretrained(folder)
        assert first.chat_template == second.chat_template == first.tokenizer.chat_template == saved
        lines = [r.getMessage() for r in caplog.records if "does not start with the BOS token" in r.getMessage()]
        shown = "Hermes-2" if name == "internlm2-chat" else name
        assert lines == [
            f"InternVL-X: this chat template ({shown}) does not start with the BOS token '<s>' that transformers' "
            "processor adds for this tokenizer, so routes that tokenize the rendered text without special tokens "
            "(vLLM's chat completions, tokenizer.apply_chat_template(tokenize=True)) lost it; using the template "
            "that writes it (the folder was saved by an earlier internvlx-hf; to keep the fix, save the processor "
            "into the folder: InternVLXProcessor.from_pretrained(folder).save_pretrained(folder))"]
        first.save_pretrained(tmp_path)
        assert (tmp_path / "chat_template.jinja").read_text() == saved
    finally:
        (folder / "chat_template.jinja").write_text(saved)


def test_a_template_of_the_users_own_is_left_as_it_is(folders):
    processor = InternVLXProcessor.from_pretrained(folders["internvl2_internlm2"])
    own = CHAT_TEMPLATES["internlm2-chat"] + "{#- mine -#}"
    assert for_tokenizer(own, processor.tokenizer) == (own, False)
    assert bos_prefix(processor.tokenizer, own) == "<s>"  # (what it would need)


def test_a_batch_mixing_prompts_with_and_without_the_bos_is_refused(folders):
    processor = InternVLXProcessor.from_pretrained(folders["internvl2_internlm2"])
    rendered = processor.tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=False)
    with pytest.raises(ValueError) as error:
        processor(text=[rendered, "<|im_start|>user\nhi<|im_end|>"])
    assert str(error.value) == (
        "prompts [0] start with the BOS token '<s>' (a chat template wrote it) and prompts [1] do not: tokenize them "
        "apart, or render all of them with the chat template, or pass add_special_tokens= explicitly")
    both = processor(text=[rendered, rendered], padding=True)["input_ids"]
    assert both[0] == both[1] == processor(text=rendered)["input_ids"][0]


def test_internvlx_serve_gives_the_processors_prompt_ids(folders, tmp_path):
    """`internvlx serve` on InternLM2 (a folder with the older template, fixed at load) and Phi-3: a text-only chat
    with a system prompt and two turns is tokenized as the processor tokenizes it (`usage.prompt_tokens`: a missing
    or doubled `<s>` would be one off)."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    from test_serve import free_port, stop, wait_until_healthy

    saved = (folders["internvl2_internlm2"] / "chat_template.jinja").read_text()
    (folders["internvl2_internlm2"] / "chat_template.jinja").write_text(CHAT_TEMPLATES["internlm2-chat"])
    try:
        for fixture in ("internvl2_internlm2", "internvl2_phi3"):
            processor = InternVLXProcessor.from_pretrained(folders[fixture])
            expected = processor.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"][0]
            assert expected[0] == processor.tokenizer.bos_token_id
            port, log = free_port(), tmp_path / f"{fixture}.log"
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            env.pop("INTERNVLX_API_KEY", None)
            with open(log, "w") as output:
                process = subprocess.Popen([sys.executable, "-m", "internvlx_hf", "serve", str(folders[fixture]),
                                            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                           stdout=output, stderr=subprocess.STDOUT, env=env)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until_healthy(process, url, log)
                body = {"model": str(folders[fixture]), "messages": CONVERSATIONS[1], "max_tokens": 2,
                        "temperature": 0.0}
                request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as answer:
                    usage = json.loads(answer.read())["usage"]
            finally:
                stop(process)
            assert usage["prompt_tokens"] == len(expected), fixture
            if fixture == "internvl2_internlm2":
                assert "does not start with the BOS token '<s>'" in log.read_text()
    finally:
        (folders["internvl2_internlm2"] / "chat_template.jinja").write_text(saved)
