"""Where the images go in a prompt vLLM has already tokenized: the ids transformers' processor would give.

vLLM tokenizes the prompt text with `<image>` / `<video>` as plain text, then asks the model's processor to put each
item's tokens in their place. Matching the tags by their token ids is not enough for sentencepiece tokenizers
(InternLM2, Llama/Yi, Phi-3 as converted): `tokenizer.encode("<image>")` starts with a `▁` the tag does not have
inside a prompt, and the text right after the tag is tokenized differently once the tag is `<img>...</img>` (added
tokens split the text into chunks, and these tokenizers prefix every chunk, or the text start, with `▁`).

So the plugin recovers the prompt's text from its ids, checks that this text gives exactly those ids again, expands
the tags as [`InternVLXProcessor`] does (`<video>` -> `Frame1: <image>\\n...`, `<image>` -> `<img>` + `<IMG_CONTEXT>`
x n + `</img>`) and tokenizes the result with the same tokenizer call: the ids are transformers' by construction.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..processing.chat_templates import reserved_tag_message
from ..processing.video import VIDEO_PLACEHOLDER, video_prompt

IMAGE_PLACEHOLDER = "<image>"
_TAGS = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))


@dataclass(frozen=True)
class ImageTokens:
    """The special tokens of an image: `<img>`, `<IMG_CONTEXT>`, `</img>` (text and id)."""

    start: str
    context: str
    end: str
    start_id: int
    context_id: int
    end_id: int

    def block(self, context_tokens: int) -> str:
        return f"{self.start}{self.context * context_tokens}{self.end}"


@dataclass(frozen=True)
class Span:
    """Tokens `[start, end)` of the expanded prompt that belong to one item (its `<img>` ... `</img>` blocks)."""

    modality: str
    item: int
    start: int
    end: int


def _decode(tokenizer, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:  # a tokenizer without the option
        return tokenizer.decode(list(ids), skip_special_tokens=False)


def _chunked_decode(tokenizer, ids: Sequence[int], added: dict[int, str]) -> str:
    """Added tokens as their text, each run of other tokens decoded on its own, joined with nothing in between.

    sentencepiece decoders put a space around added tokens (the `▁` their tokenizers prefix every chunk with, or the
    slow tokenizer's joining rule); decoding each chunk alone drops exactly that prefix."""
    out, run = [], []
    for token in ids:
        if token in added:
            if run:
                out.append(_decode(tokenizer, run))
                run = []
            out.append(added[token])
        else:
            run.append(token)
    if run:
        out.append(_decode(tokenizer, run))
    return "".join(out)


def recover_prompt_text(tokenizer, ids: Sequence[int]) -> tuple[str, bool] | None:
    """`(text, add_special_tokens)` such that `tokenizer.encode(text, add_special_tokens=...)` gives exactly `ids`,
    or None when no candidate text does (then the ids did not come from tokenizing a text with this tokenizer)."""
    ids = list(ids)
    vocab = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    added = {int(index): str(token) for token, index in vocab.items()}
    for add_special in (True, False):
        wrap = tokenizer.encode("", add_special_tokens=add_special) if add_special else []
        if add_special and not wrap:
            continue  # the same as add_special_tokens=False
        # what `encode` puts around a text: a prefix (BOS) and maybe a suffix (EOS)
        marked = tokenizer.encode("x", add_special_tokens=True)
        prefix_len = next((i for i, (a, b) in enumerate(zip(wrap, marked)) if a != b), len(wrap))
        prefix, suffix = wrap[:prefix_len], wrap[prefix_len:]
        if ids[: len(prefix)] != prefix or (suffix and ids[len(ids) - len(suffix):] != suffix):
            continue
        body = ids[len(prefix): len(ids) - len(suffix)]
        for candidate in (_decode, lambda tok, body: _chunked_decode(tok, body, added)):
            text = candidate(tokenizer, body)
            if list(tokenizer.encode(text, add_special_tokens=add_special)) == ids:
                return text, add_special
    return None


#: tokenizer -> the BOS ids it puts in front of every text ([] if none, or if it also appends something), probed once
_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bos_of(tokenizer) -> list[int]:
    try:
        return _BOS[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that cannot be weakly referenced (probed every time)
        pass
    wrap = list(tokenizer.encode("", add_special_tokens=True))
    probe = list(tokenizer.encode("x", add_special_tokens=True))
    if probe != wrap + list(tokenizer.encode("x", add_special_tokens=False)):
        wrap = []
    try:
        _BOS[tokenizer] = wrap
    except TypeError:
        pass
    return wrap


def split_bos(tokenizer, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """`(bos, rest)`: transformers' processor gives this prompt the ids `bos + tokenizer.encode(text of rest,
    add_special_tokens=False)`. `bos` is what the tokenizer puts in front of every text (a sentencepiece `<s>`; [] for
    Qwen2 or a tokenizer that also appends something), and `rest` the ids after every BOS at the start: whether the
    template wrote it (`<s>`, Phi-3's `<s> `), a client wrote it again, vLLM's route added it or none did (a folder's
    older template), the prompt gets exactly one. (Phi-3's `<s> ▁ <|system|>` has no text form that both routes read
    alike: its tokenizer puts a `▁` before `<|system|>` at a text start and none after a written `<s>`.)"""
    ids = list(ids)
    wrap = _bos_of(tokenizer)
    if not wrap:
        return [], ids
    while ids[:len(wrap)] == wrap:
        ids = ids[len(wrap):]
    return wrap, ids


def expand_tags(text: str, image_context: Sequence[int], video_frames: Sequence[int], frame_context: int,
                tokens: ImageTokens) -> tuple[str, list[tuple[str, int]]]:
    """The prompt with each `<image>` / `<video>` expanded as [`InternVLXProcessor`] does, and the items in the
    order of their tags.

    Raises:
        ValueError: the text holds image tokens itself, or more tags than items (a tag typed as text: refused with
            the chat templates' message, never taken for an image), or fewer tags than items.
    """
    for token in (tokens.start, tokens.end, tokens.context):
        if token in text:
            raise ValueError(reserved_tag_message(token))
    order = [match.group(0) for match in _TAGS.finditer(text)]
    for tag, given, name in ((IMAGE_PLACEHOLDER, len(image_context), "image"),
                             (VIDEO_PLACEHOLDER, len(video_frames), "video")):
        if order.count(tag) > given:
            raise ValueError(reserved_tag_message(tag))
        if order.count(tag) < given:
            raise ValueError(f"the prompt has {order.count(tag)} '{tag}' tag(s) for {given} {name}(s); put one "
                             f"'{tag}' in the prompt where each {name} goes")
    images, videos = iter(enumerate(image_context)), iter(enumerate(video_frames))
    items: list[tuple[str, int]] = []

    def replace(match: re.Match) -> str:
        if match.group(0) == IMAGE_PLACEHOLDER:
            index, count = next(images)
            items.append(("image", index))
            return tokens.block(count)
        index, frames = next(videos)
        items.append(("video", index))
        return video_prompt(frames).replace(IMAGE_PLACEHOLDER, tokens.block(frame_context))

    return _TAGS.sub(replace, text), items


def item_spans(ids: Sequence[int], items: Sequence[tuple[str, int]], blocks_of: Callable[[str, int], list[int]],
               tokens: ImageTokens) -> list[Span] | None:
    """The token span of each item in the expanded `ids`: its `<img>` ... `</img>` blocks, in order (a video's
    `FrameN:` lines between its blocks belong to it, outside the embeddings). `blocks_of(modality, item)` gives the
    `<IMG_CONTEXT>` count of each of the item's blocks. None when the blocks found are not those expected."""
    found: list[tuple[int, int]] = []
    start = None
    for index, token in enumerate(ids):
        if token == tokens.start_id:
            if start is not None:
                return None
            start = index
        elif token == tokens.end_id:
            if start is None:
                return None
            found.append((start, index + 1))
            start = None
    expected = [(modality, item, count) for modality, item in items for count in blocks_of(modality, item)]
    if start is not None or len(found) != len(expected):
        return None
    spans: list[Span] = []
    for (modality, item, count), (begin, end) in zip(expected, found):
        if end - begin - 2 != count or any(token != tokens.context_id for token in ids[begin + 1: end - 1]):
            return None
        if spans and (spans[-1].modality, spans[-1].item) == (modality, item):
            spans[-1] = Span(modality, item, spans[-1].start, end)
        else:
            spans.append(Span(modality, item, begin, end))
    return spans
