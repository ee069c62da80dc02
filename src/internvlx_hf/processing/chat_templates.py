# Copyright 2025 The internvlx-hf developers. Licensed under the Apache License, Version 2.0.
"""Jinja chat templates that reproduce InternVL2's conversation templates character for character.

InternVL2 builds prompts with its `conversation.py` ("MPT" separator style): the system block is always written
(the template's default system message when none is given), every user/assistant turn is `role + text + sep`, and
the generation prompt is the bare assistant role. For `Hermes-2` / `internlm2-chat` that gives
`<|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{text}<|im_end|><|im_start|>assistant\\n` with no newline
between turns. (The two templates render the same string; they differ only in whether the tokenizer adds `<s>`.)

Message content may be a string (where `<image>` / `<video>` are literal) or a list of `{"type": "image"}`,
`{"type": "video"}` and `{"type": "text", "text": ...}` items rendered in order; an image item becomes `<image>\\n`,
the prefix InternVL2's `chat()` puts before the question, and a video item `<video>\\n`. The processor later expands
each `<image>` into the image's tokens and each `<video>` into InternVL2's `Frame1: <image>\\n...` lines.

**BOS.** transformers' processor tokenizes a prompt with the tokenizer's special tokens, so the sentencepiece
families (InternLM2, Phi-3) start with `<s>`; vLLM's chat routes render the template and tokenize it *without* them.
A template made for a tokenizer (`get_chat_template(name, tokenizer)`, what `internvlx convert` writes) therefore
starts with the text that gives that `<s>` when tokenized without special tokens (`bos_prefix`: `<s>` for InternLM2,
`<s> ` for Phi-3, whose `legacy=False` tokenizer would otherwise lose the `▁` before `<|system|>`), unless the
template variable `write_bos` is false: `InternVLXProcessor.apply_chat_template` renders with `write_bos=False`, so
the text it gives is the reference's and `processor(text=...)`, `LLM.generate` and vLLM's completions, which add the
special tokens, give the reference's ids; routes that render the template themselves and tokenize without special
tokens (vLLM's chat completions and `LLM.chat`, `tokenizer.apply_chat_template(tokenize=True)`) get the `<s>` from
the template. `for_tokenizer` gives a folder's template the prefix its tokenizer needs (templates written before had
none).

A text item that contains a tag or an image token (`RESERVED_TAGS`) is refused with `reserved_tag_message`: OpenAI
clients (vLLM's and `internvlx serve`'s chat routes) send images as image parts and any text as text parts, so a tag
there is user text that would otherwise be taken for an image. Training rows that write their images as `<image>` in
text items render with `image_tags_in_text=True`.

This file is copied next to checkpoints as remote code (standard library only).
"""

from __future__ import annotations

import re

# The default system message of InternVL2's Hermes-2 / internlm2-chat / phi3-chat templates.
_INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# The default system message of InternVL2.5's template.
_INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


#: Text that stands for image input (the processor's tags and the image tokens): refused in a message's text items.
RESERVED_TAGS = ("<image>", "<video>", "<img>", "</img>", "<IMG_CONTEXT>")


def reserved_tag_message(tag: str) -> str:
    """The refusal of a message text that contains `tag` (the chat templates raise the same text)."""
    return (f"message text contains '{tag}', which this model reserves for image input; send images as image content "
            f"parts and remove or reword '{tag}' in the text")


def _jinja_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Each tag written split (`'<' ~ 'image>'`): `internvlx export native` turns the template's image placeholder `<image>`
# into the native `<IMG_CONTEXT>` by text replacement and convert turns it back, which must not touch this list (the
# round trip would give it two `<image>`s and the template would no longer be recognised as ours).
_RESERVED_TAGS_JINJA = "(" + ", ".join(f"'{tag[0]}' ~ '{tag[1:]}'" for tag in RESERVED_TAGS) + ")"


def _mpt_template(system_prefix: str, default_system: str, user_prefix: str, assistant_prefix: str, sep: str) -> str:
    """A Jinja template for one of InternVL2's "MPT"-style conversation templates."""
    return (
        "{%- set system_prefix = " + _jinja_literal(system_prefix) + " -%}\n"
        "{%- set default_system = " + _jinja_literal(default_system) + " -%}\n"
        "{%- set user_prefix = " + _jinja_literal(user_prefix) + " -%}\n"
        "{%- set assistant_prefix = " + _jinja_literal(assistant_prefix) + " -%}\n"
        "{%- set sep = " + _jinja_literal(sep) + " -%}\n"
        "{%- set reserved_tags = " + _RESERVED_TAGS_JINJA + " -%}\n"
        """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable -%}
        {%- for item in content -%}
            {%- if item is string -%}
                {{- item -}}
            {%- elif item['type'] in ('image', 'image_url') -%}
                {{- '<image>\\n' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<video>\\n' -}}
            {%- elif item['type'] == 'text' -%}
                {#- A tag typed as text would be taken for an image or shift the images: refused, unless the caller
                    writes its images as tags in text (training rows, `image_tags_in_text=True`). -#}
                {%- for tag in (reserved_tags if not image_tags_in_text else ()) -%}
                    {%- if tag in item['text'] -%}
                        {{- raise_exception("message text contains '" ~ tag ~ "', which this model reserves for "
                                            ~ "image input; send images as image content parts and remove or "
                                            ~ "reword '" ~ tag ~ "' in the text") -}}
                    {%- endif -%}
                {%- endfor -%}
                {{- item['text'] -}}
            {%- else -%}
                {{- raise_exception('InternVL templates support only text, image and video content, got '
                                    ~ item['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = render_content(messages[0]['content']) -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_message = default_system -%}
    {%- set turns = messages -%}
{%- endif -%}
{{- system_prefix + system_message + sep -}}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {%- set prefix = user_prefix -%}
    {%- elif message['role'] == 'assistant' -%}
        {%- set prefix = assistant_prefix -%}
    {%- else -%}
        {{- raise_exception('Roles must be system (first message only), user or assistant, got ' ~ message['role']) -}}
    {%- endif -%}
    {%- set content = render_content(message['content']) if message['content'] is defined else '' -%}
    {#- Like conversation.py, an empty message renders as its bare role. -#}
    {%- if content -%}
        {{- prefix + content + sep -}}
    {%- else -%}
        {{- prefix -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- assistant_prefix -}}
{%- endif -%}
"""
    )


# (system prefix, default system message, user prefix, assistant prefix, separator) of each conversation.py template.
_CHATML_PARTS = ("<|im_start|>system\n", _INTERNVL2_SYSTEM, "<|im_start|>user\n", "<|im_start|>assistant\n",
                 "<|im_end|>")
_TEMPLATE_PARTS: dict[str, tuple[str, str, str, str, str]] = {
    "Hermes-2": _CHATML_PARTS,
    "internlm2-chat": _CHATML_PARTS,
    "phi3-chat": ("<|system|>\n", _INTERNVL2_SYSTEM, "<|user|>\n", "<|assistant|>\n", "<|end|>"),
    # InternVL2.5 and InternVL3: a newline after every <|im_end|>, and a new default system message.
    "internvl2_5": ("<|im_start|>system\n", _INTERNVL2_5_SYSTEM, "<|im_start|>user\n", "<|im_start|>assistant\n",
                    "<|im_end|>\n"),
}

#: Jinja chat templates keyed by InternVL2's template names (`config.template` of the original checkpoints).
CHAT_TEMPLATES: dict[str, str] = {name: _mpt_template(*parts) for name, parts in _TEMPLATE_PARTS.items()}

DEFAULT_CHAT_TEMPLATE = "internlm2-chat"


def get_chat_template(name: str, tokenizer=None) -> str:
    """The Jinja chat template for an InternVL2 template name (e.g. `config.template` of an original checkpoint).

    Args:
        name: the template's name (`CHAT_TEMPLATES`' keys).
        tokenizer: the tokenizer it is for; the template then starts with the BOS text that tokenizer needs
            (`bos_prefix`), so that a route that tokenizes the rendered text without special tokens (vLLM's chat
            routes, `tokenizer.apply_chat_template(tokenize=True)`) gets transformers' ids.
    """
    try:
        template = CHAT_TEMPLATES[name]
    except KeyError:
        known = ", ".join(repr(key) for key in CHAT_TEMPLATES)
        raise ValueError(f"Unknown InternVL chat template {name!r}; known templates: {known}.") from None
    if tokenizer is None:
        return template
    return _with_bos_prefix(template, bos_prefix(tokenizer, template) or "")


# A template made for a tokenizer starts with one line that writes its BOS text unless `write_bos` is false
# (`_with_bos_prefix`).
_BOS_LINE = re.compile(r"\{%- if write_bos is not defined or write_bos %\}\{\{- ('(?:[^'\\]|\\.)*') -\}\}"
                       r"\{% endif -%\}\n")


def _with_bos_prefix(template: str, prefix: str) -> str:
    if not prefix:
        return template
    return ("{%- if write_bos is not defined or write_bos %}{{- " + _jinja_literal(prefix) + " -}}{% endif -%}\n"
            + template)


def _from_jinja_literal(literal: str) -> str:
    return re.sub(r"\\(.)", lambda match: "\n" if match.group(1) == "n" else match.group(1), literal[1:-1])


def parse_chat_template(template) -> tuple[str, str] | None:
    """`(name, BOS prefix)` when `template` is one of `CHAT_TEMPLATES` (with or without a BOS prefix), else None.
    (`Hermes-2` and `internlm2-chat` are the same text: the first name is given.)"""
    if not isinstance(template, str):
        return None
    prefix = ""
    match = _BOS_LINE.match(template)
    if match:
        prefix, template = _from_jinja_literal(match.group(1)), template[match.end():]
    name = next((name for name, text in CHAT_TEMPLATES.items() if text == template), None)
    return (name, prefix) if name is not None else None


def bos_prefix(tokenizer, template: str) -> str | None:
    """The text `template` must start with so that its rendering tokenized *without* special tokens gives the ids
    of the rendering without it tokenized *with* them (what transformers' processor does): "" when the tokenizer adds
    nothing in front (Qwen2), the BOS token (InternLM2) or the BOS token and a space (Phi-3's `legacy=False`
    tokenizer, which puts a `▁` before the first special token of a text that does not start with `<s>`). None when
    no such text exists (e.g. a tokenizer that also appends an EOS): the template is then used as it is.

    Checked on renderings with and without a system message, one and several turns.
    """
    bos = getattr(tokenizer, "bos_token", None)
    probes = [([{"role": "user", "content": "Hello, who are you?"}], True),
              ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}], True)]
    texts = [tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=generation) for messages, generation in probes]

    def ids(text: str, special: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    targets = [ids(text, True) for text in texts]
    for prefix in ("", *((bos, bos + " ") if bos else ())):
        if all(ids(prefix + text, False) == target for text, target in zip(texts, targets)):
            return prefix
    return None


def for_tokenizer(template, tokenizer):
    """`(template, changed)`: one of `CHAT_TEMPLATES` with the BOS prefix `tokenizer` needs (`bos_prefix`); any
    other template (or one whose prefix cannot be found) as it is."""
    parsed = parse_chat_template(template)
    if parsed is None or tokenizer is None:
        return template, False
    name, prefix = parsed
    wanted = bos_prefix(tokenizer, CHAT_TEMPLATES[name])
    if wanted is None or wanted == prefix:
        return template, False
    return _with_bos_prefix(CHAT_TEMPLATES[name], wanted), True


def starts_with_bos(tokenizer, prompts) -> bool:
    """Whether every prompt starts with the tokenizer's BOS text (a chat template wrote it: tokenize without adding
    another). Prompts of which only some start with it are refused: they would get different BOS handling."""
    bos = getattr(tokenizer, "bos_token", None)
    starts = [bool(bos) and prompt.startswith(bos) for prompt in prompts]
    if any(starts) and not all(starts):
        raise ValueError(
            f"prompts {[i for i, s in enumerate(starts) if s]} start with the BOS token {bos!r} (a chat template wrote "
            f"it) and prompts {[i for i, s in enumerate(starts) if not s]} do not: tokenize them apart, or render all "
            "of them with the chat template, or pass add_special_tokens= explicitly")
    return bool(starts) and all(starts)


def default_system_message(name: str) -> str:
    """The system message a template writes when the conversation has none (conversation.py's `system_message`)."""
    get_chat_template(name)  # the error for an unknown name
    return _TEMPLATE_PARTS[name][1]


def turn_end_text(apply_chat_template, **kwargs) -> str:
    """What a chat template writes after an assistant reply, stripped: its end-of-turn marker (`<|im_end|>` for
    Hermes-2 / internlm2-chat, `<|end|>` for phi3-chat; "" for a template without one). InternVL2 stops generating
    there, not at the tokenizer's eos.

    Args:
        apply_chat_template: a tokenizer's or processor's `apply_chat_template`.
        kwargs: passed on (e.g. `chat_template=`).
    """
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
    rendered = apply_chat_template(probe, tokenize=False, **kwargs)
    return rendered.rsplit("REPLY", 1)[-1].strip() if "REPLY" in rendered else ""


__all__ = ["CHAT_TEMPLATES", "DEFAULT_CHAT_TEMPLATE", "RESERVED_TAGS", "bos_prefix", "default_system_message",
           "for_tokenizer", "get_chat_template", "parse_chat_template", "reserved_tag_message", "starts_with_bos",
           "turn_end_text"]
