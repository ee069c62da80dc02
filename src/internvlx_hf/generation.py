"""Generation helpers shared by `internvlx chat`, the demo and evaluation: which token ids end an answer."""

from __future__ import annotations


def end_of_turn_token_ids(processor, generation_config=None) -> list[int]:
    """Token ids that end an answer: the chat template's end-of-turn token (what follows an assistant message,
    e.g. ``<|im_end|>`` or ``<|end|>``) and the generation config's eos ids."""
    from .processing.chat_templates import turn_end_text

    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        ids += [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
    tokenizer = processor.tokenizer
    end = turn_end_text(processor.apply_chat_template)
    if end:
        end_ids = tokenizer(end, add_special_tokens=False)["input_ids"]
        if len(end_ids) == 1 and end_ids[0] not in ids:
            ids.append(int(end_ids[0]))
    if not ids and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the checkpoint defines no end-of-turn or eos token (chat template, generation_config.json, "
                         "tokenizer); re-convert it with `internvlx convert`.")
    return ids
