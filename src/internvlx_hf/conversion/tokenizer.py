"""The tokenizer: InternLM2's sentencepiece model -> a fast tokenizer with identical ids; others pass through.

InternVL2's reference code tokenizes with the *slow* sentencepiece classes (InternLM2Tokenizer, LlamaTokenizer
with ``legacy=True``). They split the text at every added/special token and encode each remaining chunk on its own
with sentencepiece, whose ``add_dummy_prefix`` puts a ``▁`` in front of *every* chunk (``<|im_start|>system`` ->
``<|im_start|>``, ``▁s``, ...). A `tokenizers` pipeline does the same when the sentencepiece vocabulary becomes a
byte-fallback BPE, the added tokens are extracted first (they are never normalised), and the normaliser
unconditionally prepends ``▁`` and turns spaces into ``▁`` on each remaining chunk. (A Metaspace pre-tokenizer
with ``prepend_scheme="always"`` is *not* equivalent: it skips the prefix when a chunk already starts with a
space, where sentencepiece adds it anyway.) The merges are ranked by the sentencepiece piece scores, as
sentencepiece's BPE merges the highest-scoring pair first.

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


def sentencepiece_to_tokenizers(model_file: Path, added: dict[int, dict], *, legacy: bool = True,
                                bos_token: str | None = "<s>", eos_token: str | None = "</s>",
                                add_bos_token: bool = True, add_eos_token: bool = False):
    """A `tokenizers.Tokenizer` that encodes like the slow sentencepiece tokenizer (see the module docstring)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # protobuf missing as well
        raise ConversionError(
            f"converting {model_file} needs sentencepiece and protobuf: pip install 'internvlx-hf[convert]' ({error})"
        ) from None
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # BPE
        raise ConversionError(f"{model_file}: only sentencepiece BPE models are supported (InternLM2, Llama); "
                              f"this one has model_type={trainer.model_type}")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ConversionError(
            f"{model_file}: sentencepiece normalisation ({norm.name!r}, remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) is not supported; InternLM2/Llama models use 'identity'."
        )
    pieces = list(proto.pieces)
    vocab = {piece.piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConversionError(f"{model_file} has duplicate pieces")
    scores = {piece.piece: piece.score for piece in pieces if piece.type == _NORMAL}
    not_mergeable = {piece.piece for piece in pieces if piece.type != _NORMAL}
    merges = generate_merges(vocab, scores, skip_tokens=not_mergeable)

    # Tokens added on top of the sentencepiece vocabulary keep their ids: they go into the BPE vocabulary at
    # those ids (no merge produces them) and are registered as added tokens so they split the text first.
    extra = {index: token for index, token in added.items() if index >= len(pieces)}
    for index, token in added.items():
        if index < len(pieces) and pieces[index].piece != token["content"]:
            raise ConversionError(
                f"tokenizer_config.json gives id {index} to {token['content']!r} but {model_file} has "
                f"{pieces[index].piece!r} there."
            )
    expected_ids = list(range(len(pieces), len(pieces) + len(extra)))
    if sorted(extra) != expected_ids:
        raise ConversionError(
            f"added tokens must follow the sentencepiece vocabulary ({len(pieces)} pieces) without gaps; got ids "
            f"{sorted(extra)}"
        )
    for index in expected_ids:
        vocab[extra[index]["content"]] = index
    unk = pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                              byte_fallback=trainer.byte_fallback, dropout=None))

    if legacy:
        steps = [normalizers.Replace(" ", "▁")]
        if norm.add_dummy_prefix:
            steps.insert(0, normalizers.Prepend("▁"))
        tokenizer.normalizer = normalizers.Sequence(steps)
    else:
        # LlamaTokenizer(legacy=False): one "▁" at the start of the text only, none after special tokens.
        scheme = "first" if norm.add_dummy_prefix else "never"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decoder_steps)

    special_pieces = {index for index, piece in enumerate(pieces) if piece.type in (_UNKNOWN, _CONTROL)}
    added_tokens = []
    for index in sorted(set(added) | special_pieces | {i for i, p in enumerate(pieces) if p.type == _USER_DEFINED}):
        token = added[index] if index in added else {"content": pieces[index].piece,
                                                       "special": index in special_pieces}
        added_tokens.append(AddedToken(
            token["content"],
            single_word=bool(token.get("single_word", False)),
            lstrip=bool(token.get("lstrip", False)),
            rstrip=bool(token.get("rstrip", False)),
            normalized=bool(token.get("normalized", False)),
            special=bool(token.get("special", True)),
        ))
    tokenizer.add_tokens(added_tokens)

    single, pair, specials = "$A:0", "$A:0 $B:1", []
    for flag, token, where in ((add_bos_token, bos_token, "start"), (add_eos_token, eos_token, "end")):
        if not flag or token is None:
            continue
        if token not in vocab:
            raise ConversionError(f"{model_file}: the {where} token {token!r} is not in the vocabulary")
        specials.append((token, vocab[token]))
        if where == "start":
            single, pair = f"{token}:0 {single}", f"{token}:0 $A:0 {token}:1 $B:1"
        else:
            single, pair = f"{single} {token}:0", f"{pair} {token}:1"
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tokenizer


def convert_tokenizer(src: Path, chat_template: str | None) -> ConvertedTokenizer:
    """Load or build the fast tokenizer of the OpenGVLab checkpoint in ``src``."""
    from transformers import TokenizersBackend

    config = _read_json(src / "tokenizer_config.json")
    if is_sentencepiece_tokenizer(src):
        model_file = src / SPM_MODEL_NAME
        if not model_file.is_file():
            raise ConversionError(f"{src} uses {config.get('tokenizer_class')} but has no {SPM_MODEL_NAME}")
        legacy = config.get("legacy")
        legacy = True if legacy is None else bool(legacy)  # the slow LlamaTokenizer's default
        bos, eos = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        add_bos = bool(config.get("add_bos_token", True))
        add_eos = bool(config.get("add_eos_token", False))
        backend = sentencepiece_to_tokenizers(model_file, _added_tokens(src, config), legacy=legacy,
                                              bos_token=bos, eos_token=eos, add_bos_token=add_bos,
                                              add_eos_token=add_eos)
        specials = [_token_content(t) for t in config.get("additional_special_tokens") or []]
        tokenizer = TokenizersBackend(
            tokenizer_object=backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=_token_content(config.get("unk_token")),
            pad_token=_token_content(config.get("pad_token")),
            additional_special_tokens=specials,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            model_max_length=config.get("model_max_length", 8192),
        )
        kind = f"{config.get('tokenizer_class', 'sentencepiece')} ({SPM_MODEL_NAME}) -> fast BPE"
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
        tokenizer.chat_template = chat_template
    return ConvertedTokenizer(tokenizer=tokenizer, kind=kind)
