#!/usr/bin/env python3
"""Record what the reference slow tokenizers do, as test cases in ``tests/fixtures/tokenizer_cases/``.

InternVL2's reference code tokenizes with transformers' *slow* sentencepiece tokenizers (transformers 4.37.2, the
version the golden fixtures were made with). The converted checkpoints use a fast ``tokenizer.json`` instead, and
``tests/test_tokenizer_phi3.py`` checks it against the cases this script records from the real slow implementation,
not against a reading of its rules:

* ``phi3.json``: the ``internvl2_phi3`` fixture tokenizer as it is (``LlamaTokenizer``, ``legacy=False``);
* ``phi3_strip.json``: the same with lstrip/rstrip switched on for some added tokens (special and not), as real
  checkpoints do (Phi-3-mini ships its chat tokens with ``rstrip=true``);
* ``phi3_legacy.json``: the same sentencepiece model and added tokens loaded with ``legacy=True``;
* ``phi3_legacy_strip.json``: ``legacy=True`` with the lstrip/rstrip flags of ``phi3_strip``;
* ``internlm2.json``: the ``internvl2_internlm2`` fixture's sentencepiece model and added tokens in a
  ``LlamaTokenizer(legacy=True)`` (the fixture's ``InternLM2Tokenizer`` is remote code that is not shipped; this
  stand-in is checked to give the fixture's prompt ids, and only its encodings are recorded).

Each file holds the exact ``tokenizer_config.json`` the tokenizer was loaded from (a variant folder has the fixture's
``tokenizer.model``, whose sha256 is recorded, and that config; nothing else), ``all_special_tokens``, and:

* ``encode``: ``[text, ids, decode(ids), decode(ids, skip_special_tokens=True)]`` for hand-picked edge cases (every
  added token with every prefix/suffix in ``AROUND``) and seeded random strings mixing text, added tokens (special
  and not), decoys such as ``</s>`` or ``<|end``, spaces, tabs, newlines, ``▁``, digits and byte-fallback characters
  (CJK, emoji) at the start, in the middle and at the end; ``ids`` = ``tokenizer(text).input_ids``;
* ``pairs``: ``[text, text_pair, ids]``;
* ``decode``: ``[ids, decode(ids), decode(ids, skip_special_tokens=True)]`` for random id lists (byte tokens that
  are and are not valid UTF-8, pieces, ``▁``, control pieces, added tokens).

Before writing, the script checks that the loaded tokenizers reproduce the fixture README's 20 worked examples
(``reference.json`` -> ``tokenizer_behaviour``) and the fixtures' prompt ids; it stops if they do not.

Regenerate (the project's own venv has transformers 5, so use a separate one; torch is not needed)::

    python3 -m venv /tmp/tok437
    /tmp/tok437/bin/pip install transformers==4.37.2 tokenizers==0.15.2 sentencepiece==0.2.0 protobuf
    /tmp/tok437/bin/python scripts/make_tokenizer_cases.py            # reads tests/fixtures, writes tokenizer_cases

``--phi3`` / ``--internlm2`` point at other fixture folders (e.g. ../shared/fixtures_phi3/internvl2_phi3); the
folders need ``tokenizer.model``, ``tokenizer_config.json`` and ``reference.json`` (the prompt ids are read from
``reference.compact.safetensors`` or ``reference.safetensors``). The output is deterministic (fixed seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1

# lstrip/rstrip switched on in the *_strip variants: Phi-3 chat tokens (not in all_special_tokens) and InternVL
# tokens (in additional_special_tokens), on either side or both, and the eos token.
STRIP_FLAGS = {
    "<|assistant|>": (False, True), "<|end|>": (False, True), "<|system|>": (False, True),
    "<|user|>": (True, True), "<|placeholder1|>": (True, False),
    "<img>": (True, False), "</img>": (False, True), "<IMG_CONTEXT>": (True, True), "<|endoftext|>": (True, False),
}

# Text put before and after every added token in the systematic cases.
AROUND_BEFORE = ["", " ", "\n ", "▁", "Hi", "x\t"]
AROUND_AFTER = ["", " ", "\n", " Hi", "▁Hi", "<|end|>"]

WORDS = ["Hi", "there", "the", "image", "What", "is", "this", "cat", "x", "y", "a", "in", "describe", "Please",
         "InternVL", "ing", "re", "The", "shows", "?", ".", ",", "!", ":", "'s", "(", ")", "-", "\"", "/"]
SPACES = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n", "\n\n", " \n", "\n ", "\r\n", "\xa0", "\u3000"]
MARKERS = ["▁", "▁▁", " ▁", "▁ "]
DIGITS = ["0", "7", "42", "2024", "3.14", "100%", "1,000"]
BYTE_FALLBACK = ["你好", "图片", "书生", "多模态", "é", "ü", "ß", "😀", "🚀", "👍🏽", "Ω", "\u200b", "~"]
DECOYS = ["</s>", "<s", "s>", "<|", "|>", "<img", "img>", "<|end", "end|>", "<unk", "<|endoftext|", "< s>", "<<s>>",
          "<IMG_CONTEXT", "<|im_end|>"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_reference_ids(folder: Path) -> list[int]:
    from safetensors.numpy import load_file

    for name in ("reference.compact.safetensors", "reference.safetensors"):
        if (folder / name).is_file():
            return load_file(str(folder / name))["input_ids"][0].tolist()
    raise FileNotFoundError(f"{folder} has neither reference.compact.safetensors nor reference.safetensors")


def variant_config(source: Path, *, legacy: bool, strip: bool) -> dict:
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("auto_map", None)
    config["tokenizer_class"] = "LlamaTokenizer"
    config["legacy"] = legacy
    if strip:
        for token in config["added_tokens_decoder"].values():
            if token["content"] in STRIP_FLAGS:
                token["lstrip"], token["rstrip"] = STRIP_FLAGS[token["content"]]
    return config


def load_variant(source: Path, config: dict, workdir: Path):
    """The slow LlamaTokenizer of a folder with only ``tokenizer.model`` and ``config`` (no special_tokens_map.json
    or added_tokens.json, so the flags in ``config`` are the only ones)."""
    from transformers import LlamaTokenizer

    workdir.mkdir(parents=True)
    shutil.copyfile(source / "tokenizer.model", workdir / "tokenizer.model")
    (workdir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer = LlamaTokenizer.from_pretrained(str(workdir))
    assert type(tokenizer).__name__ == "LlamaTokenizer" and tokenizer.legacy == config["legacy"]
    for index, token in config["added_tokens_decoder"].items():  # the flags were taken over as written
        loaded = tokenizer.added_tokens_decoder[int(index)]
        assert (loaded.content, loaded.lstrip, loaded.rstrip) == (token["content"], token["lstrip"], token["rstrip"])
    return tokenizer


def random_text(rng: random.Random, added: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(0, 12)):
        roll = rng.random()
        if roll < 0.22:
            parts.append(rng.choice(added))
        elif roll < 0.45:
            parts.append(rng.choice(WORDS))
        elif roll < 0.68:
            parts.append(rng.choice(SPACES))
        elif roll < 0.74:
            parts.append(rng.choice(MARKERS))
        elif roll < 0.82:
            parts.append(rng.choice(DIGITS))
        elif roll < 0.93:
            parts.append(rng.choice(BYTE_FALLBACK))
        else:
            parts.append(rng.choice(DECOYS))
    return "".join(parts)


def random_ids(rng: random.Random, tokenizer) -> list[int]:
    """Id lists as a model might generate them: byte tokens (valid UTF-8 runs and broken ones), pieces, "▁",
    control pieces and added tokens."""
    sp_size = tokenizer.sp_model.get_piece_size()
    byte_ids = {int(tokenizer.sp_model.id_to_piece(i)[3:5], 16): i for i in range(sp_size)
                if tokenizer.sp_model.is_byte(i)}
    sp = tokenizer.sp_model
    normal = [i for i in range(sp_size) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    added = sorted(tokenizer.added_tokens_decoder)
    ids: list[int] = []
    for _ in range(rng.randint(1, 10)):
        roll = rng.random()
        if roll < 0.35:
            ids.append(rng.choice(normal))
        elif roll < 0.55:
            ids.extend(byte_ids[b] for b in rng.choice(["é", "你", "😀", "\n", "<"]).encode("utf-8"))
        elif roll < 0.68:
            ids.append(byte_ids[rng.choice([0x80, 0xBF, 0xC3, 0xE4, 0xF0, 0xFF, 0x20, 0x0A])])  # lone or broken
        elif roll < 0.88:
            ids.append(rng.choice(added))
        else:
            ids.append(rng.choice([0, 1, 2, tokenizer.convert_tokens_to_ids("▁")]))
    return ids


def record(tokenizer, texts: list[str], id_lists: list[list[int]], pairs: list[tuple[str, str]]) -> dict:
    def decodes(ids):
        return [tokenizer.decode(ids), tokenizer.decode(ids, skip_special_tokens=True)]

    encode = []
    for text in texts:
        ids = tokenizer(text).input_ids
        encode.append([text, ids, *decodes(ids)])
    return {
        "encode": encode,
        "pairs": [[a, b, tokenizer(a, b).input_ids] for a, b in pairs],
        "decode": [[ids, *decodes(ids)] for ids in id_lists],
    }


def check_worked_examples(tokenizer, meta: dict) -> int:
    """The fixture README's worked examples (``tokenizer_behaviour``) and the decoding example."""
    behaviour = meta["tokenizer_behaviour"]
    examples = behaviour["encode_examples"]
    for example in examples:
        ids = tokenizer(example["text"]).input_ids
        if ids != example["ids"]:
            sys.exit(f"reference oracle disagrees with the fixture on {example['text']!r}: {ids} != {example['ids']}")
    example = behaviour["decode_example"]
    got = [tokenizer(example["text"]).input_ids, tokenizer.decode(example["ids"]),
           tokenizer.decode(example["ids"], skip_special_tokens=True),
           tokenizer.decode(example["ids"], spaces_between_special_tokens=False)]
    expected = [example["ids"], example["decode"], example["decode_skip_special_tokens"],
                example["decode_spaces_between_special_tokens_false"]]
    if got != expected:
        sys.exit(f"reference oracle disagrees with the fixture's decoding example: {got} != {expected}")
    return len(examples)


def texts_for(tokenizer, seed: int, count: int, extra: list[str]) -> list[str]:
    added = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())]
    texts = list(extra)
    texts += [before + token + after for token in added for before in AROUND_BEFORE for after in AROUND_AFTER]
    rng = random.Random(seed)
    texts += [random_text(rng, added) for _ in range(count)]
    return list(dict.fromkeys(texts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--phi3", type=Path, default=ROOT / "tests" / "fixtures" / "internvl2_phi3")
    parser.add_argument("--internlm2", type=Path, default=ROOT / "tests" / "fixtures" / "internvl2_internlm2")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "tokenizer_cases")
    parser.add_argument("--count", type=int, default=400, help="random strings per variant (default 400)")
    args = parser.parse_args(argv)

    import sentencepiece
    import tokenizers
    import transformers

    if transformers.__version__ != "4.37.2":
        sys.exit(f"run this with transformers 4.37.2 (see the docstring), not {transformers.__version__}")
    environment = {"python": sys.version.split()[0], "transformers": transformers.__version__,
                   "tokenizers": tokenizers.__version__, "sentencepiece": sentencepiece.__version__}
    phi3_meta = json.loads((args.phi3 / "reference.json").read_text(encoding="utf-8"))
    internlm2_meta = json.loads((args.internlm2 / "reference.json").read_text(encoding="utf-8"))
    readme_texts = [e["text"] for e in phi3_meta["tokenizer_behaviour"]["encode_examples"]]

    variants = [
        ("phi3", args.phi3, False, False, 1),
        ("phi3_strip", args.phi3, False, True, 2),
        ("phi3_legacy", args.phi3, True, False, 3),
        ("phi3_legacy_strip", args.phi3, True, True, 4),
        ("internlm2", args.internlm2, True, False, 5),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, legacy, strip, seed in variants:
            config = variant_config(source, legacy=legacy, strip=strip)
            tokenizer = load_variant(source, config, Path(tmp) / name)
            checks = {}
            if name == "phi3":
                # the oracle is the tokenizer the fixtures were made with: same ids as the fixture's own folder
                checks["worked_examples"] = check_worked_examples(tokenizer, phi3_meta)
                checks["decode_example"] = True
            meta = phi3_meta if source == args.phi3 else internlm2_meta
            prompt_ids = tokenizer(meta["prompt"]).input_ids
            if not strip and (not legacy or name == "internlm2"):  # the configurations the fixtures were made with
                if prompt_ids != load_reference_ids(source):
                    sys.exit(f"{name}: the oracle does not reproduce {source.name}'s prompt ids")
                checks["prompt_ids"] = True
            texts = texts_for(tokenizer, seed, args.count, readme_texts + [meta["prompt_with_image_tag"]])
            rng = random.Random(seed + 100)
            id_lists = [random_ids(rng, tokenizer) for _ in range(args.count // 2)]
            pair_rng = random.Random(seed + 200)
            added = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())]
            pairs = [(random_text(pair_rng, added), random_text(pair_rng, added)) for _ in range(40)]
            data = {
                "schema": SCHEMA,
                "variant": name,
                "reference": f"transformers.LlamaTokenizer (slow, legacy={legacy}) {transformers.__version__}",
                "source": source.name,
                "tokenizer_model_sha256": sha256(source / "tokenizer.model"),
                "tokenizer_config": config,
                "all_special_tokens": tokenizer.all_special_tokens,
                "environment": environment,
                "checks": checks,
                "generator": "scripts/make_tokenizer_cases.py",
            }
            cases = record(tokenizer, texts, id_lists, pairs)
            if name == "internlm2":  # a stand-in for InternLM2Tokenizer: its encodings only
                cases = {"encode": [c[:2] for c in cases["encode"]], "pairs": cases["pairs"], "decode": []}
            data.update(cases)
            path = args.out / f"{name}.json"
            path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
            print(f"{path}: {len(data['encode'])} texts, {len(data['pairs'])} pairs, {len(data['decode'])} id lists, "
                  f"{path.stat().st_size / 1e3:.0f} kB; checks {checks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
