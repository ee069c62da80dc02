"""Conversation -> input ids and labels, with label masks taken from token boundaries of the rendered template.

InternVL's preprocessing re-tokenizes pieces of the prompt and counts their lengths to find the replies; where a
piece tokenizes differently alone than in context the counts drift, and it prints "tokenization mismatch" and
drops the sample's labels. Here the whole conversation is rendered once with the checkpoint's chat template and
tokenized once with character offsets. The character span of every assistant reply (its text and end-of-turn
token) comes from rendering the conversation's prefixes with the same template; a token is labelled when it lies
inside a span. A token that straddles a span boundary makes the sample unusable (`SampleError`), so labels can
never silently shift.

Each `<image>` is tokenized as `<img></img>` and the `<IMG_CONTEXT>` run is inserted between the two ids; the image
tokens are added special tokens, so this gives exactly the ids of tokenizing the expanded prompt (what the
processor does at inference), without tokenizing thousands of placeholder characters.

`truncate` fits a conversation into ``max_length`` as InternVL does (it tokenizes with ``truncation=True`` at
``model_max_length``, then masks): the head is kept and the replies, or the part of a reply, before the cut keep
their labels. Unlike InternVL, which then refuses any sample that lost part of an image (its "image tokens are
truncated" assertion), a cut that would fall inside an `<img>...</img>` block moves to just before the block, and
the images after the cut are left out of the sample.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from transformers.utils.chat_template_utils import render_jinja_template

from ..processing.chat_templates import parse_chat_template, starts_with_bos
from .formats import IMAGE_TAG, SampleError

IGNORE_INDEX = -100


@dataclass
class RenderedConversation:
    text: str
    reply_spans: list[tuple[int, int]]  # character spans of assistant replies + their end-of-turn token


@dataclass
class EncodedConversation:
    """Token ids and labels of one conversation (``input_ids`` is empty when encoded with ``expand=False``)."""

    input_ids: list[int]
    labels: list[int]
    length: int  # number of tokens, image placeholders included
    image_blocks: list[tuple[int, int]]  # per image: index of its `<img>`, index after its `</img>`
    label_positions: list[int]  # indices of the labelled tokens, ascending
    truncated: bool = False  # cut to max_length by `truncate`

    @property
    def num_labels(self) -> int:
        return len(self.label_positions)

    @property
    def num_images(self) -> int:
        """Images whose blocks are in the ids (after truncation, the first ones only)."""
        return len(self.image_blocks)


class ConversationEncoder:
    """Renders and tokenizes conversations for training with a processor's tokenizer and chat template.

    Args:
        processor: an `InternVLXProcessor` (a fast tokenizer with offsets is needed).
    """

    def __init__(self, processor):
        tokenizer = processor.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"training needs a fast tokenizer (character offsets), got {type(tokenizer).__name__}; checkpoints "
                "made by `internvlx convert` carry one (tokenizer.json)."
            )
        template = processor.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not isinstance(template, str):
            raise ValueError("the processor has no chat template; set `processor.chat_template` (see "
                             "internvlx_hf.processing.CHAT_TEMPLATES).")
        self.tokenizer = tokenizer
        self.template = template
        self.image_seq_length = processor.image_seq_length
        self.start_id = processor.start_image_token_id
        self.end_id = processor.end_image_token_id
        self.context_id = processor.image_token_id
        self.pair = processor.start_image_token + processor.end_image_token
        # (training rows may write their images as `<image>` in text items, which the templates refuse by default)
        self._template_kwargs = dict(tokenizer.special_tokens_map, image_tags_in_text=True,
                                     write_bos=False)  # (the tokenization below adds the BOS, as the processor's)
        # InternVL's internvl2_5 preprocessing trains a `gpt` turn before the first `human` one; its InternVL2
        # templates' preprocessing drops it (`sample_from_row(keep_leading_reply=...)`).
        self.keep_leading_reply = (parse_chat_template(template) or ("",))[0] == "internvl2_5"

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=self.template, add_generation_prompt=add_generation_prompt,
                **self._template_kwargs,
            )
        except TemplateSyntaxError:
            raise
        except TemplateError as error:  # the template's raise_exception(): this conversation, not the template
            raise SampleError("refused by the chat template",
                              f"the chat template refused the conversation: {error}") from None
        return rendered[0]

    def render(self, messages: list[dict[str, Any]]) -> RenderedConversation:
        """The conversation's text and the character spans of its assistant replies."""
        text = self._render(messages)

        def prefix(end: int, add_generation_prompt: bool = False) -> int:
            rendered = self._render(messages[:end], add_generation_prompt)
            if not text.startswith(rendered):
                raise ValueError(
                    "the chat template renders a conversation's first messages differently from the start of the "
                    "whole conversation, so replies cannot be located in it; training needs a template that renders "
                    "turn by turn (every template in internvlx_hf.processing.CHAT_TEMPLATES does)."
                )
            return len(rendered)

        first = 1 if messages and messages[0].get("role") == "system" else 0
        spans = []
        for index in range(first, len(messages)):
            if messages[index]["role"] != "assistant":
                continue
            header_end = prefix(index, add_generation_prompt=True)
            turn_end = len(text) if index + 1 == len(messages) else prefix(index + 1)
            # The reply and its end-of-turn token; whitespace the template puts after the separator is not learned.
            end = header_end + len(text[header_end:turn_end].rstrip())
            if end > header_end:
                spans.append((header_end, end))
        return RenderedConversation(text=text, reply_spans=spans)

    def lengths(self, conversations: list[tuple[list[dict[str, Any]], list[int]]]) -> list[int]:
        """Token counts of conversations (messages, tiles per image) before truncation, as `encode` counts them,
        from one rendering and one batched tokenization each: no reply spans, no labels, none of `encode`'s checks
        (a conversation `encode` would refuse still gets a count; a count above ``max_length`` needs `encode` and
        `truncate` to say what is kept).

        Raises:
            SampleError: a conversation's `<image>` tags do not match its images (no count can be given).
        """
        texts, image_tokens = [], []
        for messages, num_patches in conversations:
            pieces = self._render(messages).split(IMAGE_TAG)
            if len(pieces) - 1 != len(num_patches):
                raise SampleError("image count mismatch", f"the conversation has {len(pieces) - 1} {IMAGE_TAG} "
                                                          f"tag(s) but {len(num_patches)} image(s)")
            texts.append(self.pair.join(pieces))
            image_tokens.append(sum(num_patches) * self.image_seq_length)
        if not texts:
            return []
        # The Rust tokenizer's batch call without offsets (what `encode` tokenizes, minus the Python wrapping).
        backend = self.tokenizer.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        # (a template that writes the BOS: tokenized without adding another, as `encode` does)
        special = not starts_with_bos(self.tokenizer, texts)
        return [len(encoding.ids) + extra for encoding, extra in zip(encode(texts, add_special_tokens=special),
                                                                     image_tokens)]

    def encode(self, messages: list[dict[str, Any]], num_patches: list[int], expand: bool = True,
               source: str = "") -> EncodedConversation:
        """Token ids and labels of a conversation whose i-th `<image>` has ``num_patches[i]`` tiles.

        Labels are the ids inside assistant replies (their end-of-turn token included) and -100 elsewhere: system
        and user turns, template headers, BOS, every `<img>` / `<IMG_CONTEXT>` / `</img>`. With ``expand=False`` the
        ids are not built (only the length, positions and label count), which is what length estimates need.

        Raises:
            SampleError: the chat template refuses the conversation (its ``raise_exception``, e.g. a misplaced
                system turn), the image count does not match the `<image>` tags, the text holds image tokens itself,
                nothing is left to learn, or a token straddles a reply boundary.
        """
        where = f"{source}: " if source else ""
        try:
            rendered = self.render(messages)
        except SampleError as error:
            raise SampleError(error.reason, f"{where}{error}") from None
        pieces = rendered.text.split(IMAGE_TAG)
        if len(pieces) - 1 != len(num_patches):
            raise SampleError(
                "image count mismatch",
                f"{where}the conversation has {len(pieces) - 1} {IMAGE_TAG} tag(s) but {len(num_patches)} image(s); "
                "give one image per tag, in order",
            )
        tag_starts, position = [], 0
        for piece in pieces[:-1]:
            position += len(piece)
            tag_starts.append(position)
            position += len(IMAGE_TAG)
        growth = len(self.pair) - len(IMAGE_TAG)

        def shift(offset: int) -> int:  # offset in the rendered text -> offset in the text with `<img></img>` pairs
            return offset + growth * bisect.bisect_left(tag_starts, offset)

        text = self.pair.join(pieces)
        # a template that writes the BOS (`chat_templates.bos_prefix`): the processor's ids, without a second one
        encoding = self.tokenizer(text, add_special_tokens=not starts_with_bos(self.tokenizer, [text]),
                                  return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        spans = [(shift(start), shift(end)) for start, end in rendered.reply_spans]
        boundaries = sorted({b for span in spans for b in span})
        labelled = [False] * len(ids)
        for index, (start, end) in enumerate(offsets):
            if start == end:
                continue
            inner = bisect.bisect_right(boundaries, start)
            if inner < len(boundaries) and boundaries[inner] < end:
                token = self.tokenizer.convert_ids_to_tokens(ids[index])
                raise SampleError(
                    "reply boundary inside a token",
                    f"{where}token {token!r} spans a reply boundary of the rendered template (characters "
                    f"{start}-{end}); its label would be ambiguous. Strip leading/trailing whitespace of the turns",
                )
            span = bisect.bisect_right(spans, (start, float("inf"))) - 1
            labelled[index] = span >= 0 and spans[span][0] <= start and end <= spans[span][1]

        starts = [i for i, token in enumerate(ids) if token == self.start_id]
        ends = [i for i, token in enumerate(ids) if token == self.end_id]
        if len(starts) != len(num_patches) or len(ends) != len(num_patches) or self.context_id in ids:
            raise SampleError(
                "image tokens in text",
                f"{where}the text itself contains image tokens (<img>, </img> or <IMG_CONTEXT>); remove them and use "
                f"{IMAGE_TAG} tags",
            )
        runs = [tiles * self.image_seq_length for tiles in num_patches]
        image_ids = (self.start_id, self.end_id)
        labelled = [flag and token not in image_ids for flag, token in zip(labelled, ids)]
        num_labels = sum(labelled)
        if num_labels == 0:
            raise SampleError("no assistant reply", f"{where}the conversation has no assistant reply to learn from")

        before = [0]
        for run in runs:
            before.append(before[-1] + run)

        def expanded(index: int) -> int:  # token index before expansion -> after
            return index + before[bisect.bisect_left(starts, index)]

        input_ids, labels = [], []
        if expand:
            run = iter(runs)
            for token, flag in zip(ids, labelled):
                input_ids.append(token)
                labels.append(token if flag else IGNORE_INDEX)
                if token == self.start_id:
                    count = next(run)
                    input_ids.extend([self.context_id] * count)
                    labels.extend([IGNORE_INDEX] * count)
        return EncodedConversation(
            input_ids=input_ids,
            labels=labels,
            length=len(ids) + sum(runs),
            image_blocks=[(expanded(start), expanded(end) + 1) for start, end in zip(starts, ends)],
            label_positions=[expanded(i) for i, flag in enumerate(labelled) if flag],
        )


def truncate(encoded: EncodedConversation, max_length: int | None, source: str = "") -> EncodedConversation:
    """The first ``max_length`` tokens of a longer conversation, with the labels of the replies (or the part of a
    reply) among them; a cut inside an `<img>...</img>` block moves to just before the block, and the images from
    there on are left out (``num_images`` of the result says how many stay).

    Raises:
        SampleError: no labelled token is left before the cut.
    """
    if max_length is None or encoded.length <= max_length:
        return encoded
    cut = max_length
    for start, end in encoded.image_blocks:
        if start < cut < end:
            cut = start
            break
    kept_images = sum(1 for _, end in encoded.image_blocks if end <= cut)
    kept_labels = bisect.bisect_left(encoded.label_positions, cut)
    if kept_labels == 0:
        where = f"{source}: " if source else ""
        moved = f" (the cut moves to {cut}, before an image block)" if cut < max_length else ""
        raise SampleError(
            "too long",
            f"{where}{encoded.length} tokens > max_length {max_length}, and no reply token lies within the first "
            f"{cut} tokens{moved}; raise --max_length, lower --max_tiles, or shorten the sample",
        )
    return EncodedConversation(
        input_ids=encoded.input_ids[:cut], labels=encoded.labels[:cut], length=cut,
        image_blocks=encoded.image_blocks[:kept_images], label_positions=encoded.label_positions[:kept_labels],
        truncated=True,
    )


__all__ = ["ConversationEncoder", "EncodedConversation", "IGNORE_INDEX", "RenderedConversation", "truncate"]
