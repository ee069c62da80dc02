"""vLLM's tokenizer for InternVL-X checkpoints: vLLM's own (`CachedHfTokenizer`), with one BOS on a text that writes it
and no length limit of its own.

A chat template made for a sentencepiece tokenizer writes the BOS (`<s>`; `chat_templates.bos_prefix`), because vLLM's
chat routes tokenize the rendering without special tokens. The same rendering given as text to `LLM.generate` or to
the completions route is tokenized *with* them, and the tokenizer puts a second `<s>` in front: another prompt, and
other answers. transformers' processor gives such a text one BOS (`InternVLXProcessor`: tokenized without adding
another), and image prompts get it from the plugin's processing (`prompt_text.split_bos`); this tokenizer does the same
for text-only prompts, which reach no other part of the plugin. The config hook selects it (vLLM's tokenizer mode
`internvlx`) unless the user chose a tokenizer mode.

vLLM bounds every prompt by `max_model_len` (its 400 names it; an LVTC prompt's tiles count at the long layout), which
can exceed the tokenizer's `model_max_length` (8192 as converted, below a Qwen2 LLM's 32768): that limit would only
have transformers warn, in every vLLM process, about prompts vLLM serves, so this tokenizer has none.

Nothing else changes: a text that does not start with the BOS text, a call without special tokens, decoding, and the
chat routes' ids are vLLM's.
"""

from __future__ import annotations

from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from vllm.tokenizers.hf import CachedHfTokenizer

#: vLLM's tokenizer mode (and renderer mode: vLLM's HF renderer) of this tokenizer, registered by the plugin.
MODE = "internvlx"


def for_vllm(tokenizer):
    """``tokenizer`` (vLLM's cached HF tokenizer) without a length limit, and whose calls with special tokens add none
    in front of a text that starts with its BOS token."""
    tokenizer.model_max_length = VERY_LARGE_INTEGER  # (transformers' "no limit")
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
    return for_vllm(rebuild(*args))


class InternVLXTokenizer(CachedHfTokenizer):
    """vLLM's `TokenizerRegistry` entry for mode `internvlx`: the folder's tokenizer as vLLM loads it, then
    `for_vllm`."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return for_vllm(super().from_pretrained(*args, **kwargs))


def register() -> None:
    """The tokenizer mode, and its renderer (vLLM's HF renderer, as for mode `hf`)."""
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers import TokenizerRegistry

    if MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(MODE, __name__, InternVLXTokenizer.__name__)
    if MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(MODE, "vllm.renderers.hf", "HfRenderer")
