"""vLLM's tokenizer for InternVL-X checkpoints: vLLM's own (`CachedHfTokenizer`), with one BOS on a text that writes it.

A chat template made for a sentencepiece tokenizer writes the BOS (`<s>`; `chat_templates.bos_prefix`), because vLLM's
chat routes tokenize the rendering without special tokens. The same rendering given as text to `LLM.generate` or to
the completions route is tokenized *with* them, and the tokenizer puts a second `<s>` in front: another prompt, and
other answers. transformers' processor gives such a text one BOS (`InternVLXProcessor`: tokenized without adding
another), and image prompts get it from the plugin's processing (`prompt_text.split_bos`); this tokenizer does the same
for text-only prompts, which reach no other part of the plugin. The config hook selects it (vLLM's tokenizer mode
`internvlx`) unless the user chose a tokenizer mode.

Nothing else changes: a text that does not start with the BOS text, a call without special tokens, decoding, and the
chat routes' ids are vLLM's.
"""

from __future__ import annotations

from vllm.tokenizers.hf import CachedHfTokenizer

#: vLLM's tokenizer mode (and renderer mode: vLLM's HF renderer) of this tokenizer, registered by the plugin.
MODE = "internvlx"


def with_one_bos(tokenizer):
    """``tokenizer`` (vLLM's cached HF tokenizer), whose calls with special tokens add none in front of a text that
    starts with its BOS token."""
    base = type(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or getattr(base, "_internvlx_one_bos", False):
        return tokenizer

    def writes_bos(text, add_special_tokens: bool) -> bool:
        return add_special_tokens and isinstance(text, str) and text.startswith(bos)

    class OneBOS(base):
        _internvlx_one_bos = True

        def __call__(self, text=None, *args, add_special_tokens: bool = True, **kwargs):
            add_special_tokens = add_special_tokens and not writes_bos(text, add_special_tokens)
            return super().__call__(text, *args, add_special_tokens=add_special_tokens, **kwargs)

        def encode(self, text, *args, add_special_tokens: bool = True, **kwargs):
            add_special_tokens = add_special_tokens and not writes_bos(text, add_special_tokens)
            return super().encode(text, *args, add_special_tokens=add_special_tokens, **kwargs)

        def __reduce__(self):  # (vLLM pickles its tokenizer to other processes: rebuilt with the rule)
            rebuild, args = super().__reduce__()[:2]
            return _rebuild, (rebuild, args)

    OneBOS.__name__ = OneBOS.__qualname__ = base.__name__
    tokenizer.__class__ = OneBOS
    return tokenizer


def _rebuild(rebuild, args):
    return with_one_bos(rebuild(*args))


class InternVLXTokenizer(CachedHfTokenizer):
    """vLLM's `TokenizerRegistry` entry for mode `internvlx`: the folder's tokenizer as vLLM loads it, then
    `with_one_bos`."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return with_one_bos(super().from_pretrained(*args, **kwargs))


def register() -> None:
    """The tokenizer mode, and its renderer (vLLM's HF renderer, as for mode `hf`)."""
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers import TokenizerRegistry

    if MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(MODE, __name__, InternVLXTokenizer.__name__)
    if MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(MODE, "vllm.renderers.hf", "HfRenderer")
