# Copyright 2025 The internvlx-hf developers. Licensed under the Apache License, Version 2.0.
"""A fast tokenizer that gives the ids and texts of transformers 4.37's slow sentencepiece `LlamaTokenizer`.

InternVL2's reference code tokenizes Llama-family checkpoints (InternVL2-4B's Phi-3, Yi) with the *slow*
`LlamaTokenizer`. Its converted `tokenizer.json` reproduces the splitting at added tokens and the sentencepiece BPE of
every chunk, but two rules of the slow tokenizer cannot be written in a `tokenizers` pipeline:

* `legacy=False` puts one "▁" in front of the whole text *before* splitting it at added tokens, and drops that "▁"
  again only when the next token is in `all_special_tokens`. A text that is exactly an added token therefore needs
  two different answers from the same pipeline (`<|system|>` -> `▁`, `<|system|>`; `<img>` -> `<img>`), and no
  normalizer, pre-tokenizer or post-processor sees both the text start and the added token. Every phi3-chat prompt
  starts with `<|system|>`, so this decides the first ids of every prompt.
* `decode()` joins the added tokens and the text between them with spaces, removes a "▁" from the start of each text
  run, copies `<s>`/`<unk>`/eos into the runs and decodes broken UTF-8 byte by byte (sentencepiece rules, not the
  `ByteFallback` decoder's).

`InternVLXLlamaTokenizerFast` adds exactly these rules on top of the saved `tokenizer.json` and changes nothing
else: padding, truncation, batching, offsets and special tokens are the fast tokenizer's. Its `tokenizer_config.json`
records the sentencepiece facts the rules need (`legacy`, `sentencepiece`), so the checkpoint needs neither
sentencepiece nor the original `tokenizer.model`.

This file is copied next to checkpoints as remote code: it imports only the standard library and transformers.
"""

import re
import threading

from transformers.tokenization_utils_tokenizers import TokenizersBackend

SPIECE_UNDERLINE = "▁"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")
_UNK_SURFACE = " \u2047 "  # what sentencepiece writes for its unknown piece


class _TextStartOffsets:
    """A `tokenizers.Encoding` seen through the "▁" that was put in front of its text(s): character offsets and
    lookups refer to the caller's text again (the "▁" itself spans no character)."""

    def __init__(self, encoding, shifts):
        self._encoding = encoding
        self._shifts = shifts  # per sequence index: characters added in front of that text

    def __getattr__(self, name):
        if name.startswith("_"):  # not set yet (e.g. while unpickling): no delegation
            raise AttributeError(name)
        return getattr(self._encoding, name)

    def __len__(self):
        return len(self._encoding)

    def _shift(self, sequence_index, word_index=None):
        if sequence_index is None or sequence_index >= len(self._shifts):
            return 0
        shift = self._shifts[sequence_index]
        if isinstance(shift, list):  # pre-tokenized input: offsets count from the start of each word
            return shift[word_index] if word_index is not None and word_index < len(shift) else 0
        return shift

    def _back(self, span, shift):
        return (max(span[0] - shift, 0), max(span[1] - shift, 0))

    @property
    def offsets(self):
        encoding = self._encoding
        return [self._back(span, self._shift(sequence, word))
                for span, sequence, word in zip(encoding.offsets, encoding.sequence_ids, encoding.word_ids)]

    @property
    def overflowing(self):
        return [_TextStartOffsets(encoding, self._shifts) for encoding in self._encoding.overflowing]

    def token_to_chars(self, token_index):
        span = self._encoding.token_to_chars(token_index)
        if span is None:
            return None
        return self._back(span, self._shift(self._encoding.token_to_sequence(token_index),
                                            self._encoding.token_to_word(token_index)))

    def word_to_chars(self, word_index, sequence_index=0):
        span = self._encoding.word_to_chars(word_index, sequence_index)
        return None if span is None else self._back(span, self._shift(sequence_index, word_index))

    def char_to_token(self, char_pos, sequence_index=0):
        return self._encoding.char_to_token(char_pos + self._shift(sequence_index), sequence_index)

    def char_to_word(self, char_pos, sequence_index=0):
        return self._encoding.char_to_word(char_pos + self._shift(sequence_index), sequence_index)


class InternVLXLlamaTokenizerFast(TokenizersBackend):
    """
    Fast tokenizer of a converted Llama-family sentencepiece checkpoint (InternVL2-4B's Phi-3, Yi) that encodes and
    decodes exactly like transformers 4.37's slow `LlamaTokenizer`, which InternVL2 was trained and evaluated with.

    Args:
        legacy (`bool`, defaults to `False`):
            The source tokenizer's `legacy` flag. `False`: one "▁" goes in front of the whole text (dropped before
            a token of `all_special_tokens`), none after added tokens. `True`: the `tokenizer.json` puts a "▁" in
            front of every chunk between added tokens, nothing is added here.
        sentencepiece (`dict`):
            Facts of the source `tokenizer.model` that decoding needs: `vocab_size` (pieces), `control` (control
            pieces, decoded to nothing), `unknown` (the unknown piece) and `add_dummy_prefix`.
        **kwargs: [`TokenizersBackend`] arguments (`tokenizer_file` / `tokenizer_object`, special tokens, ...).
    """

    # No __init__ of its own: transformers then loads the saved tokenizer.json as it is (a class with its own
    # __init__ gets its backend rebuilt from the bare vocabulary). `legacy` and `sentencepiece` are init kwargs,
    # saved in and read back from tokenizer_config.json.
    _pending_shifts = threading.local()  # per thread: the "▁" put in front of the texts of the current call

    @property
    def legacy(self) -> bool:
        return bool(self.init_kwargs.get("legacy", False))

    @property
    def sentencepiece(self) -> dict:
        return dict(self.init_kwargs.get("sentencepiece") or {})

    # ----------------------------------------------------------------------------------------------------- encode

    def _text_start(self, text: str, special_ids: set, longest_added: int) -> tuple[str, int]:
        """What the slow tokenizer encodes for ``text`` (legacy=False): "▁" + text with every "▁" turned into a
        space, unless that "▁" would be followed by a token of `all_special_tokens` (then it is dropped). Returns
        the text for the backend and how many characters were put in front."""
        text = text.replace(SPIECE_UNDERLINE, " ")
        if not text:
            return text, 0
        # Only the first two tokens decide, and they lie in the leading whitespace plus the longest added token.
        head = text[: len(text) - len(text.lstrip()) + longest_added + 1]
        ids = self._tokenizer.encode(SPIECE_UNDERLINE + head, add_special_tokens=False).ids
        if len(ids) > 1 and ids[0] == self._tokenizer.token_to_id(SPIECE_UNDERLINE) and ids[1] in special_ids:
            return text, 0
        return SPIECE_UNDERLINE + text, 1

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        # (`sanitize_control_tokens` encodes the chat in pieces through `encode()`, which comes back here)
        if self.legacy or kwargs.get("sanitize_control_tokens"):
            return super()._encode_plus(text, text_pair, *args, **kwargs)
        special_ids = set(self.all_special_ids)
        longest_added = max((len(token) for token in self.added_tokens_encoder), default=0)
        pretokenized = bool(kwargs.get("is_split_into_words", False))

        def convert(item):  # one text, or the words of one pre-tokenized text -> (backend input, shift(s))
            if item is None:
                return None, 0
            if pretokenized:
                pairs = [self._text_start(word, special_ids, longest_added) for word in item]
                return type(item)(word for word, _ in pairs), [shift for _, shift in pairs]
            return self._text_start(item, special_ids, longest_added)

        if pretokenized:
            batched = isinstance(text, (list, tuple)) and bool(text) and isinstance(text[0], (list, tuple))
        else:
            batched = isinstance(text, (list, tuple))
        items = list(text) if batched else [text]
        pair_items = (list(text_pair) if batched else [text_pair]) if text_pair is not None else [None] * len(items)
        converted = [convert(item) for item in items]
        converted_pairs = [convert(item) for item in pair_items]
        if batched:
            text = type(text)(value for value, _ in converted)
            if text_pair is not None:
                text_pair = type(text_pair)(value for value, _ in converted_pairs)
        else:
            text = converted[0][0]
            text_pair = converted_pairs[0][0] if text_pair is not None else None
        # The backend's character offsets count the "▁" put in front; `_convert_encoding` takes it off again.
        self._pending_shifts.queue = [(a[1], b[1]) for a, b in zip(converted, converted_pairs)]
        try:
            return super()._encode_plus(text, text_pair, *args, **kwargs)
        finally:
            self._pending_shifts.queue = None

    def _convert_encoding(self, encoding, *args, **kwargs):
        queue = getattr(self._pending_shifts, "queue", None)
        if queue:
            encoding = _TextStartOffsets(encoding, queue.pop(0))
        return super()._convert_encoding(encoding, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------- decode

    def _sentencepiece_decode(self, pieces: list[str]) -> str:
        """sentencepiece's `decode` of piece strings: "▁" -> space, byte pieces joined to UTF-8 (each byte that
        is not part of a valid character becomes U+FFFD), control pieces -> "", with the leading space removed
        when the model adds a dummy prefix."""
        control = set(self.sentencepiece.get("control", ()))
        unknown = self.sentencepiece.get("unknown")
        strip_first = bool(self.sentencepiece.get("add_dummy_prefix", False)) and self.legacy
        out, pending = [], bytearray()
        first = True

        def flush():
            if pending:
                out.append(_decode_utf8_bytes(bytes(pending)))
                pending.clear()

        for piece in pieces:
            byte = _BYTE_PIECE.match(piece)
            if byte:
                pending.append(int(byte.group(1), 16))
                first = False
                continue
            flush()
            if not piece or piece in control:  # (an empty piece, e.g. a lone "▁" whose "▁" was removed)
                continue
            if piece == unknown:
                out.append(_UNK_SURFACE)
                continue
            if strip_first and first and piece.startswith(SPIECE_UNDERLINE):
                piece = piece[1:]
            first = False
            out.append(piece.replace(SPIECE_UNDERLINE, " "))
        flush()
        return "".join(out)

    def _tokens_to_string(self, tokens: list[str], special: set) -> str:
        """The slow `LlamaTokenizer.convert_tokens_to_string` of one run of tokens between added tokens."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, current, previous_special = "", [], False
        for index, token in enumerate(tokens):
            if token in special:
                if not previous_special and index != 0 and self.legacy:
                    out += " "
                out += self._sentencepiece_decode(current) + token
                previous_special, current = True, []
            else:
                current.append(token)
                previous_special = False
        return out + self._sentencepiece_decode(current)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
                spaces_between_special_tokens: bool = True, **kwargs) -> str:
        # Like the slow tokenizer, `spaces_between_special_tokens` defaults to True here: 4.37's `decode()` does
        # not read the value saved in tokenizer_config.json, only an explicit argument.
        kwargs.pop("use_source_tokenizer", None)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        special = self.all_special_tokens
        special_ids = set(self.all_special_ids)
        vocab_size = int(self.sentencepiece.get("vocab_size", self.vocab_size))
        extra = [str(token) for token in (getattr(self, "extra_special_tokens", None) or [])]
        # Added tokens outside `all_special_tokens`, and extra special tokens beyond the sentencepiece pieces,
        # stand alone; everything else is decoded in runs.
        alone = {token for token in self.added_tokens_encoder if token not in special}
        alone |= {token for token in extra if (self.convert_tokens_to_ids(token) or 0) >= vocab_size}
        special = set(special)
        texts, run = [], []
        for index in token_ids:
            index = int(index)
            if skip_special_tokens and index in special_ids:
                continue
            token = self._tokenizer.id_to_token(index)
            if token is None:
                raise ValueError(f"token id {index} is not in the vocabulary (0..{len(self) - 1})")
            if token in alone:
                if run:
                    string = self._tokens_to_string(run, special)
                    if string:
                        texts.append(string)
                    run = []
                texts.append(token)
            else:
                run.append(token)
        if run:
            texts.append(self._tokens_to_string(run, special))
        text = (" " if spaces_between_special_tokens else "").join(texts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokens_to_string(tokens, set(self.all_special_tokens)) if tokens else ""


def _decode_utf8_bytes(data: bytes) -> str:
    """UTF-8 as sentencepiece decodes byte pieces: valid characters as they are, every other byte as U+FFFD."""
    out, index = [], 0
    while index < len(data):
        for length in (1, 2, 3, 4):
            try:
                out.append(data[index:index + length].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            index += length
            break
        else:
            out.append("\ufffd")
            index += 1
    return "".join(out)


InternVLXLlamaTokenizerFast.register_for_auto_class("AutoTokenizer")
