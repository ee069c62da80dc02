"""The tokenizer: sentencepiece models -> a fast tokenizer with the slow tokenizer's ids; others pass through.

InternVL2's reference code tokenizes with the *slow* sentencepiece classes (InternLM2Tokenizer, LlamaTokenizer).
Their sentencepiece BPE becomes a byte-fallback BPE whose merges are ranked by the piece scores (sentencepiece merges
the highest-scoring pair first); the added tokens are extracted from the text first (never normalised), and:

* InternLM2Tokenizer and LlamaTokenizer with ``legacy=True`` encode every chunk between added tokens on its own with
  sentencepiece's ``add_dummy_prefix``, which puts a ``▁`` in front of *every* chunk (``<|im_start|>system`` ->
  ``<|im_start|>``, ``▁s``, ...): a normaliser that unconditionally prepends ``▁`` and turns spaces into ``▁``. (A
  Metaspace pre-tokenizer with ``prepend_scheme="always"`` is *not* equivalent: it skips the prefix when a chunk
  already starts with a space, where sentencepiece adds it anyway.)
* LlamaTokenizer with ``legacy=False`` (Phi-3: InternVL2-4B) puts one ``▁`` in front of the whole text, before the
  split, and drops it before a token of ``all_special_tokens``. The chunks get no prefix of their own; the text-start
  rule cannot be written in a ``tokenizers`` pipeline and lives in `InternVLXLlamaTokenizerFast`
  (``processing/tokenization_internvlx.py``, saved next to the checkpoint), which also decodes like the slow class.

Only ``all_special_tokens`` (bos, eos, unk, pad, additional_special_tokens) are marked special, so that
``skip_special_tokens`` drops what the slow tokenizers drop (Phi-3's chat tokens stay). Control pieces the source does
not list as added tokens (Phi-3's ``</s>``) are ordinary vocabulary, as in the slow tokenizer: the text ``</s>`` is
text. A source without a pad token gets one (`choose_pad_token`).

Tokenizers that already ship a ``tokenizer.json`` (Qwen2, Llama-3) are loaded from it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConversionError

SPM_MODEL_NAME = "tokenizer.model"
FAST_TOKENIZER_NAME = "tokenizer.json"

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# tokenizer_config.json keys that are loading options, not tokenizer settings.
_LOADING_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "trust_remote_code")


@dataclass
class ConvertedTokenizer:
    tokenizer: Any  # a transformers TokenizersBackend (fast tokenizer)
    kind: str  # how it was obtained, for the summary


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _token_content(value: Any) -> str | None:
    if value is None:
        return None
    return value["content"] if isinstance(value, dict) else str(value)


def _added_tokens(src: Path, config: dict) -> dict[int, dict]:
    """id -> AddedToken fields, from tokenizer_config.json's ``added_tokens_decoder`` and ``added_tokens.json``."""
    tokens: dict[int, dict] = {}
    for index, token in (config.get("added_tokens_decoder") or {}).items():
        tokens[int(index)] = dict(token)
    for content, index in _read_json(src / "added_tokens.json").items():
        tokens.setdefault(int(index), {"content": content, "special": True})
        if tokens[int(index)]["content"] != content:
            raise ConversionError(
                f"{src}: added_tokens.json gives id {index} to {content!r} but tokenizer_config.json gives it to "
                f"{tokens[int(index)]['content']!r}; fix one of the two files."
            )
    return tokens


def is_sentencepiece_tokenizer(src: Path) -> bool:
    config = _read_json(src / "tokenizer_config.json")
    name = str(config.get("tokenizer_class") or "")
    auto = json.dumps(config.get("auto_map", {}))
    if name.startswith("InternLM2") or "InternLM2Tokenizer" in auto:
        return True
    # LlamaTokenizer checkpoints (Phi-3, Yi): InternVL2's chat() loads them with use_fast=False, so the slow
    # sentencepiece behaviour is the reference even where a tokenizer.json exists.
    return name.startswith("LlamaTokenizer") and (src / SPM_MODEL_NAME).is_file()


def _read_sentencepiece(model_file: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # protobuf missing as well
        raise ConversionError(
            f"converting {model_file} needs sentencepiece and protobuf: pip install 'internvlx-hf[convert]' ({error})"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as error:  # protobuf's DecodeError
        raise ConversionError(f"{model_file} is not a sentencepiece model ({error}); copy it again from the "
                              "original checkpoint") from None
    return proto


def sentencepiece_facts(proto) -> dict:
    """What decoding needs to know about a sentencepiece model (a parsed ``ModelProto``; see
    `InternVLXLlamaTokenizerFast`)."""
    pieces = list(proto.pieces)
    return {
        "vocab_size": len(pieces),
        "control": [piece.piece for piece in pieces if piece.type == _CONTROL],
        "unknown": pieces[proto.trainer_spec.unk_id].piece if 0 <= proto.trainer_spec.unk_id < len(pieces) else None,
        "add_dummy_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }


def sentencepiece_to_tokenizers(model_file: Path, added: dict[int, dict], *, legacy: bool = True,
                                bos_token: str | None = "<s>", eos_token: str | None = "</s>",
                                add_bos_token: bool = True, add_eos_token: bool = False,
                                special_tokens: set[str] | None = None, proto=None):
    """A `tokenizers.Tokenizer` that encodes like the slow sentencepiece tokenizer (see the module docstring).

    ``added``: id -> AddedToken fields of the source's added tokens. ``special_tokens``: the source's
    ``all_special_tokens`` (bos, eos, unk, pad, additional_special_tokens); only these are marked special, so that
    ``decode(skip_special_tokens=True)`` drops what the slow tokenizer drops (Phi-3's chat tokens stay). ``None``
    keeps each token's own ``special`` flag. ``proto``: ``model_file`` already parsed (it is read otherwise).
    """
    if proto is None:
        proto = _read_sentencepiece(model_file)
    _check_convertible(proto, model_file)
    pieces = list(proto.pieces)
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConversionError(f"{model_file} has duplicate pieces")
    extra = _appended_tokens(added, pieces, model_file)
    tokenizer = _bpe_tokenizer(proto, vocab)
    _set_prefix_rule(tokenizer, proto, legacy)
    tokenizer.decoder = _decoder(proto, added, legacy)
    _add_tokens(tokenizer, added, pieces, special_tokens)
    for index, token in extra.items():
        if tokenizer.token_to_id(token["content"]) != index:
            raise ConversionError(f"{model_file}: the added token {token['content']!r} did not get id {index}")
    tokenizer.post_processor = _post_processor(tokenizer, model_file, bos_token if add_bos_token else None,
                                               eos_token if add_eos_token else None)
    return tokenizer


def _check_convertible(proto, model_file: Path) -> None:
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # BPE
        raise ConversionError(f"{model_file}: only sentencepiece BPE models are supported (InternLM2, Llama); "
                              f"this one has model_type={trainer.model_type}")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ConversionError(
            f"{model_file}: sentencepiece normalisation ({norm.name!r}, remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) is not supported; InternLM2/Llama models use 'identity'."
        )


def _appended_tokens(added: dict[int, dict], pieces: list, model_file: Path) -> dict[int, dict]:
    """The added tokens beyond the sentencepiece vocabulary, by id. They are appended in id order, so they keep
    their ids only when they follow the vocabulary without gaps; those inside it must name the piece there."""
    extra = {index: token for index, token in added.items() if index >= len(pieces)}
    for index, token in added.items():
        if index < len(pieces) and pieces[index].piece != token["content"]:
            raise ConversionError(
                f"tokenizer_config.json gives id {index} to {token['content']!r} but {model_file} has "
                f"{pieces[index].piece!r} there."
            )
    if sorted(extra) != list(range(len(pieces), len(pieces) + len(extra))):
        raise ConversionError(
            f"added tokens must follow the sentencepiece vocabulary ({len(pieces)} pieces) without gaps; got ids "
            f"{sorted(extra)}"
        )
    return dict(sorted(extra.items()))


def _bpe_tokenizer(proto, vocab: dict[str, int]):
    """A byte-fallback BPE over the pieces, its merges ranked by the piece scores (sentencepiece merges the
    highest-scoring pair first); only normal pieces merge."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    pieces, trainer = list(proto.pieces), proto.trainer_spec
    scores = {piece.piece: piece.score for piece in pieces if piece.type == _NORMAL}
    not_mergeable = {piece.piece for piece in pieces if piece.type != _NORMAL}
    merges = generate_merges(vocab, scores, skip_tokens=not_mergeable)
    unk = pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
    return Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                         byte_fallback=trainer.byte_fallback, dropout=None))


def _set_prefix_rule(tokenizer, proto, legacy: bool) -> None:
    """Where the ``▁`` of sentencepiece's dummy prefix goes (see the module docstring)."""
    from tokenizers import normalizers, pre_tokenizers

    if legacy:
        # every chunk between added tokens gets sentencepiece's dummy prefix
        steps = [normalizers.Replace(" ", "▁")]
        if proto.normalizer_spec.add_dummy_prefix:
            steps.insert(0, normalizers.Prepend("▁"))
        tokenizer.normalizer = normalizers.Sequence(steps)
    else:
        # LlamaTokenizer(legacy=False) puts one "▁" in front of the whole text, none after added tokens. The
        # converted tokenizer's class (InternVLXLlamaTokenizerFast) writes that "▁" itself; "first" makes the
        # bare tokenizer.json right on its own for texts that start with ordinary text (not for those that start
        # with an added token, which no tokenizers pipeline can express). Without byte fallback an unknown first
        # character must not get a "▁" (the slow tokenizer drops it in front of <unk>).
        scheme = "first" if proto.trainer_spec.byte_fallback else "never"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)


def _decoder(proto, added: dict[int, dict], legacy: bool):
    from tokenizers import decoders

    added_contents = {token["content"] for token in added.values()}
    # control pieces that are not added tokens (Phi-3's "</s>") decode to nothing, as in sentencepiece
    steps = [decoders.Replace(piece.piece, "") for piece in proto.pieces
             if piece.type == _CONTROL and piece.piece not in added_contents]
    steps += [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix or not legacy:
        steps.append(decoders.Strip(content=" ", left=1))
    return decoders.Sequence(steps)


def _add_tokens(tokenizer, added: dict[int, dict], pieces: list, special_tokens: set[str] | None) -> None:
    """Add the source's added tokens and the user-defined pieces (sentencepiece matches those in the text).

    Control pieces the source does not list stay ordinary vocabulary: "</s>" in a Phi-3 text is text."""
    from tokenizers import AddedToken

    user_defined = {i for i, p in enumerate(pieces) if p.type == _USER_DEFINED}
    added_tokens = []
    for index in sorted(set(added) | user_defined):
        token = added[index] if index in added else {"content": pieces[index].piece, "special": False}
        special = bool(token.get("special", True)) if special_tokens is None else token["content"] in special_tokens
        added_tokens.append(AddedToken(
            token["content"],
            single_word=bool(token.get("single_word", False)),
            lstrip=bool(token.get("lstrip", False)),
            rstrip=bool(token.get("rstrip", False)),
            normalized=bool(token.get("normalized", False)),
            special=special,
        ))
    tokenizer.add_tokens(added_tokens)


def _post_processor(tokenizer, model_file: Path, start: str | None, end: str | None):
    """As LlamaTokenizer.build_inputs_with_special_tokens: [bos] A [eos] ([bos] B [eos]); ``start`` / ``end``: the
    token added there, None for none."""
    from tokenizers import processors

    specials = []
    for token, where in ((start, "start"), (end, "end")):
        if token is None:
            continue
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ConversionError(f"{model_file}: the {where} token {token!r} is not in the vocabulary")
        specials.append((token, token_id))

    def sequence(part: str, type_id: int) -> str:
        return " ".join(([f"{start}:{type_id}"] if start else []) + [f"${part}:{type_id}"]
                        + ([f"{end}:{type_id}"] if end else []))

    single, pair = sequence("A", 0), sequence("A", 0) + " " + sequence("B", 1)
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def choose_pad_token(tokenizer: Any, chat_template: str | None) -> str:
    """The pad token for a tokenizer that has none (InternVL2's Llama-based sources).

    Padding needs a token id, and code that builds labels from ``input_ids`` often masks every position holding the
    pad id. So the pad token must be a token the model is never trained to emit: not the chat template's end-of-turn
    token (``<|im_end|>``, ``<|end|>``: generation stops there and training learns it) or anything else the template
    writes. In order: the tokenizer's eos token when the template does not write it (InternVL2 ends turns with the
    template separator, never with the tokenizer eos; InternLM2 and Phi-3 checkpoints pad with that eos too), else
    the unknown token (a byte-fallback tokenizer never produces it), else bos.
    """
    template = chat_template or ""
    for token in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if token and token not in template:
            return str(token)
    raise ConversionError(
        "the source tokenizer has no pad token, and its eos/unk/bos tokens are all written by the chat template "
        "(padding with one of them would hide it from the loss); set \"pad_token\" in the source's "
        "tokenizer_config.json to a token the model never has to produce."
    )


def convert_tokenizer(src: Path, chat_template: str | None) -> ConvertedTokenizer:
    """Load or build the fast tokenizer of the OpenGVLab checkpoint in ``src``.

    sentencepiece sources (InternLM2, Llama-family such as Phi-3) become a byte-fallback BPE ``tokenizer.json`` with
    the slow tokenizer's ids; `LlamaTokenizer` sources use `InternVLXLlamaTokenizerFast` on top of it (the slow
    tokenizer's text-start and decoding rules, see its docstring). A source without a pad token gets one
    (`choose_pad_token`).
    """
    from transformers import TokenizersBackend

    config = _read_json(src / "tokenizer_config.json")
    special_map = _read_json(src / "special_tokens_map.json")

    def named(key: str) -> str | None:  # as the slow tokenizer: tokenizer_config.json first
        return _token_content(config[key] if key in config else special_map.get(key))

    if is_sentencepiece_tokenizer(src):
        model_file = src / SPM_MODEL_NAME
        if not model_file.is_file():
            raise ConversionError(f"{src} uses {config.get('tokenizer_class')} but has no {SPM_MODEL_NAME}")
        legacy = config.get("legacy")
        legacy = True if legacy is None else bool(legacy)  # the slow LlamaTokenizer's default
        bos, eos, unk, pad = named("bos_token"), named("eos_token"), named("unk_token"), named("pad_token")
        extra = config.get("additional_special_tokens", special_map.get("additional_special_tokens")) or []
        extra = [_token_content(token) for token in extra]
        add_bos = bool(config.get("add_bos_token", True))
        add_eos = bool(config.get("add_eos_token", False))
        proto = _read_sentencepiece(model_file)
        backend = sentencepiece_to_tokenizers(model_file, _added_tokens(src, config), legacy=legacy,
                                              bos_token=bos, eos_token=eos, add_bos_token=add_bos,
                                              add_eos_token=add_eos,
                                              special_tokens={t for t in (bos, eos, unk, pad, *extra) if t},
                                              proto=proto)
        options = dict(
            tokenizer_object=backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=unk,
            pad_token=pad,
            additional_special_tokens=extra,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            model_max_length=config.get("model_max_length", 8192),
        )
        name = config.get("tokenizer_class", "sentencepiece")
        if str(name).startswith("LlamaTokenizer"):
            from ..processing.tokenization_internvlx import InternVLXLlamaTokenizerFast

            tokenizer = InternVLXLlamaTokenizerFast(legacy=legacy, sentencepiece=sentencepiece_facts(proto),
                                                    **options)
            kind = f"{name} (legacy={legacy}, {SPM_MODEL_NAME}) -> fast BPE + InternVLXLlamaTokenizerFast"
        else:
            tokenizer = TokenizersBackend(**options)
            kind = f"{name} ({SPM_MODEL_NAME}) -> fast BPE"
    elif (src / FAST_TOKENIZER_NAME).is_file():
        tokenizer = TokenizersBackend.from_pretrained(str(src), trust_remote_code=False)
        kind = f"{config.get('tokenizer_class', 'fast')} ({FAST_TOKENIZER_NAME}, unchanged)"
    elif config.get("tokenizer_class"):
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        tokenizer_class = tokenizer_class_from_name(config["tokenizer_class"])
        if tokenizer_class is None:
            raise ConversionError(
                f"{src}: tokenizer_class {config['tokenizer_class']!r} is not a transformers tokenizer and there is "
                f"no {FAST_TOKENIZER_NAME}; save the tokenizer as a fast tokenizer first."
            )
        tokenizer = tokenizer_class.from_pretrained(str(src), trust_remote_code=False)
        kind = f"{config['tokenizer_class']} (vocabulary files -> fast)"
    else:
        raise ConversionError(f"{src} has no tokenizer (tokenizer_config.json with tokenizer.model or tokenizer.json)")
    for key in _LOADING_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    if chat_template is not None:
        from ..processing.chat_templates import for_tokenizer

        # with the BOS text this tokenizer needs, for the routes that tokenize the rendering without special tokens
        tokenizer.chat_template = for_tokenizer(chat_template, tokenizer)[0]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = choose_pad_token(tokenizer, chat_template)
        kind += f"; pad token {tokenizer.pad_token} (the source has none)"
    return ConvertedTokenizer(tokenizer=tokenizer, kind=kind)
